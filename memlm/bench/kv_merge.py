"""One `memlm bench kv` report from several runs on the same problems (policies split between
processes so that both cores work): rows concatenated in the order given, settings taken from the
run that has them (the learned policy's from the run that ran it), and each run's own settings
that may differ between them (spans, span unit, the learned policy's cost) kept under "runs".

    python -m memlm.bench.kv_merge runs/a.json runs/b.json --json bench/results/kv.json --plot kv.png

A run given as `PATH:POLICY,POLICY` contributes only those policies' rows (a run that also holds a
row another run measured again with other settings).
"""

from __future__ import annotations

import argparse
import json

from rich.console import Console

from memlm.bench.kv import plot_report, print_report
from memlm.bench.report import write_outputs

SAME = ("model", "task", "n", "split", "dtype", "max_new_tokens", "probe_n")  # what makes the problems the same
PER_RUN = ("spans", "span_unit", "learned_cost")  # settings a run's rows need beside them


def merge_reports(reports: list[dict]) -> dict:
    """Rows of every report; each setting from the first report where it is set. ValueError when
    the reports ran different problems or repeat a (policy, budget) cell."""
    first = reports[0]
    for r in reports[1:]:
        differ = [k for k in SAME if r.get(k) != first.get(k)]
        if differ:
            raise ValueError(f"the runs differ in {', '.join(differ)}: not the same problems")
    merged = {k: next((r[k] for r in reports if r.get(k) not in (None, {}, [])), first.get(k)) for k in first}
    merged["rows"] = [row for r in reports for row in r["rows"]]
    merged["runs"] = [_run_settings(r) for r in reports]
    cells = [(row["policy"], row["budget"]) for row in merged["rows"]]
    if len(set(cells)) != len(cells):
        raise ValueError("a (policy, budget) cell appears in more than one run")
    return merged


def _run_settings(report: dict) -> dict:
    """One run's policies and the settings its rows ran with."""
    return {"policies": [row["policy"] for row in report["rows"]]} | {k: report.get(k) for k in PER_RUN}


def read_run(given: str) -> dict:
    """A run's report from `PATH` or `PATH:POLICY,POLICY` (only those policies' rows)."""
    path, _, only = given.partition(":")
    report = json.loads(open(path).read())
    if only:
        wanted = only.split(",")
        missing = sorted(set(wanted) - {row["policy"] for row in report["rows"]})
        if missing:
            raise ValueError(f"{path} has no {missing[0]!r} rows")
        report["rows"] = [row for row in report["rows"] if row["policy"] in wanted]
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m memlm.bench.kv_merge", description=__doc__.split("\n\n")[0])
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--json", required=True)
    parser.add_argument("--plot")
    args = parser.parse_args(argv)
    try:
        reports = [read_run(given) for given in args.reports]
        merged = merge_reports(reports)
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: {e}") from None
    console = Console()
    print_report(merged, console)
    write_outputs(merged, console, args.json, args.plot, plot_report)


if __name__ == "__main__":
    main()

"""The `memlm` command line: the root app, its command groups, and `main`.

Each command group lives in its own module (generate.py: generate, chat, info; prune.py; serve.py;
bench.py; train.py; data.py; lcm.py; eval.py; quantize.py) and shares options through options.py; this module
only registers them. User mistakes (bad flags, unknown models, corrupt files) end as one line on
stderr and exit code 2; tracebacks are for bugs.
"""

from __future__ import annotations

import sys

import typer

from memlm.cli.bench import bench_app
from memlm.cli.data import data_app
from memlm.cli.eval import eval_app
from memlm.cli.generate import chat, generate, info
from memlm.cli.lcm import lcm_app
from memlm.cli.prune import prune
from memlm.cli.quantize import quantize
from memlm.cli.serve import serve
from memlm.cli.train import train_app
from memlm.errors import MemlmError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="memlm: run language models with first-class memory.",
)
for command in (generate, chat, info, prune, serve, quantize):
    app.command()(command)
app.add_typer(bench_app, name="bench")
app.add_typer(train_app, name="train")
app.add_typer(data_app, name="data")
app.add_typer(lcm_app, name="lcm")
app.add_typer(eval_app, name="eval")


def main() -> None:
    try:
        code = app(standalone_mode=False)
    except MemlmError as e:
        _fail(str(e))
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.TyperException as e:  # command-line usage errors: bad option, bad value, missing argument
        _fail(e.format_message() if hasattr(e, "format_message") else str(e))
    sys.exit(code if isinstance(code, int) else 0)


def _fail(message: str) -> None:
    if message:  # empty for "no arguments: help was shown"
        print(f"memlm: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()

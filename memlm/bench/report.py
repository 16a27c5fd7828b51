"""What every benchmark does at its end: print a table, write the JSON and the figure, say where.

    print_table(console, "title", ["name", "tok/s"], [["memlm", "12.3"]], left=("name",))
    fig, ax = pyplot().subplots()           # matplotlib with the Agg backend, imported on first use
    ...
    save_figure(fig, path)                  # PNG, written atomically; the figure is closed
    write_outputs(result, console, json_path, plot_path, plot)   # JSON atomically, plot(result, path)

Files are written atomically (memlm/atomic.py): a reader sees the old file or the new one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rich.table import Table

from memlm.atomic import atomic_write, write_json_atomic


def print_table(console, title: str, columns: Sequence[str], rows: Sequence[Sequence[str]], left=()) -> None:
    """A rich table: every column right-justified except those named in `left`; cells are strings."""
    table = Table(title=title)
    for column in columns:
        table.add_column(column, justify="left" if column in left else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display)."""
    import matplotlib  # lazy: matplotlib takes a second to import; only plotting needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: as above

    return plt


def save_figure(fig, path: str, dpi: int = 110) -> None:
    """Write `fig` as a PNG atomically, then close it."""
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=dpi))
    pyplot().close(fig)


def write_json(path: str, data, console=None) -> None:
    """Write `data` as JSON atomically; say so on `console` (anything with .print, or None)."""
    write_json_atomic(path, data)
    if console is not None:
        console.print(f"wrote {path}")


def write_outputs(
    result: dict,
    console=None,
    json_path: str | None = None,
    plot_path: str | None = None,
    plot: Callable[[dict, str], None] | None = None,
) -> None:
    """The end of a benchmark: `result` as JSON to `json_path`, `plot(result, plot_path)` to
    `plot_path` (each only if given), and a "wrote PATH" line on `console` for each (None: silent)."""
    if json_path:
        write_json(json_path, result, console)
    if plot_path and plot is not None:
        plot(result, plot_path)
        if console is not None:
            console.print(f"wrote {plot_path}")

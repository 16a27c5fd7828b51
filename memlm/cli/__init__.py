"""The `memlm` command line (the app and its groups: memlm/cli/app.py). `memlm.cli:main` is the
console script's entry point."""

from memlm.cli.app import app, main

__all__ = ["app", "main"]

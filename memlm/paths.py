"""Where memlm keeps what it makes: one module, at the bottom of the import graph, so that nothing
(the kernels' build cache, converted models) has to import a higher layer to find its folder."""

from __future__ import annotations

import os
from pathlib import Path


def memlm_home() -> Path:
    """$MEMLM_HOME, or ~/.cache/memlm: converted embedded models and compiled kernels live here."""
    return Path(os.environ.get("MEMLM_HOME") or Path.home() / ".cache" / "memlm")


def kernels_dir() -> Path:
    return memlm_home() / "kernels"


def conversions_dir() -> Path:
    return memlm_home() / "models"

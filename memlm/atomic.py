"""Atomic file writes: readers see the old file or the new one, never a half-written one."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from memlm.errors import MemlmError


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary file in `path`'s folder, then rename it over `path`.

    If `write` fails, the old file is left untouched and the temporary file is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private (and some writers recreate the file)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, data) -> None:
    """Write JSON atomically; if serialising fails the old file is left untouched."""
    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")

    atomic_write(path, write)


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create an output folder (and its parents), or fail with one line: a file in the way, no
    permission, a read-only disk. Commands call it before any work, so a bad --out costs nothing."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MemlmError(f"cannot create output folder {path}: {e.strerror or e}") from None
    if not os.access(path, os.W_OK):
        raise MemlmError(f"output folder {path} is not writable")
    return path


@contextlib.contextmanager
def atomic_folder(folder: str | os.PathLike):
    """Write a whole folder atomically: yield a temporary sibling to fill; on success it replaces
    `folder` by renames (a reader sees the old folder or the complete new one), on failure it goes."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a model folder is meant to be shared
    try:
        yield tmp
        for path in tmp.rglob("*"):  # some writers (safetensors) create files private too
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        old = folder.with_name(f".{folder.name}.old")
        if folder.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.rename(folder, old)
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

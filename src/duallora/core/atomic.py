"""Writing a file or a directory under a temporary name and renaming it into place, so that an interruption never
leaves a half-written one where a good one was."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory under a temporary name, then rename it into place (never a half-written one), with the
    permissions the umask gives (:func:`follow_umask`)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        write(tmp)
        follow_umask(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed into place, with the permissions ``open`` gives."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes the file private (0600); a results file is not
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def follow_umask(path: Path) -> None:
    """Give ``path`` and everything under it the permissions a plain ``mkdir`` and ``open`` would: directories
    ``0o777 & ~umask``, files ``0o666 & ~umask`` (executable bits kept). ``mkdtemp`` makes a private (0700) directory
    and safetensors writes its files private (0600), so without this a teammate or a server running as another user
    could not read an adapter, a checkpoint or an export that the umask shares."""
    mask = _umask()
    for item in [path, *path.rglob("*")]:
        if item.is_symlink():
            continue
        if item.is_dir():
            item.chmod(0o777 & ~mask)
        else:
            item.chmod((0o666 | (item.stat().st_mode & 0o111)) & ~mask)


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it
    os.umask(mask)
    return mask

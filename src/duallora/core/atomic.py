"""Writing a directory under a temporary name and renaming it into place, so that an interruption never leaves a
half-written one where a good one was."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def atomic_dir(final: Path, write: Callable[[Path], None]) -> None:
    """Write a directory under a temporary name, then rename it into place (never a half-written one)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        write(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

"""A run's output directory: what an earlier run left there, its checkpoints, and writing files and directories
under a temporary name first and renaming them into place, so that an interruption never leaves a half-written one
where a good one was."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..core.atomic import atomic_dir, atomic_write_text, follow_umask

__all__ = ["atomic_dir", "atomic_write_text", "check_output_dir", "latest_checkpoint", "prepare_output_dir",
           "publish_weights"]

if TYPE_CHECKING:
    from .run_config import RunConfig

RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json",
             "metrics.json", "run_config.json", "training.png", "checkpoints")


def check_output_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> list[str]:
    """The files of an earlier run in the output directory; raise unless the run resumes or replaces it."""
    out = Path(cfg.output_dir)
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not (resume or overwrite):
        raise FileExistsError(
            f"{out} holds an earlier run ({', '.join(earlier)}). Pass --resume to continue it or --overwrite to "
            "replace it."
        )
    return earlier


def prepare_output_dir(cfg: RunConfig, resume: bool, overwrite: bool, accelerator) -> Path:
    """Check (every process, so that all raise alike) and clear (the main process only) the output directory."""
    out = Path(cfg.output_dir)
    earlier = check_output_dir(cfg, resume, overwrite)
    if accelerator.is_main_process:
        if overwrite and not resume:
            for name in earlier:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


def latest_checkpoint(out: Path) -> Optional[Path]:
    complete = sorted((out / "checkpoints").glob("step-*/trainer_state.pt"))
    return complete[-1].parent if complete else None


def publish_weights(model, out: Path, state_dict: Optional[dict] = None) -> None:
    """Put the final weights (the adapter in PEFT format, or the full model) into the output directory, each file
    written under a temporary name first and renamed into place."""
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".final-"))
    try:
        model.save_pretrained(staging, state_dict=state_dict)
        follow_umask(staging)  # safetensors writes 0600; the run's files follow the umask, as its directory does
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)

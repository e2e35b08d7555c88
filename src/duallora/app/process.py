"""This process among a run's processes: its accelerate state, the collectives (on ``accelerator.device``), the
random state a resume restores, its peak memory and the versions it ran with."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch

def make_accelerator(grad_accum: int, micro_batch: int, trackers: tuple[str, ...] = (), logs=None):
    """The accelerate state of this process. Launched as several processes on a machine without an accelerator
    (``torchrun``/``accelerate launch`` on CPUs), accelerate needs ``cpu=True`` to set up its gloo process group
    (under DeepSpeed, which that would switch off: gloo named as the backend instead).

    Under DeepSpeed (``accelerate launch`` with a ZeRO config) the run's flags decide what this loop decides
    elsewhere, and are written into the engine's config: the micro-batch (``--batch-size``), the accumulation
    (``--grad-accum``), no gradient clipping (none under DDP or FSDP either), and, for ZeRO-3, the gathered state
    dict that saving the adapter reads.

    ``trackers`` (``--report-to``) log into ``logs`` once ``init_trackers`` is called."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    launched = int(os.environ.get("WORLD_SIZE", "1"))
    on_cpus = launched > 1 and not torch.cuda.is_available()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # accelerate launch's flag
    tracking = dict(log_with=list(trackers) or None, project_dir=str(logs) if logs else None)
    if deepspeed:
        accelerator = Accelerator(gradient_accumulation_steps=grad_accum, kwargs_handlers=(
            [InitProcessGroupKwargs(backend="gloo")] if on_cpus else []), **tracking)
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        run = {"train_micro_batch_size_per_gpu": micro_batch, "gradient_accumulation_steps": grad_accum,
               "gradient_clipping": 0.0}
        replaced = [f"{key} {config[key]} -> {value}" for key, value in run.items()
                    if config.get(key, "auto") not in ("auto", value)]
        if replaced and accelerator.is_main_process:  # the config file said otherwise: say what the run uses
            print(f"duallora train sets the DeepSpeed config from its flags: {', '.join(replaced)}.", file=sys.stderr)
        config.update(run)
        config.pop("train_batch_size", None)  # DeepSpeed derives it from the two above
        if config.get("zero_optimization", {}).get("stage") == 3:
            config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    else:
        accelerator = Accelerator(gradient_accumulation_steps=grad_accum, cpu=on_cpus, **tracking)
    if accelerator.num_processes != launched:  # each process would train alone on the whole data, silently
        raise ValueError(f"The launcher started {launched} processes but accelerate sees {accelerator.num_processes}: "
                         "they would not train together. Check the launcher's configuration (distributed_type, "
                         "num_processes).")
    return accelerator


def end_process_group() -> None:
    """Take the process group down once every process is done, before the interpreter exits. Called by the command
    line, not by ``train``: a program that calls ``train`` keeps its group. Why: a process that exits with
    DeepSpeed's gloo group still alive can abort ("terminate called without an active exception", seen under load)
    and fail the launch after a complete run."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def reduce_across_processes(accelerator, values: list[float], reduction: str) -> list[float]:
    """``values`` reduced over the processes (each process passes its own). The tensor lives on
    ``accelerator.device``: NCCL, the multi-GPU backend, takes GPU tensors only."""
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    return accelerator.reduce(tensor, reduction=reduction).tolist()


def rng_state() -> dict:
    """The random state a resumed run needs for the same dropout masks: the CPU's, and the current GPU's."""
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state) -> None:
    if isinstance(state, torch.Tensor):  # a checkpoint of duallora 0.1: the CPU's state only
        state = {"cpu": state}
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def bf16_is_native(device: torch.device) -> bool:
    """Whether bfloat16 matmuls have hardware kernels on ``device``: a GPU of compute capability 8.0 or later
    (Ampere), or a CPU with oneDNN's bf16 kernels (AVX-512 or AMX). Elsewhere torch falls back to a slow path."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return True  # other accelerators: nothing measured, so nothing claimed


def bf16_warning(device: torch.device) -> Optional[str]:
    """What to tell a user who asks for bf16 autocast where it has no hardware kernels; None where it has."""
    if bf16_is_native(device):
        return None
    where = (f"this GPU ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
             f"this CPU ({torch.backends.cpu.get_cpu_capability()} instructions)")  # the only other non-native case
    return (f"Warning: bf16 autocast on {where} has no bfloat16 kernels, so torch runs its matmuls on a generic "
            "fallback: measured 17x slower than float32 for MiniLM training on a 2-core AVX2 CPU (25.5 against "
            "1.48 s per step). Train without --bf16 (or `bf16: false`) here, or on a CPU with AVX-512/AMX or a GPU "
            "from Ampere on.")


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def environment() -> dict:
    import accelerate
    import peft
    import transformers

    from .. import __version__

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "accelerate": accelerate.__version__, "duallora": __version__,
            "git_commit": commit, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # AVX2, AVX512, ...: step times depend on it

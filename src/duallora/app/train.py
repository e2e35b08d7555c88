"""The training loop: one method on one model and task, with evaluation, checkpoints, resume and metrics.

Writes into the output directory: the adapter in PEFT format (or the full model for ``full``), ``run_config.json``,
``metrics.json`` (every evaluation, the loss curve, time, peak memory, parameter counts, versions, git commit) and
``training.png``. Checkpoints go to ``checkpoints/step-N``; each is written to a temporary directory and renamed
when complete, so an interrupted run always leaves a usable one.
"""

from __future__ import annotations

import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Optional

import torch

from .data import collate, encode_for_training, epoch_order
from .evaluate import PRIMARY_METRIC, evaluate
from .tasks import Task, load_task

METHODS = ("dual", "d2", "lora", "dora", "full")
# What may change when a run is resumed: its step budget and its evaluation and checkpoint cadence. Anything else
# would make the resumed run another experiment than the one its checkpoint belongs to.
RESUMABLE_OPTIONS = ("max_steps", "epochs", "eval_every", "save_every")
DEFAULT_LR = {"full": 5e-5, "lora": 1e-3, "dora": 1e-3, "dual": 1e-3, "d2": 1e-3}
RUN_FILES = ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "config.json",
             "metrics.json", "run_config.json", "training.png", "checkpoints")


def flag(option: str) -> str:
    """The command-line flag of a RunConfig field (``r`` is ``--rank``: torchrun's parser takes ``--r`` for itself)."""
    return "--rank" if option == "r" else "--" + option.replace("_", "-")


@dataclass
class RunConfig:
    """Everything that defines a run; saved as ``run_config.json`` so that eval and resume can rebuild it."""

    method: str = "dual"
    model: str = "minilm"
    task: str = "sentiment"
    output_dir: str = "runs/dual"
    r: int = 8
    alpha: Optional[float] = None  # None: 2 * r
    lr: Optional[float] = None  # None: DEFAULT_LR[method]
    epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 16
    grad_accum: int = 1
    max_length: int = 128
    seed: int = 0
    bf16: bool = False
    gradient_checkpointing: bool = False
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    lr_warmup_ratio: float = 0.06
    weight_decay: float = 0.0
    target_modules: str = "all-linear"
    dropout: float = 0.0
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = 1000
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    # method options (None: the method's default)
    r1: Optional[int] = None
    r2: Optional[int] = None
    warmup_steps: Optional[int] = None
    ste: Optional[str] = None
    magnitude_activation: Optional[str] = None
    direction_activation: Optional[str] = None
    init_std: Optional[float] = None  # a number; the library also takes "fan_in"
    tau: Optional[float] = None
    norm_axis: Optional[str] = None
    detach_norm: Optional[bool] = None
    weight_grad_dtype: Optional[str] = None

    def validate(self) -> None:
        """Ranges of the run's own flags (the adapter configs check theirs)."""
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; valid: {list(METHODS)}")
        checks = [("--rank", self.r, self.r >= 1, ">= 1"), ("--batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
                  ("--grad-accum", self.grad_accum, self.grad_accum >= 1, ">= 1"),
                  ("--max-length", self.max_length, self.max_length >= 8, ">= 8"),
                  ("--epochs", self.epochs, self.epochs > 0, "> 0"),
                  ("--lr-warmup-ratio", self.lr_warmup_ratio, 0 <= self.lr_warmup_ratio < 1, "in [0, 1)"),
                  ("--dropout", self.dropout, 0 <= self.dropout < 1, "in [0, 1)")]
        for flag, value in (("--lr", self.lr), ("--alpha", self.alpha)):
            if value is not None:
                checks.append((flag, value, value > 0, "> 0"))
        for flag, value in (("--max-steps", self.max_steps), ("--eval-every", self.eval_every),
                            ("--save-every", self.save_every), ("--max-train-examples", self.max_train_examples),
                            ("--max-eval-examples", self.max_eval_examples)):
            if value is not None:
                checks.append((flag, value, value >= 1, ">= 1"))
        for flag, value, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{flag} must be {allowed}; got {value}.")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown run option(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)


def adapter_config(cfg: RunConfig, task_kind: str):
    """The PEFT config of the run's method (None for full fine-tuning)."""
    from peft import LoraConfig

    from .. import D2LoraConfig, DualLoraConfig

    task_type = "SEQ_CLS" if task_kind == "classification" else "CAUSAL_LM"
    alpha = cfg.alpha if cfg.alpha is not None else 2 * cfg.r
    common = dict(r=cfg.r, lora_alpha=alpha, target_modules=cfg.target_modules, lora_dropout=cfg.dropout,
                  task_type=task_type)
    ours = {"weight_grad_dtype": cfg.weight_grad_dtype} if cfg.weight_grad_dtype else {}
    options = {k: v for k, v in asdict(cfg).items() if v is not None}
    pick = lambda names: {k: options[k] for k in names if k in options}  # noqa: E731
    if cfg.method == "dual":
        return DualLoraConfig(**common, **ours, **pick(["r1", "r2", "warmup_steps", "ste", "magnitude_activation",
                                                        "direction_activation", "init_std"]))
    if cfg.method == "d2":
        return D2LoraConfig(**common, **ours, **pick(["tau", "norm_axis", "detach_norm"]))
    if cfg.method in ("lora", "dora"):
        return LoraConfig(use_dora=cfg.method == "dora", **common)
    return None


def load_run_task(cfg: RunConfig, model_is_causal: bool) -> Task:
    task = load_task(cfg.task, text_column=cfg.text_column, label_column=cfg.label_column,
                     text_pair_column=cfg.text_pair_column)
    return task if model_is_causal or task.kind == "classification" else task.as_classification()


def base_parts(cfg: RunConfig, model_path: Optional[Path] = None):
    """The base model (with the head the task needs), tokenizer and task of a run. ``model_path`` overrides where
    the weights come from (a saved full fine-tuning); the tokenizer and task always follow ``cfg``."""
    from transformers import AutoConfig

    from .models import load_model, load_tokenizer, resolve_model

    path = resolve_model(cfg.model)
    causal = any(a.endswith("ForCausalLM") for a in (AutoConfig.from_pretrained(path).architectures or []))
    task = load_run_task(cfg, causal)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(cfg.seed)  # the head and the adapter init depend on the seed only
    model = load_model(model_path or path, task.kind, len(task.label_names or []) or None, tokenizer)
    return model, tokenizer, task


def build(cfg: RunConfig):
    """Model (with the adapter), tokenizer and task of a run."""
    from peft import get_peft_model

    model, tokenizer, task = base_parts(cfg)
    peft_config = adapter_config(cfg, task.kind)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if peft_config is not None:
            model.enable_input_require_grads()
    return model, tokenizer, task


def count_parameters(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def prepare_output_dir(cfg: RunConfig, resume: bool, overwrite: bool, accelerator) -> Path:
    """Check (every process, so that all raise alike) and clear (the main process only) the output directory."""
    out = Path(cfg.output_dir)
    earlier = [name for name in RUN_FILES if (out / name).exists()]
    if earlier and not (resume or overwrite):
        raise FileExistsError(
            f"{out} holds an earlier run ({', '.join(earlier)}). Pass --resume to continue it or --overwrite to "
            "replace it."
        )
    if accelerator.is_main_process:
        if overwrite and not resume:
            for name in earlier:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    return out


def make_accelerator(grad_accum: int):
    """The accelerate state of this process. Launched as several processes on a machine without an accelerator
    (``torchrun``/``accelerate launch`` on CPUs), accelerate needs ``cpu=True`` to set up its gloo process group."""
    from accelerate import Accelerator

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(gradient_accumulation_steps=grad_accum, cpu=several and not torch.cuda.is_available())


def latest_checkpoint(out: Path) -> Optional[Path]:
    complete = sorted((out / "checkpoints").glob("step-*/trainer_state.pt"))
    return complete[-1].parent if complete else None


def saved_run_config(output_dir) -> Optional[dict]:
    """The options of the run in ``output_dir`` (its ``run_config.json``), or None if there is none."""
    path = Path(output_dir) / "run_config.json"
    return json.loads(path.read_text()) if path.exists() else None


def resumed_config(cfg: RunConfig, saved: dict) -> tuple[RunConfig, list[str]]:
    """The configuration a resumed run continues with: the saved one, with the options of ``RESUMABLE_OPTIONS``
    taken from ``cfg`` where they differ (and named in the returned notes). Any other difference is refused by name:
    the checkpoint belongs to the saved options."""
    saved_cfg = RunConfig.from_dict({**saved, "output_dir": cfg.output_dir})
    changed = [f.name for f in fields(RunConfig) if getattr(cfg, f.name) != getattr(saved_cfg, f.name)]
    refused = [name for name in changed if name not in RESUMABLE_OPTIONS]
    if refused:
        listed = ", ".join(f"{flag(n)} {getattr(cfg, n)!r} (the run has {getattr(saved_cfg, n)!r})" for n in refused)
        raise ValueError(
            f"--resume continues the run in {cfg.output_dir} with the options it was started with; these differ: "
            f"{listed}. Only {', '.join(flag(n) for n in RESUMABLE_OPTIONS)} may change on resume. Drop the "
            "others, or start another run (a new --output-dir, or --overwrite)."
        )
    notes = [f"{flag(n)} {getattr(saved_cfg, n)} -> {getattr(cfg, n)}" for n in changed]
    return RunConfig.from_dict({**asdict(saved_cfg), **{n: getattr(cfg, n) for n in changed}}), notes


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


def atomic_write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def publish_weights(model, out: Path, state_dict: Optional[dict] = None) -> None:
    """Put the final weights (the adapter in PEFT format, or the full model) into the output directory, each file
    written under a temporary name first and renamed into place."""
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".final-"))
    try:
        model.save_pretrained(staging, state_dict=state_dict)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


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
            "git_commit": commit, "threads": torch.get_num_threads()}


def peak_memory_mib() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, progress: bool = True,
          on_step: Optional[Callable[[int, torch.nn.Module], None]] = None) -> dict:
    """Run one fine-tuning; returns the metrics also written to ``metrics.json``. ``on_step(step, model)`` is
    called after every optimizer step (with the prepared model).

    Under ``torchrun``/``accelerate launch`` every process runs this with the same arguments: each takes its slice
    of every global batch, gradients are averaged by accelerate (DDP, FSDP), the losses and costs are reduced
    across processes, and only the main process writes files and shows progress."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    cfg.validate()
    saved = saved_run_config(cfg.output_dir) if resume else None
    resume_notes = []
    if saved is not None:
        cfg, resume_notes = resumed_config(cfg, saved)
    # bf16 through torch.autocast below rather than accelerate's mixed_precision, which is fixed once per process
    # (a second in-process run with another setting would be refused)
    accelerator = make_accelerator(cfg.grad_accum)
    out = prepare_output_dir(cfg, resume, overwrite, accelerator)
    model, tokenizer, task = build(cfg)
    train_examples = task.train[: cfg.max_train_examples]
    eval_examples = task.validation[: cfg.max_eval_examples]
    # --batch-size is per process: a micro-step reads one global batch and each process takes its slice of it, so
    # n processes x b see exactly the examples of 1 process x n b. The last partial batch is dropped: one shape.
    global_batch = cfg.batch_size * accelerator.num_processes
    batches_per_epoch = len(train_examples) // global_batch
    if batches_per_epoch == 0:
        raise ValueError(f"The global batch ({cfg.batch_size} per process x {accelerator.num_processes} processes) is "
                         f"larger than the {len(train_examples)} training examples: lower --batch-size.")
    steps_per_epoch = max(1, batches_per_epoch // cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                                  weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.lr_warmup_ratio * total_steps), total_steps)
    # the scheduler stays ours: accelerate's wrapper steps it once per process per step (it assumes per-process
    # step counts), while total_steps here counts global optimizer steps
    model, optimizer = accelerator.prepare(model, optimizer)
    if accelerator.distributed_type.name == "FSDP" and (cfg.save_every or resume):
        raise ValueError("Checkpoints (--save-every, --resume) are not supported under FSDP yet: the optimizer state "
                         "is sharded across processes. Train without them, or use DDP.")

    state = {"step": 0, "micro_batch": 0, "losses": [], "evaluations": [], "train_seconds": 0.0, "eval_seconds": 0.0}
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and accelerator.is_main_process:
        where = f"from {checkpoint}" if checkpoint else f"from step 0: no checkpoint in {out / 'checkpoints'}"
        changes = f", with {'; '.join(resume_notes)}" if resume_notes else ""
        print(f"--resume: continuing {out} {where}{changes}.", file=sys.stderr)
    if checkpoint is not None:
        unwrapped = accelerator.unwrap_model(model)
        weights = load_file(checkpoint / ("adapter_model.safetensors" if cfg.method != "full" else "model.safetensors"))
        if cfg.method == "full":
            unwrapped.load_state_dict(weights, strict=False)
        else:
            set_peft_model_state_dict(unwrapped, weights)
        saved_state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        optimizer.load_state_dict(saved_state["optimizer"])
        scheduler.load_state_dict(saved_state["scheduler"])  # a new step budget: the schedule follows the new total
        set_rng_state(saved_state["rng"])
        state = saved_state["state"]
    if accelerator.is_main_process:
        atomic_write_text(out / "run_config.json", json.dumps(asdict(cfg), indent=2))

    trainable, total = count_parameters(model)
    if accelerator.is_main_process and progress:
        print(f"{cfg.method} on {cfg.model} / {task.name}: {trainable:,} trainable of {total:,} parameters, "
              f"{len(train_examples)} train / {len(eval_examples)} validation / {len(task.test)} test examples, "
              f"{total_steps} steps", file=sys.stderr)

    def save_checkpoint():
        weights = accelerator.get_state_dict(model)  # gathered under FSDP: every process must call it

        def write(tmp: Path):
            accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=weights)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "rng": rng_state(), "state": state}, tmp / "trainer_state.pt")
        if accelerator.is_main_process:
            atomic_dir(out / "checkpoints" / f"step-{state['step']:07d}", write)
            for old in sorted((out / "checkpoints").glob("step-*"))[:-1]:
                shutil.rmtree(old)  # keep the newest complete checkpoint only

    def run_eval():
        started = time.perf_counter()
        scores = evaluate(accelerator.unwrap_model(model), tokenizer, task, eval_examples, cfg.max_length,
                          accelerator=accelerator)
        state["eval_seconds"] = state["eval_seconds"] + time.perf_counter() - started
        state["evaluations"].append({"step": state["step"], "split": "validation", **scores})
        model.train()
        return scores

    bar = tqdm(total=total_steps, initial=state["step"], desc=f"{cfg.method}", unit="step",
               mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not every step
               disable=not (progress and accelerator.is_main_process))
    model.train()
    start = time.perf_counter() - state["train_seconds"] - state["eval_seconds"]
    running_loss = 0.0
    try:
        while state["step"] < total_steps:
            epoch, index = divmod(state["micro_batch"], batches_per_epoch)
            order = epoch_order(len(train_examples), cfg.seed, epoch)
            first = index * global_batch + accelerator.process_index * cfg.batch_size
            chunk = [train_examples[i] for i in order[first:first + cfg.batch_size]]
            batch = collate([encode_for_training(task, tokenizer, e, cfg.max_length) for e in chunk],
                            tokenizer.pad_token_id)
            with accelerator.accumulate(model):
                with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss = model(**{k: v.to(accelerator.device) for k, v in batch.items()}).loss
                accelerator.backward(loss)
                optimizer.step()  # accelerate's optimizer skips the steps between accumulation boundaries
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state["micro_batch"] += 1
            running_loss += loss.item() / cfg.grad_accum
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            running_loss = reduce_across_processes(accelerator, [running_loss], "mean")[0]  # all processes
            state["losses"].append(running_loss)
            bar.set_postfix(loss=f"{running_loss:.4f}", refresh=False)  # drawn at the bar's own pace
            bar.update(1)
            running_loss = 0.0
            state["train_seconds"] = time.perf_counter() - start - state["eval_seconds"]
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < total_steps:
                scores = run_eval()
                if accelerator.is_main_process:
                    bar.write(f"step {state['step']}: validation {_fmt(scores)}")
            if cfg.save_every and (state["step"] % cfg.save_every == 0 or state["step"] == total_steps):
                save_checkpoint()  # the last one too: a resume with a larger --max-steps goes on from the end
            if on_step is not None:
                on_step(state["step"], model)
    except KeyboardInterrupt:
        bar.close()
        last = latest_checkpoint(out)
        where = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
        if accelerator.is_main_process:
            print(f"\nInterrupted at step {state['step']}; {where}. Continue with the same command plus --resume.",
                  file=sys.stderr)
        raise
    bar.close()
    state["train_seconds"] = time.perf_counter() - start - state["eval_seconds"]  # optimisation only

    validation = run_eval()
    test_examples = task.test[: cfg.max_eval_examples]
    test_scores = evaluate(accelerator.unwrap_model(model), tokenizer, task, test_examples, cfg.max_length,
                           accelerator=accelerator)
    train_seconds, peak_mib = reduce_across_processes(accelerator, [state["train_seconds"], peak_memory_mib()],
                                                      "max")  # the slowest and the largest process
    metrics = {
        "method": cfg.method, "model": cfg.model, "task": task.name, "task_kind": task.kind,
        "primary_metric": PRIMARY_METRIC[task.kind], "test": test_scores, "validation": validation,
        "evaluations": state["evaluations"], "losses": state["losses"], "steps": state["step"],
        "train_seconds": train_seconds, "peak_memory_mib": peak_mib,
        "processes": accelerator.num_processes, "global_batch_size": global_batch * cfg.grad_accum,
        "trainable_params": trainable, "total_params": total,
        "test_examples": len(test_examples),  # the report weighs a score against the majority class by it
        "majority_baseline": majority_baseline(task, test_examples),
        "config": asdict(cfg), "environment": environment(),
    }
    weights = accelerator.get_state_dict(model)  # gathered under FSDP: every process must call it
    if accelerator.is_main_process:
        publish_weights(accelerator.unwrap_model(model), out, weights)
        atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
        plot_training(metrics, out / "training.png")
    return metrics


def _fmt(scores: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))


def majority_baseline(task: Task, examples: list) -> Optional[float]:
    """Accuracy of always answering the most frequent label of ``examples`` (None for generation; for multiple
    choice, the most frequent position of the right choice)."""
    if task.kind == "generation" or not examples:
        return None
    counts: dict[int, int] = {}
    for e in examples:
        counts[e.label] = counts.get(e.label, 0) + 1
    return max(counts.values()) / len(examples)


def plot_training(metrics: dict, path: Path) -> None:
    """Loss per step and the validation score at each evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    losses = metrics["losses"]
    ax.plot(range(1, len(losses) + 1), losses, color="tab:blue", alpha=0.4, label="loss")
    window = max(1, len(losses) // 20)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    ax.plot(range(1, len(losses) + 1), smooth, color="tab:blue", label=f"loss ({window}-step mean)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss")
    metric = metrics["primary_metric"]
    evals = [(e["step"], e[metric]) for e in metrics["evaluations"] if metric in e]
    if evals:
        ax2 = ax.twinx()
        ax2.plot(*zip(*evals), "o-", color="tab:orange", label=f"validation {metric}")
        ax2.set_ylabel(f"validation {metric}")
        ax2.legend(loc="upper right")
    ax.legend(loc="upper left")
    ax.set_title(f"{metrics['method']} on {metrics['model']} / {metrics['task']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_trained(run_dir: str | Path, task: Optional[str] = None):
    """Model (base + saved adapter, or the saved full model), tokenizer, task and config of a finished run."""
    from peft import PeftModel

    run_dir = Path(run_dir)
    if not (run_dir / "run_config.json").exists():
        raise FileNotFoundError(f"{run_dir} has no run_config.json: is it the output directory of `duallora train`?")
    cfg = RunConfig.from_dict(json.loads((run_dir / "run_config.json").read_text()))
    if task is not None:
        cfg = RunConfig.from_dict({**asdict(cfg), "task": task})
    if cfg.method == "full":
        model, tokenizer, run_task = base_parts(cfg, model_path=run_dir)
        return model, tokenizer, run_task, cfg
    model, tokenizer, run_task = base_parts(cfg)
    return PeftModel.from_pretrained(model, run_dir), tokenizer, run_task, cfg

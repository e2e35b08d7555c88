"""What defines a run: its options (:class:`RunConfig`, one command-line flag each, saved as ``run_config.json``),
the PEFT config of its method, and which options a resumed run may change."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

# lora, loraplus (LoRA+: LoRA with a 16x learning rate on B), dora and hira (HiRA: W0 * (BA), full rank) are peft's
METHODS = ("dual", "d2", "lora", "loraplus", "dora", "hira", "full")
ADAPTER_METHODS = tuple(m for m in METHODS if m != "full")
PARAMETER_METHODS = ("dual", "d2", "lora", "loraplus")  # those that take target_parameters
QUANTIZATIONS = ("4bit", "8bit")
# the learning-rate schedule after its linear warm-up, by transformers' scheduler names
LR_SCHEDULERS = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


# What may change when a run is resumed: its step budget and its evaluation and checkpoint cadence. Anything else
# would make the resumed run another experiment than the one its checkpoint belongs to.
RESUMABLE_OPTIONS = ("max_steps", "epochs", "eval_every", "save_every", "report_to")

# Experiment trackers (--report-to), by the names accelerate (the training loop) and transformers' Trainer (SFT runs)
# both use, each with the packages that provide it
TRACKERS = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",), "mlflow": ("mlflow",),
            "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",), "trackio": ("trackio",),
            "swanlab": ("swanlab",)}


DEFAULT_LR = {"full": 5e-5, **{method: 1e-3 for method in ADAPTER_METHODS}}
# LoRA+'s ratio of B's learning rate to A's: the paper's recommended 2^4 (arXiv 2402.12354, section 4)
DEFAULT_LORAPLUS_LR_RATIO = 16.0


def flag(option: str) -> str:
    """The command-line flag of a RunConfig field (``r`` is ``--rank``: torchrun's parser takes ``--r`` for itself)."""
    return "--rank" if option == "r" else "--" + option.replace("_", "-")


@dataclass
class RunConfig:
    """Everything that defines a run; saved as ``run_config.json`` so that eval and resume can rebuild it."""

    method: str = "dual"
    model: str = "minilm"
    task: str = "rated-sentiment"
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
    quantize: Optional[str] = None  # "4bit" (NF4, QLoRA's) or "8bit" (LLM.int8()): the frozen base, with bitsandbytes
    eval_every: Optional[int] = None
    save_every: Optional[int] = None
    keep_best: bool = False  # the adapter of the best validation score among the evaluations, not the last one
    lr_warmup_ratio: float = 0.06
    lr_scheduler: str = "linear"  # after the warm-up: "linear" decay to 0, "cosine" decay to 0, or "constant"
    report_to: Optional[str] = None  # experiment trackers, comma-separated (TRACKERS); their logs in <output>/logs
    weight_decay: float = 0.0
    target_modules: str = "all-linear"
    target_parameters: Optional[str] = None  # comma-separated on the command line; a list in a config file
    dropout: float = 0.0
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = 1000
    text_column: Optional[str] = None
    text_pair_column: Optional[str] = None
    label_column: Optional[str] = None
    # instruction and chat data (SFT: a data file without --label-column, on a causal LM)
    eval_file: Optional[str] = None  # None: a share of the training file is held out
    packing: bool = False
    all_tokens: bool = False  # the loss on every token, not only the completion
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
    loraplus_lr_ratio: Optional[float] = None  # LoRA+ only; None: DEFAULT_LORAPLUS_LR_RATIO

    def validate(self) -> None:
        """Ranges of the run's own flags (the adapter configs check theirs)."""
        if self.method not in METHODS:
            raise ValueError(f"Unknown method {self.method!r}; valid: {list(METHODS)}")
        if self.quantize is not None and self.quantize not in QUANTIZATIONS:
            raise ValueError(f"--quantize must be one of {list(QUANTIZATIONS)}; got {self.quantize!r}.")
        if self.quantize is not None and self.method == "full":
            raise ValueError("--quantize freezes the base in 4 or 8 bits, which full fine-tuning would train: choose "
                             f"an adapter method ({', '.join(ADAPTER_METHODS)}) or drop --quantize.")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise ValueError(f"--lr-scheduler must be one of {list(LR_SCHEDULERS)}; got {self.lr_scheduler!r}.")
        check_trackers(self.trackers)
        if self.keep_best and self.method == "full":
            raise ValueError("--keep-best keeps the best adapter; full fine-tuning has none: use an adapter method, "
                             "or --save-every to keep checkpoints of the whole model.")
        if self.keep_best and self.eval_every is None:
            raise ValueError("--keep-best keeps the adapter of the best of the run's evaluations: give --eval-every N "
                             "so that there are several to choose from.")
        if self.loraplus_lr_ratio is not None and self.method != "loraplus":
            raise ValueError(f"--loraplus-lr-ratio sets LoRA+'s learning rate of B; --method is {self.method!r}. "
                             "Use --method loraplus, or drop the flag.")
        if self.target_parameters is not None and self.method not in PARAMETER_METHODS:
            raise ValueError(f"--target-parameters adapts parameters such as MoE expert stacks, which --method "
                             f"{self.method} cannot (peft's DoRA and HiRA adapt Linear layers only): choose one of "
                             f"{', '.join(PARAMETER_METHODS)}, or drop --target-parameters.")
        checks = [("--rank", self.r, self.r >= 1, ">= 1"),
                  ("--batch-size", self.batch_size, self.batch_size >= 1, ">= 1"),
                  ("--grad-accum", self.grad_accum, self.grad_accum >= 1, ">= 1"),
                  ("--max-length", self.max_length, self.max_length >= 8, ">= 8"),
                  ("--epochs", self.epochs, self.epochs > 0, "> 0"),
                  ("--lr-warmup-ratio", self.lr_warmup_ratio, 0 <= self.lr_warmup_ratio < 1, "in [0, 1)"),
                  ("--dropout", self.dropout, 0 <= self.dropout < 1, "in [0, 1)")]
        for flag, value in (("--lr", self.lr), ("--alpha", self.alpha),
                            ("--loraplus-lr-ratio", self.loraplus_lr_ratio)):
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
    def parameter_targets(self) -> Optional[list[str]]:
        """``target_parameters`` as a list (the flag is comma-separated)."""
        value = self.target_parameters
        if value is None or isinstance(value, list):
            return value
        return [name.strip() for name in value.split(",") if name.strip()]

    @property
    def trackers(self) -> list[str]:
        """``report_to`` as a list (the flag is comma-separated)."""
        value = self.report_to or []
        return value if isinstance(value, list) else [name.strip() for name in value.split(",") if name.strip()]

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.method]

    @property
    def lr_ratio(self) -> float:
        """LoRA+'s learning rate of the B factors over that of the A factors."""
        return self.loraplus_lr_ratio if self.loraplus_lr_ratio is not None else DEFAULT_LORAPLUS_LR_RATIO

    @classmethod
    def from_dict(cls, values: dict) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"Unknown run option(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)


def command_line(cfg: RunConfig) -> str:
    """The ``duallora train`` command that makes this run again: a flag for every option that differs from its
    default (``none`` for an option set to None whose default is a value, as the command line reads it)."""
    import shlex

    parts = ["duallora", "train"]
    for f in fields(RunConfig):
        value = getattr(cfg, f.name)
        if value == f.default:
            continue
        if value is None:
            parts += [flag(f.name), "none"]
        elif isinstance(value, bool):
            parts.append(flag(f.name) if value else "--no-" + flag(f.name)[2:])
        elif isinstance(value, list):
            parts += [flag(f.name), ",".join(map(str, value))]
        else:
            parts += [flag(f.name), format(value, "g") if isinstance(value, float) else str(value)]
    return shlex.join(parts)


def check_trackers(names: list[str]) -> None:
    """Every ``--report-to`` name known and its package installed, before anything is loaded or written (accelerate
    would drop a tracker whose package is missing with no more than a log line)."""
    import importlib.util

    unknown = [name for name in names if name not in TRACKERS]
    if unknown:
        raise ValueError(f"--report-to: unknown tracker(s) {unknown}; known: {', '.join(TRACKERS)}.")
    for name in names:
        if not any(importlib.util.find_spec(package) for package in TRACKERS[name]):
            hint = "pip install 'duallora[trackers]' (tensorboardX)" if name == "tensorboard" else \
                f"pip install {TRACKERS[name][0]}"
            raise ValueError(f"--report-to {name} needs the {' or '.join(TRACKERS[name])} package, which is not "
                             f"installed: {hint}.")


def tracker_config(cfg: RunConfig) -> dict:
    """The run's options as a tracker's hyperparameters: the set ones (TensorBoard takes numbers, text and flags)."""
    return {key: value for key, value in asdict(cfg).items() if isinstance(value, (int, float, str, bool))}


def adapter_config(cfg: RunConfig, task_kind: str):
    """The PEFT config of the run's method (None for full fine-tuning). LoRA+ is LoRA's adapter trained with
    :func:`optimizer`'s learning rates; HiRA takes no alpha (its update ``W0 * (BA)`` is not scaled)."""
    from peft import HiraConfig, LoraConfig

    from .. import D2LoraConfig, DualLoraConfig

    task_type = "SEQ_CLS" if task_kind == "classification" else "CAUSAL_LM"
    alpha = cfg.alpha if cfg.alpha is not None else 2 * cfg.r
    common = dict(r=cfg.r, lora_alpha=alpha, target_modules=cfg.target_modules, lora_dropout=cfg.dropout,
                  task_type=task_type, target_parameters=cfg.parameter_targets)
    ours = {"weight_grad_dtype": cfg.weight_grad_dtype} if cfg.weight_grad_dtype else {}
    options = {k: v for k, v in asdict(cfg).items() if v is not None}
    pick = lambda names: {k: options[k] for k in names if k in options}  # noqa: E731
    if cfg.method == "dual":
        return DualLoraConfig(**common, **ours, **pick(["r1", "r2", "warmup_steps", "ste", "magnitude_activation",
                                                        "direction_activation", "init_std"]))
    if cfg.method == "d2":
        return D2LoraConfig(**common, **ours, **pick(["tau", "norm_axis", "detach_norm"]))
    if cfg.method in ("lora", "loraplus", "dora"):
        if cfg.method == "dora":
            common.pop("target_parameters")  # validate() refused it
        return LoraConfig(use_dora=cfg.method == "dora", **common)
    if cfg.method == "hira":
        return HiraConfig(r=cfg.r, target_modules=cfg.target_modules, hira_dropout=cfg.dropout, task_type=task_type)
    return None


def optimizer(model, method: str, lr: float, weight_decay: float = 0.0,
              loraplus_lr_ratio: float = DEFAULT_LORAPLUS_LR_RATIO):
    """AdamW over the trainable parameters; for LoRA+, peft's ``create_loraplus_optimizer``: B (and 1-d
    parameters) at ``loraplus_lr_ratio`` times the learning rate of A and the rest."""
    import torch

    if method == "loraplus":
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(model, torch.optim.AdamW, lr=lr, loraplus_lr_ratio=loraplus_lr_ratio,
                                         loraplus_weight_decay=weight_decay)
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)


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

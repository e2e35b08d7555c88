"""Supervised fine-tuning from the command line: ``duallora train --task FILE`` on a causal LM with an instruction or
chat file (:mod:`.tasks.chat` lists the formats) and no ``--label-column``.

TRL's ``SFTTrainer`` does what it already does well: the tokenizer's chat template, the loss on the completion (or on
every token), packing, truncation, the loop, the schedule and evaluation. This module reads the file, sets TRL up
from the run's flags, and writes the run folder as every ``duallora train`` does (adapter, ``run_config.json``,
``metrics.json``, ``training.png``), with a few greedy generations on validation prompts (``generations.jsonl``).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..dual.callback import DualLoraWarmupCallback
from .generate import reply
from .process import environment, peak_memory_mib
from .run_config import DEFAULT_LR, LR_SCHEDULERS, RunConfig, adapter_config
from .run_files import atomic_write_text, check_output_dir, prepare_output_dir, publish_weights
from .tasks import Task
from .tasks.chat import FORMATS, SFT_DATASETS, detect_format, held_out, sft_records
from .tasks.files import SUFFIXES, read_rows

GENERATIONS = 3  # validation prompts answered greedily at the end of a run
ONLY_AT_THE_END = 2**31 - 1  # an evaluation interval no run reaches: the Trainer still evaluates its last step


def is_sft_run(cfg: RunConfig) -> bool:
    """A named instruction data set, or a local data file without ``--label-column``: instruction or chat data."""
    path = Path(cfg.task)
    return cfg.task in SFT_DATASETS or (cfg.label_column is None and path.suffix.lower() in SUFFIXES
                                        and path.is_file())


def sft_task(cfg: RunConfig) -> Task:
    """The run's task for what only needs its kind (loading the model of a finished run: merge, generate)."""
    return Task(task_label(cfg), "sft", [], [], [])


def task_label(cfg: RunConfig) -> str:
    return cfg.task if cfg.task in SFT_DATASETS else Path(cfg.task).name


def read_sft_data(cfg: RunConfig) -> tuple[str, list[dict], list[dict]]:
    """The format and the train and validation records (``--eval-file``, or held out from the file)."""
    path = SFT_DATASETS[cfg.task].path() if cfg.task in SFT_DATASETS else Path(cfg.task)
    rows = read_rows(path)
    fmt = detect_format(rows, str(path))
    records = sft_records(rows, fmt, str(path))
    if cfg.eval_file is None:
        train, validation = held_out(records)
        return fmt, train, validation[: cfg.max_eval_examples]
    eval_path = Path(cfg.eval_file)
    if not eval_path.is_file():
        raise ValueError(f"No such file: {cfg.eval_file!r} (from --eval-file).")
    eval_rows = read_rows(eval_path)
    eval_fmt = detect_format(eval_rows, str(eval_path))
    if (eval_fmt == "text") != (fmt == "text"):
        raise ValueError(f"--eval-file {eval_path} is {eval_fmt} data, the training file {fmt}: validate on data "
                         "of the same kind.")
    return fmt, records, sft_records(eval_rows, eval_fmt, str(eval_path))[: cfg.max_eval_examples]


def full_text_lengths(tokenizer, records: list[dict]) -> list[int]:
    """Tokens of each record as the model sees it (the chat template applied to a conversational one)."""
    lengths = []
    for record in records:
        if "text" in record:
            lengths.append(len(tokenizer(record["text"])["input_ids"]))
        elif isinstance(record["prompt"], list):
            ids = tokenizer.apply_chat_template(record["prompt"] + record["completion"], tokenize=True,
                                                return_dict=True)["input_ids"]
            lengths.append(len(ids))
        else:
            lengths.append(len(tokenizer(record["prompt"] + record["completion"])["input_ids"]))
    return lengths


def train_sft(cfg: RunConfig, resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict:
    """One SFT run; returns the metrics also written to ``metrics.json``. Nothing is written before the data, the
    model and the adapter settings have been checked."""
    from datasets import Dataset
    from transformers import AutoConfig, AutoModelForCausalLM
    from trl import SFTConfig, SFTTrainer

    from .models import load_tokenizer, resolve_model

    cfg.validate()
    if resume:
        raise ValueError("--resume is not supported for SFT runs yet: start again (--overwrite).")
    if cfg.method == "loraplus":
        raise ValueError("--method loraplus is not supported for SFT runs yet (its optimizer groups); use lora, "
                         "dual, d2, dora, hira or full.")
    fmt, train_records, eval_records = read_sft_data(cfg)
    check_output_dir(cfg, resume, overwrite)
    path = resolve_model(cfg.model)
    if not any(a.endswith("ForCausalLM") for a in (AutoConfig.from_pretrained(path).architectures or [])):
        raise ValueError(f"SFT on {task_label(cfg)} needs a causal language model (e.g. --model smollm2); "
                         f"{cfg.model} is not one. For a classifier, name --text-column and --label-column.")
    tokenizer = load_tokenizer(path)
    conversational = fmt != "text" and isinstance(train_records[0]["prompt"], list)
    if conversational and not tokenizer.chat_template:
        raise ValueError(f"{cfg.model}'s tokenizer has no chat template, which {fmt} data needs: use a chat model "
                         "(--model smollm2), or a prompt-completion file of plain text.")
    if tokenizer.eos_token is None:
        raise ValueError(f"{cfg.model}'s tokenizer has no end-of-sequence token, which SFT appends to each example so "
                         "that the model learns to stop: use a causal LM's tokenizer (--model smollm2).")
    lengths = full_text_lengths(tokenizer, train_records)
    truncated = sum(n > cfg.max_length for n in lengths)
    loss_on = "every token" if fmt == "text" or cfg.all_tokens else "the completion (the answer) only"
    print(f"SFT on {task_label(cfg)}: {fmt} data ({FORMATS[fmt]}), {len(train_records)} train / "
          f"{len(eval_records)} validation examples; {truncated} longer than --max-length {cfg.max_length} tokens "
          f"are truncated; loss on {loss_on}{'; packed' if cfg.packing else ''}.", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_pretrained(path)
    scratch = tempfile.TemporaryDirectory(prefix="duallora-sft-")  # TRL's own folder: nothing of it is kept
    args = SFTConfig(
        output_dir=scratch.name, max_steps=cfg.max_steps or -1, num_train_epochs=cfg.epochs,
        per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum, learning_rate=cfg.lr or DEFAULT_LR[cfg.method],
        lr_scheduler_type=LR_SCHEDULERS[cfg.lr_scheduler], warmup_steps=cfg.lr_warmup_ratio,
        weight_decay=cfg.weight_decay, max_length=cfg.max_length, packing=cfg.packing,
        completion_only_loss=None if fmt == "text" else not cfg.all_tokens,
        # the Trainer evaluates every --eval-every steps and at the last step, so the final score is in its log (and
        # its trackers') with the others; without --eval-every only at the last step
        eval_strategy="steps", eval_steps=cfg.eval_every or ONLY_AT_THE_END,
        # --keep-best: a checkpoint (in the scratch folder) at each evaluation, the best one loaded at the end
        save_strategy="steps" if cfg.keep_best else "no", save_steps=cfg.eval_every or ONLY_AT_THE_END,
        save_total_limit=1, load_best_model_at_end=cfg.keep_best, metric_for_best_model="loss",
        greater_is_better=False, logging_steps=1,
        report_to=[name for name in cfg.trackers if name != "tensorboard"] or "none",  # tensorboard: below
        seed=cfg.seed, bf16=cfg.bf16, use_cpu=not torch.cuda.is_available(),
        gradient_checkpointing=cfg.gradient_checkpointing, disable_tqdm=not progress,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(train_records),
                         eval_dataset=Dataset.from_list(eval_records), processing_class=tokenizer,
                         peft_config=adapter_config(cfg, "sft"),
                         callbacks=[DualLoraWarmupCallback(),  # warmup_steps="auto": a tenth of the run
                                    *tensorboard(cfg, Path(scratch.name) / "logs")])
    base = trainer.evaluate()["eval_loss"]  # a fresh adapter is the base model (dW = 0 at the start)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    history = trainer.state.log_history
    # by step: a run of N --eval-every evaluates at its last step once
    evaluations = [{"step": step, "loss": loss} for step, loss in
                   {h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}.items()]
    kept = min(evaluations, key=lambda e: e["loss"]) if cfg.keep_best else evaluations[-1]
    final = kept["loss"]
    model = trainer.model.eval()
    generations = [{"prompt": r["prompt"], "reference": r["completion"],
                    "generated": reply(model, tokenizer, r["prompt"], max_new_tokens=64)}
                   for r in eval_records[:GENERATIONS] if "prompt" in r]
    metrics = {
        "method": cfg.method, "model": cfg.model, "task": task_label(cfg), "task_kind": "sft", "format": fmt,
        "primary_metric": "loss", "test": {},
        "validation": {"loss": final, "perplexity": math.exp(min(final, 50.0))},
        "base_validation": {"loss": base, "perplexity": math.exp(min(base, 50.0))},
        "evaluations": evaluations, "kept_step": kept["step"],  # the adapter's step: the last, or the best's
        "losses": [h["loss"] for h in history if "loss" in h], "steps": trainer.state.global_step,
        "dual_warmup_steps": dual_warmup_steps(trainer.model), "train_examples": len(train_records),
        "validation_examples": len(eval_records), "truncated": truncated,
        "train_seconds": train_seconds, "peak_memory_mib": peak_memory_mib(), "config": asdict(cfg),
        "environment": environment(),
    }
    out = prepare_output_dir(cfg, resume, overwrite, _MainProcess())
    publish_weights(trainer.model, out)
    atomic_write_text(out / "run_config.json", json.dumps(asdict(cfg), indent=2))
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    atomic_write_text(out / "generations.jsonl", "".join(json.dumps(g, ensure_ascii=False) + "\n"
                                                         for g in generations))
    from .train import plot_training

    plot_training(metrics, out / "training.png")
    if (Path(scratch.name) / "logs").is_dir():  # --report-to tensorboard: the event files, kept
        shutil.copytree(Path(scratch.name) / "logs", out / "logs", dirs_exist_ok=True)
    scratch.cleanup()
    return metrics


def tensorboard(cfg: RunConfig, logs: Path) -> list:
    """--report-to tensorboard: transformers' own callback, writing into ``logs`` from the first log on. Left to
    report_to, its writer would open at the base model's evaluation, before training tells it its folder, in
    ``./runs`` of the working directory."""
    if "tensorboard" not in cfg.trackers:
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(logs)  # what the TENSORBOARD_LOGGING_DIR variable would set, for this run only
    return [callback]


def dual_warmup_steps(model) -> int | None:
    """The Dual LoRA warm-up the run trained with (fitted to its length at the start), None for other methods."""
    config = model.peft_config.get("default") if hasattr(model, "peft_config") else None
    return getattr(config, "warmup_steps", None)


class _MainProcess:
    """What ``prepare_output_dir`` asks of an accelerator: an SFT run is one process (TRL's own launch aside)."""

    is_main_process = True

    def wait_for_everyone(self) -> None:
        pass

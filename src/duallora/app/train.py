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
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Optional

import torch

from ..dual.warmup import fit_warmup_to_run, set_warmup_length
from .data import collate, encode_for_training, epoch_order
from .evaluate import PRIMARY_METRIC, evaluate
from .process import (
    bf16_warning,
    environment,
    make_accelerator,
    peak_memory_mib,
    reduce_across_processes,
    rng_state,
    set_rng_state,
)
from .run_config import (LR_SCHEDULERS, RunConfig, adapter_config, resumed_config, saved_run_config,
                         tracker_config)
from .run_config import optimizer as make_optimizer
from .run_files import (atomic_dir, atomic_write_text, check_output_dir, latest_checkpoint, prepare_output_dir,
                        publish_weights)
from .tasks import Task, baseline_rates, load_task, majority_baseline


def load_run_task(cfg: RunConfig) -> Task:
    from .sft import is_sft_run, sft_task

    if is_sft_run(cfg):
        return sft_task(cfg)
    return load_task(cfg.task, text_column=cfg.text_column, label_column=cfg.label_column,
                     text_pair_column=cfg.text_pair_column)


def task_for_model(task: Task, model_is_causal: bool) -> Task:
    """An encoder has no language-model head: a yes/no multiple-choice task becomes classification for it."""
    return task if model_is_causal or task.kind == "classification" else task.as_classification()


def base_parts(cfg: RunConfig, model_path: Optional[Path] = None, task: Optional[Task] = None):
    """The base model (with the head the task needs), tokenizer and task of a run. ``model_path`` overrides where
    the weights come from (a saved full fine-tuning); the tokenizer and task always follow ``cfg`` (``task``: the
    run's task, read already)."""
    from transformers import AutoConfig

    from .models import load_model, load_tokenizer, quantization_config, resolve_model

    task = task or load_run_task(cfg)  # first: a missing data source stops before a model is converted or loaded
    path = resolve_model(cfg.model)
    causal = any(a.endswith("ForCausalLM") for a in (AutoConfig.from_pretrained(path).architectures or []))
    task = task_for_model(task, causal)
    tokenizer = load_tokenizer(path)
    torch.manual_seed(cfg.seed)  # the head and the adapter init depend on the seed only
    quantization = quantization_config(cfg.quantize, torch.bfloat16 if cfg.bf16 else torch.float32)
    model = load_model(model_path or path, task.kind, task.label_names, tokenizer, quantization)
    return model, tokenizer, task


def build(cfg: RunConfig, task: Optional[Task] = None):
    """Model (with the adapter), tokenizer and task of a run."""
    from peft import get_peft_model

    from peft import prepare_model_for_kbit_training

    model, tokenizer, task = base_parts(cfg, task=task)
    peft_config = adapter_config(cfg, task.kind)
    if cfg.quantize is not None:
        # QLoRA's recipe: the layers that stay unquantized (norms, embeddings, head) in float32 for stable training;
        # checkpointing is switched on below, as for any run
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if peft_config is not None:
        model = get_peft_model(model, peft_config)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if peft_config is not None:
            model.enable_input_require_grads()
    return model, tokenizer, task


# DeepSpeed's own checkpoint inside a run's checkpoint directory (each process's optimizer partition, and under
# ZeRO-3 the weights' partitions), under a fixed tag so that a resume finds it without DeepSpeed's "latest" file
DEEPSPEED_FOLDER, DEEPSPEED_TAG = "deepspeed", "state"


def count_parameters(model) -> tuple[int, int]:
    """Trainable and all parameters; a ZeRO-3 partition counted at its full size (``ds_numel``), not its shard."""
    def size(p):
        return getattr(p, "ds_numel", p.numel())

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    return trainable, sum(size(p) for p in model.parameters())

class TrainingSession:
    """One run's state between its steps: the prepared model, optimizer and schedule, the data plan, and the
    ``state`` dict that checkpoints save (step, micro-batch, losses, evaluations, times)."""

    def __init__(self, cfg: RunConfig, accelerator, out: Path, task: Optional[Task] = None):
        from transformers import get_scheduler

        self.cfg, self.accelerator, self.out = cfg, accelerator, out
        self.progress = accelerator.is_main_process  # progress bars (train() may turn them off)
        self.model, self.tokenizer, self.task = build(cfg, task)
        self.train_examples = self.task.train[: cfg.max_train_examples]
        self.eval_examples = self.task.validation[: cfg.max_eval_examples]
        # --batch-size is per process: a micro-step reads one global batch and each process takes its slice of it,
        # so n processes x b see exactly the examples of 1 process x n b. The last partial batch is dropped.
        self.global_batch = cfg.batch_size * accelerator.num_processes
        self.batches_per_epoch = len(self.train_examples) // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(f"The global batch ({cfg.batch_size} per process x {accelerator.num_processes} "
                             f"processes) is larger than the {len(self.train_examples)} training examples: lower "
                             "--batch-size.")
        steps_per_epoch = max(1, self.batches_per_epoch // cfg.grad_accum)
        self.total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
        # Dual LoRA's warmup_steps="auto": a tenth of this run, at most 100 (an explicit --warmup-steps is kept)
        self.dual_warmup_steps = fit_warmup_to_run(self.model, self.total_steps).get("default")
        optimizer = make_optimizer(self.model, cfg.method, cfg.learning_rate, cfg.weight_decay, cfg.lr_ratio)
        # the scheduler stays ours: accelerate's wrapper steps it once per process per step (it assumes per-process
        # step counts), while total_steps here counts global optimizer steps
        self.scheduler = get_scheduler(LR_SCHEDULERS[cfg.lr_scheduler], optimizer,
                                       num_warmup_steps=int(cfg.lr_warmup_ratio * self.total_steps),
                                       num_training_steps=self.total_steps)
        self.model, self.optimizer = accelerator.prepare(self.model, optimizer)
        # wall and process CPU time, each of optimisation and of evaluation: on a shared machine the wall time
        # grows with other work, the CPU time counts this run's own threads (the report shows both)
        self.state = {"step": 0, "micro_batch": 0, "losses": [], "evaluations": [], "train_seconds": 0.0,
                      "eval_seconds": 0.0, "train_cpu_seconds": 0.0, "eval_cpu_seconds": 0.0}

    @property
    def deepspeed(self) -> bool:
        return self.accelerator.distributed_type.name == "DEEPSPEED"

    def restore(self, checkpoint: Path) -> None:
        """Weights, optimizer, schedule, random state and progress from a checkpoint. Under DeepSpeed the engine
        loads its own part (the weights, partitioned under ZeRO-3, and each process's optimizer partition)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        saved = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
        if self.deepspeed:
            self.model.load_checkpoint(str(checkpoint / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG)
        else:
            unwrapped = self.accelerator.unwrap_model(self.model)
            full = self.cfg.method == "full"
            weights = load_file(checkpoint / ("model.safetensors" if full else "adapter_model.safetensors"))
            if full:
                unwrapped.load_state_dict(weights, strict=False)
            else:
                set_peft_model_state_dict(unwrapped, weights)
            self.optimizer.load_state_dict(saved["optimizer"])
        if self.dual_warmup_steps is not None:
            self.keep_warmup_of(checkpoint)
        self.scheduler.load_state_dict(saved["scheduler"])  # a new step budget: the schedule follows the new total
        set_rng_state(saved["rng"])
        self.state = saved["state"]

    def keep_warmup_of(self, checkpoint: Path) -> None:
        """A resumed run keeps the Dual LoRA warm-up it started with, though a new --max-steps would fit another."""
        started_with = json.loads((checkpoint / "adapter_config.json").read_text()).get("warmup_steps")
        if isinstance(started_with, int) and started_with != self.dual_warmup_steps:
            set_warmup_length(self.accelerator.unwrap_model(self.model), started_with)
            self.dual_warmup_steps = started_with

    def save_checkpoint(self) -> None:
        """The adapter (or full model), optimizer, schedule, random state and progress, in a directory that appears
        only once complete. Under DeepSpeed every process writes its optimizer partition into the engine's own
        checkpoint inside it (first into a staging directory that all processes share; the main process renames)."""
        accelerator = self.accelerator
        weights = accelerator.get_state_dict(self.model)  # gathered under FSDP and ZeRO-3: every process calls it
        final = self.out / "checkpoints" / f"step-{self.state['step']:07d}"
        staging = None
        if self.deepspeed:
            staging = final.with_name(f".{final.name}-deepspeed")
            if accelerator.is_main_process:
                shutil.rmtree(staging, ignore_errors=True)  # an interrupted save's leftovers
            accelerator.wait_for_everyone()
            self.model.save_checkpoint(str(staging / DEEPSPEED_FOLDER), tag=DEEPSPEED_TAG)
            accelerator.wait_for_everyone()

        def write(tmp: Path):
            if staging is not None:
                os.replace(staging / DEEPSPEED_FOLDER, tmp / DEEPSPEED_FOLDER)
                staging.rmdir()
            accelerator.unwrap_model(self.model).save_pretrained(tmp, state_dict=weights)
            optimizer = None if self.deepspeed else self.optimizer.state_dict()  # DeepSpeed's is in its folder
            torch.save({"optimizer": optimizer, "scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                        "state": self.state}, tmp / "trainer_state.pt")
        if accelerator.is_main_process:
            atomic_dir(final, write)
            for old in sorted((self.out / "checkpoints").glob("step-*"))[:-1]:
                shutil.rmtree(old)  # keep the newest complete checkpoint only
        accelerator.wait_for_everyone()  # a resume or the next save finds it complete on every process

    def evaluate(self, examples: list, split: str) -> dict:
        return evaluate(self.accelerator.unwrap_model(self.model), self.tokenizer, self.task, examples,
                        self.cfg.max_length, accelerator=self.accelerator,
                        progress=split if self.progress else None)

    def validate(self) -> dict:
        started, cpu_started = time.perf_counter(), time.process_time()
        scores = self.evaluate(self.eval_examples, "validation")
        self.state["eval_seconds"] = self.state["eval_seconds"] + time.perf_counter() - started
        self.state["eval_cpu_seconds"] = self.state.get("eval_cpu_seconds", 0.0) + time.process_time() - cpu_started
        self.state["evaluations"].append({"step": self.state["step"], "split": "validation", **scores})
        if self.cfg.keep_best:
            self.keep_if_best(scores)
        if self.cfg.trackers:
            self.accelerator.log({f"eval/{name}": value for name, value in scores.items()
                                  if isinstance(value, (int, float))}, step=self.state["step"])
        self.model.train()
        return scores

    @property
    def best_folder(self) -> Path:
        return self.out / "best"

    def keep_if_best(self, scores: dict) -> None:
        """--keep-best: the adapter of the best validation score so far, in ``best/`` (complete or absent, as a
        checkpoint), its step and score in ``state["best"]``; a resumed run goes on comparing with it."""
        score = scores[PRIMARY_METRIC[self.task.kind]]  # every primary metric is higher-is-better
        best = self.state.get("best")
        if best is not None and score <= best["score"]:
            return  # a tie keeps the earlier, as transformers' Trainer does
        weights = self.accelerator.get_state_dict(self.model)
        if self.accelerator.is_main_process:
            atomic_dir(self.best_folder, lambda tmp: self.accelerator.unwrap_model(self.model).save_pretrained(
                tmp, state_dict=weights))
        self.accelerator.wait_for_everyone()
        self.state["best"] = {"step": self.state["step"], "score": score}

    def restore_best(self) -> dict:
        """Load the kept adapter back into the model; its validation scores (from the run's evaluations)."""
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        set_peft_model_state_dict(self.accelerator.unwrap_model(self.model),
                                  load_file(self.best_folder / "adapter_model.safetensors"))
        step = self.state["best"]["step"]
        return next({k: v for k, v in e.items() if k not in ("step", "split")}
                    for e in self.state["evaluations"] if e["step"] == step)

    def batch(self) -> dict:
        """This process's slice of the global batch of the current micro-step (epochs reshuffle by seed)."""
        cfg = self.cfg
        epoch, index = divmod(self.state["micro_batch"], self.batches_per_epoch)
        order = epoch_order(len(self.train_examples), cfg.seed, epoch)
        first = index * self.global_batch + self.accelerator.process_index * cfg.batch_size
        chunk = [self.train_examples[i] for i in order[first:first + cfg.batch_size]]
        batch = collate([encode_for_training(self.task, self.tokenizer, e, cfg.max_length) for e in chunk],
                        self.tokenizer.pad_token_id)
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    def micro_step(self) -> float:
        """Forward and backward of one micro-batch; the optimizer steps at accumulation boundaries. Its loss."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.model):
            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16):
                loss = self.model(**self.batch()).loss
            accelerator.backward(loss)
            self.optimizer.step()  # accelerate's optimizer skips the steps between accumulation boundaries
            if accelerator.sync_gradients:
                self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.state["micro_batch"] += 1
        return loss.item()

    def loop(self, bar, on_step: Optional[Callable]) -> None:
        """Optimizer steps until the budget, with the evaluations and checkpoints the cadence asks for."""
        cfg, state = self.cfg, self.state
        start = time.perf_counter() - state["train_seconds"] - state["eval_seconds"]
        state.setdefault("train_cpu_seconds", 0.0)  # checkpoints written before the CPU clock lack these
        state.setdefault("eval_cpu_seconds", 0.0)
        cpu_start = time.process_time() - state["train_cpu_seconds"] - state["eval_cpu_seconds"]
        running_loss = 0.0
        while state["step"] < self.total_steps:
            running_loss += self.micro_step() / cfg.grad_accum
            if not self.accelerator.sync_gradients:
                continue
            state["step"] += 1
            running_loss = reduce_across_processes(self.accelerator, [running_loss], "mean")[0]  # all processes
            state["losses"].append(running_loss)
            bar.set_postfix(loss=f"{running_loss:.4f}", refresh=False)  # drawn at the bar's own pace
            if cfg.trackers:
                self.accelerator.log({"train/loss": running_loss,
                                      "train/learning_rate": self.scheduler.get_last_lr()[0]}, step=state["step"])
            bar.update(1)
            running_loss = 0.0
            state["train_seconds"] = time.perf_counter() - start - state["eval_seconds"]
            state["train_cpu_seconds"] = time.process_time() - cpu_start - state["eval_cpu_seconds"]
            if cfg.eval_every and state["step"] % cfg.eval_every == 0 and state["step"] < self.total_steps:
                scores = self.validate()
                if self.accelerator.is_main_process:
                    bar.write(f"step {state['step']}: validation {_fmt(scores)}")
            if cfg.save_every and (state["step"] % cfg.save_every == 0 or state["step"] == self.total_steps):
                self.save_checkpoint()  # the last one too: a resume with a larger --max-steps goes on from the end
            if on_step is not None:
                on_step(state["step"], self.model)
        state["train_seconds"] = time.perf_counter() - start - state["eval_seconds"]  # optimisation only
        state["train_cpu_seconds"] = time.process_time() - cpu_start - state["eval_cpu_seconds"]

    def finish(self, trainable: int, total: int) -> dict:
        """Validation and test scores, the costs reduced over processes, and the final weights and metrics."""
        cfg, state, accelerator = self.cfg, self.state, self.accelerator
        validation = self.validate()
        kept_step = state["step"]
        if cfg.keep_best:
            validation, kept_step = self.restore_best(), state["best"]["step"]
        test_examples = self.task.test[: cfg.max_eval_examples]
        test_scores = self.evaluate(test_examples, "test")
        train_seconds, train_cpu_seconds, peak_mib = reduce_across_processes(
            accelerator, [state["train_seconds"], state.get("train_cpu_seconds", 0.0), peak_memory_mib()],
            "max")  # the slowest and the largest process
        metrics = {
            "method": cfg.method, "model": cfg.model, "task": self.task.name, "task_kind": self.task.kind,
            "primary_metric": PRIMARY_METRIC[self.task.kind], "test": test_scores, "validation": validation,
            "evaluations": state["evaluations"], "losses": state["losses"], "steps": state["step"],
            "kept_step": kept_step,  # the step of the adapter kept: the last, or with --keep-best the best's
            "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds, "peak_memory_mib": peak_mib,
            "load_average": list(os.getloadavg()),  # the machine's 1, 5 and 15 minute loads as training ended
            "processes": accelerator.num_processes, "distributed_type": accelerator.distributed_type.name,
            "zero_stage": (accelerator.state.deepspeed_plugin.zero_stage if self.deepspeed else None),
            "global_batch_size": self.global_batch * cfg.grad_accum, "dual_warmup_steps": self.dual_warmup_steps,
            "trainable_params": trainable, "total_params": total,
            "test_examples": len(test_examples),  # the report weighs a score against the majority class by it
            "majority_baseline": majority_baseline(self.task, test_examples),
            "baselines": baseline_rates(self.task, test_examples),  # per task: majority class and chance
            "config": asdict(cfg), "environment": environment(),
        }
        if cfg.trackers:
            accelerator.log({f"test/{name}": value for name, value in test_scores.items()
                             if isinstance(value, (int, float))}, step=state["step"])
            accelerator.end_training()  # the trackers' files complete
        weights = accelerator.get_state_dict(self.model)  # gathered under FSDP: every process must call it
        if accelerator.is_main_process:
            publish_weights(accelerator.unwrap_model(self.model), self.out, weights)
            atomic_write_text(self.out / "metrics.json", json.dumps(metrics, indent=2))
            plot_training(metrics, self.out / "training.png")
            shutil.rmtree(self.best_folder, ignore_errors=True)  # published as the run's adapter
        return metrics


def train(cfg: RunConfig, resume: bool = False, overwrite: bool = False, progress: bool = True,
          on_step: Optional[Callable[[int, torch.nn.Module], None]] = None) -> dict:
    """Run one fine-tuning; returns the metrics also written to ``metrics.json``. ``on_step(step, model)`` is
    called after every optimizer step (with the prepared model).

    Under ``torchrun``/``accelerate launch`` every process runs this with the same arguments: each takes its slice
    of every global batch, gradients are averaged by accelerate (DDP, FSDP), the losses and costs are reduced
    across processes, and only the main process writes files and shows progress."""
    from tqdm.auto import tqdm

    from .sft import is_sft_run, train_sft

    if is_sft_run(cfg):
        return train_sft(cfg, resume, overwrite, progress)
    sft_only = [flag for flag, value in (("--eval-file", cfg.eval_file), ("--packing", cfg.packing),
                                         ("--all-tokens", cfg.all_tokens)) if value]
    if sft_only:
        raise ValueError(f"{', '.join(sft_only)}: for SFT runs (instruction or chat data, no --label-column); "
                         f"{cfg.task} is not one.")
    cfg.validate()
    saved = saved_run_config(cfg.output_dir) if resume else None
    resume_notes = []
    if saved is not None:
        cfg, resume_notes = resumed_config(cfg, saved)
    # bf16 through torch.autocast rather than accelerate's mixed_precision, which is fixed once per process (a
    # second in-process run with another setting would be refused)
    accelerator = make_accelerator(cfg.grad_accum, cfg.batch_size, cfg.trackers, Path(cfg.output_dir) / "logs")
    if cfg.keep_best and accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise ValueError("--keep-best is not supported under FSDP or DeepSpeed yet: the kept adapter would have to be "
                         "loaded back into sharded weights. Train without it, or use DDP.")
    warning = bf16_warning(accelerator.device) if cfg.bf16 else None
    if warning and accelerator.is_main_process:
        print(warning, file=sys.stderr)  # before the model loads: a user can stop a run that would take hours
    task = load_run_task(cfg)  # before the output folder is touched: bad data leaves nothing behind
    check_output_dir(cfg, resume, overwrite)  # an earlier run is refused before a model loads
    session = TrainingSession(cfg, accelerator, Path(cfg.output_dir), task)  # a bad model or setting stops here
    out = prepare_output_dir(cfg, resume, overwrite, accelerator)
    session.progress = progress and accelerator.is_main_process
    if accelerator.distributed_type.name == "FSDP" and (cfg.save_every or resume):
        raise ValueError("Checkpoints (--save-every, --resume) are not supported under FSDP yet: the optimizer state "
                         "is sharded across processes. Train without them, or use DDP.")
    checkpoint = latest_checkpoint(out) if resume else None
    if resume and accelerator.is_main_process:
        where = f"from {checkpoint}" if checkpoint else f"from step 0: no checkpoint in {out / 'checkpoints'}"
        changes = f", with {'; '.join(resume_notes)}" if resume_notes else ""
        print(f"--resume: continuing {out} {where}{changes}.", file=sys.stderr)
    if checkpoint is not None:
        session.restore(checkpoint)
    if accelerator.is_main_process:
        atomic_write_text(out / "run_config.json", json.dumps(asdict(cfg), indent=2))
    if cfg.trackers:
        accelerator.init_trackers("duallora", config=tracker_config(cfg))
    trainable, total = count_parameters(session.model)
    if accelerator.is_main_process and progress:
        print(f"{cfg.method} on {cfg.model} / {session.task.name}: {trainable:,} trainable of {total:,} parameters, "
              f"{len(session.train_examples)} train / {len(session.eval_examples)} validation / "
              f"{len(session.task.test)} test examples, {session.total_steps} steps{warmup_note(session)}",
              file=sys.stderr)
    bar = tqdm(total=session.total_steps, initial=session.state["step"], desc=f"{cfg.method}", unit="step",
               mininterval=0.5 if sys.stderr.isatty() else 30,  # a log file gets a line every 30 s, not every step
               disable=not (progress and accelerator.is_main_process))
    session.model.train()
    try:
        session.loop(bar, on_step)
    except KeyboardInterrupt:
        bar.close()
        last = latest_checkpoint(out)
        where = f"the last complete checkpoint is {last}" if last else "no checkpoint was written yet"
        if accelerator.is_main_process:
            print(f"\nInterrupted at step {session.state['step']}; {where}. Continue with the same command plus "
                  "--resume.", file=sys.stderr)
        raise
    bar.close()
    return session.finish(trainable, total)


def warmup_note(session: TrainingSession) -> str:
    """The Dual LoRA warm-up the run fitted (``warmup_steps="auto"``), for the first screen."""
    if session.dual_warmup_steps is None:
        return ""
    return f"; Dual LoRA's dW warm-up {session.dual_warmup_steps} steps (a tenth of the run, at most 100)"


def run_summary(metrics: dict, out: Path) -> str:
    """The one-screen end of a run: the scores against the majority class, where the files are, time and memory,
    and the commands that use the result."""
    metric = metrics["primary_metric"]
    test, validation = metrics["test"].get(metric), metrics["validation"].get(metric)
    base = metrics.get("base_validation", {}).get(metric)  # an SFT run: the base model's validation loss
    minutes, seconds = divmod(round(metrics["train_seconds"]), 60)
    majority = metrics.get("majority_baseline")
    against = f" (majority class {majority:.4f})" if isinstance(majority, float) else ""
    scores = f"test {metric} {test:.4f}{against}" if isinstance(test, float) else ""
    if isinstance(validation, float):
        scores += (", " if scores else "") + f"validation {metric} {validation:.4f}"
        if isinstance(base, float):
            scores += f" (base model {base:.4f})"
    scores = scores or "no score"
    weights = "model" if metrics["method"] == "full" else "adapter"
    return "\n".join([
        f"done: {metrics['method']} on {metrics['model']} / {metrics['task']}, {metrics['steps']} steps in "
        f"{minutes} min {seconds} s of training, peak memory {metrics['peak_memory_mib']:.0f} MiB"
        + (f", Dual LoRA warm-up {warmup} steps" if isinstance(warmup := metrics.get("dual_warmup_steps"), int)
           else ""),
        f"  {scores}",
        f"  {weights}: {out}   metrics: {out / 'metrics.json'}   plot: {out / 'training.png'}",
        f"  next: duallora {'chat' if metrics['task_kind'] == 'sft' else 'eval'} --adapter {out}   "
        f"duallora merge --adapter {out} --output {out}-merged",
    ])


def _fmt(scores: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float))


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

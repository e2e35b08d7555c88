"""Running a suite of experiments (:mod:`duallora.app.experiments`): each run in its own process, and each
finished run's results kept as ``<root>/<name>/results/<run>.json`` (the file that is committed; never edit it).

A run whose results file exists is skipped, wherever it was made. A run's heavy outputs (adapter, checkpoints)
go to ``<runs_dir>/<name>/<run>/``; an interrupted run resumes from its last checkpoint there.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .experiments import (
    Experiment,
    Run,
    config_differences,
    finished_runs,
    load_experiments,
    plan,
    summary,
)
from . import zero_shot
from .process import bf16_warning
from .run_config import RunConfig
from .run_files import atomic_write_text
from .tasks import load_task

LOSS_CURVE_POINTS = 100


class RunFailed(RuntimeError):
    """A run's child process failed; finished runs are kept."""


def run_in_child(cfg: RunConfig, resume: bool) -> None:
    """One run in its own process: its time and peak memory are its own, and nothing leaks into the next run."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    request = run_dir / "run_request.json"
    atomic_write_text(request, json.dumps(asdict(cfg), indent=2))
    cmd = [sys.executable, "-m", "duallora", "train", "--config", str(request),
           "--resume" if resume else "--overwrite"]
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise RuntimeError(f"The run {run_dir.name} failed (exit code {result.returncode}); see its output above.")


# ------------------------------------------------------------------------------------------------- running runs
def loss_curve(losses: list[float], points: int = LOSS_CURVE_POINTS) -> dict:
    """The training loss as at most ``points`` window means, each labelled with its window's last step."""
    window = max(1, -(-len(losses) // points))
    steps, means = [], []
    for start in range(0, len(losses), window):
        chunk = losses[start:start + window]
        steps.append(start + len(chunk))
        means.append(sum(chunk) / len(chunk))
    return {"step": steps, "loss": means}


def results_record(run: Run, cfg: RunConfig, metrics: dict, wall_seconds: Optional[float],
                   inspect_rows: Optional[list]) -> dict:
    """The committed results of a run: ``metrics.json`` with the loss curve subsampled, plus the suite's facts
    (``wall_seconds`` is None for a run resumed or made earlier: only a run made in one go has its whole time)."""
    record = {k: v for k, v in metrics.items() if k != "losses"}
    record["loss_curve"] = loss_curve(metrics["losses"])
    record["suite"] = {"experiment": run.experiment.name, "run": run.name, "label": run.label,
                       "lr": cfg.learning_rate, "seed": run.seed, "wall_seconds": wall_seconds}
    if inspect_rows is not None:
        record["inspect"] = inspect_rows
    return record


def wants_inspect(run: Run, cfg: RunConfig) -> bool:
    """The rank analysis is made for an inspecting experiment's first-seed runs that have an adapter."""
    return run.experiment.inspect and run.seed == run.experiment.seeds[0] and cfg.method != "full"


def _read_json(path: Path) -> Optional[dict]:
    return json.loads(path.read_text()) if path.exists() else None


def train_in_child(run: Run, cfg: RunConfig, progress: bool) -> Optional[float]:
    """Train the run in a child process unless its output directory holds it finished with these options.
    Resumes an interrupted run with the same options; replaces one with other options. Returns the wall time of
    a run made in one go, else None."""
    run_dir = Path(cfg.output_dir)
    metrics = _read_json(run_dir / "metrics.json")
    if metrics is not None and not config_differences(metrics["config"], cfg):
        return None  # finished earlier, its results file not written yet
    started_config = _read_json(run_dir / "run_config.json")
    resume = started_config is not None and not config_differences(started_config, cfg)
    if progress:
        print(f"{run.experiment.name}/{run.name}: {'resuming' if resume else 'running'}", flush=True)
    started = time.perf_counter()
    try:
        run_in_child(cfg, resume=resume)
    except RuntimeError as err:  # compare's message names the run and its exit code
        raise RunFailed(f"{run.experiment.name}/{run.name} failed ({err}). Finished runs are kept: run `duallora "
                        "suite` again to go on (this run resumes from its last checkpoint).") from err
    return None if resume else time.perf_counter() - started


def execute(run: Run, runs_dir: Path, progress: bool = True) -> dict:
    """Train the run, inspect it if the experiment asks, and write its results file atomically. Then delete the
    run's checkpoint: it serves resume only, and a full fine-tuning's (weights and optimizer state) is large; the
    final adapter or model stays in the run directory."""
    cfg = run.config(runs_dir)
    wall = train_in_child(run, cfg, progress)
    run_dir = Path(cfg.output_dir)
    rows = None
    if wants_inspect(run, cfg):
        from .inspect import inspect_run

        rows = inspect_run(run_dir, run_dir / "inspect")
    record = results_record(run, cfg, json.loads((run_dir / "metrics.json").read_text()), wall, rows)
    run.experiment.results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run.results_path, json.dumps(record, indent=1) + "\n")
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return record


def run_experiment(experiment: Experiment, runs_dir: Path, progress: bool = True) -> int:
    """Score the base model first if the experiment asks (``zero_shot``), then run every unfinished run of the
    experiment, planning again after each pass (a comparison's later seeds wait for its grid). Returns the number
    of runs made."""
    made = 0
    if experiment.zero_shot and zero_shot.read(experiment) is None:
        check_task_data(experiment)
        if progress:
            print(f"{experiment.name}/{zero_shot.NAME}: scoring the base model", flush=True)
        zero_shot.score(experiment, progress)
    while True:
        finished = finished_runs(experiment)
        todo = [run for run in plan(experiment, finished) if run.ready and run.name not in finished]
        if not todo:
            return made
        if made == 0:
            check_task_data(experiment)
        for run in todo:
            execute(run, runs_dir, progress)
        made += len(todo)


def check_task_data(experiment: Experiment) -> None:
    """Read the experiment's task once before its first run starts: a missing source stops here, in one line and
    before any process starts (and a first download happens once, not in every run's process)."""
    base = experiment.base
    load_task(base.get("task", RunConfig.task), text_column=base.get("text_column"),
              label_column=base.get("label_column"), text_pair_column=base.get("text_pair_column"))


def run_suite(root: Path, runs_dir: Path, names: Optional[list[str]] = None, progress: bool = True) -> int:
    """Run the named experiments (default: all); every config is checked before the first run starts.
    Returns the number of runs made."""
    made = 0
    for experiment in load_experiments(root, names):
        made += run_experiment(experiment, runs_dir, progress)
        if progress:
            print(f"{experiment.name}: all runs finished", flush=True)
    return made


# -------------------------------------------------------------------------------------- listing and estimates
@dataclass(frozen=True)
class Cost:
    """Measured seconds of one LoRA run's parts: process start and model load, one training example, one
    evaluated example; ``eval_split`` caps the evaluated examples (the size of the validation and test splits)."""

    startup: float
    train_example: float
    eval_example: float
    eval_split: int


# Measured here (2 cores, bf16 autocast, batch 16, r 16; see experiments/README.md): (model, task, bf16) -> the
# costs of a LoRA run. Other methods scale the training part by METHOD_COST (their step time over LoRA's, from
# these measurements and the training-step benchmarks of docs/performance.md).
MEASURED: dict[tuple[str, str, bool], Cost] = {
    ("minilm", "sentiment", True): Cost(startup=4, train_example=0.0131, eval_example=0.0116, eval_split=5746),
    ("minilm", "fact-verification", True): Cost(startup=4, train_example=0.0211, eval_example=0.016, eval_split=5466),
    ("smollm2", "social-iqa", True): Cost(startup=5, train_example=0.0824, eval_example=0.28, eval_split=195),
    ("smollm2", "strategyqa", True): Cost(startup=5, train_example=0.0504, eval_example=0.149, eval_split=229),
    ("smollm2", "e2e-nlg", True): Cost(startup=5, train_example=0.134, eval_example=0.20, eval_split=21),
    # the papers' tasks (batch 8 for SmolLM2's mix, whose batches pad to 128 tokens; its evaluation in float32)
    ("smollm2", "commonsense", True): Cost(startup=10, train_example=0.45, eval_example=0.42, eval_split=1970),
    ("minilm", "sst2", True): Cost(startup=4, train_example=0.022, eval_example=0.008, eval_split=174),
    ("minilm", "mrpc", True): Cost(startup=4, train_example=0.038, eval_example=0.018, eval_split=81),
    ("minilm", "rte", True): Cost(startup=4, train_example=0.063, eval_example=0.024, eval_split=55),
    ("minilm", "rated-sentiment", True): Cost(startup=4, train_example=0.0205, eval_example=0.0115, eval_split=2367),
}
METHOD_COST = {"lora": 1.0, "loraplus": 1.0, "dora": 1.3, "hira": 1.4, "dual": 1.5, "d2": 1.45, "full": 1.25}


def _evaluation_seconds(cfg: RunConfig, cost: Cost) -> float:
    """Scoring the validation and test splits, each capped by ``max_eval_examples``."""
    return 2 * min(cfg.max_eval_examples or cost.eval_split, cost.eval_split) * cost.eval_example


def estimate_zero_shot_seconds(cfg: RunConfig) -> Optional[float]:
    """Wall time of scoring the base model: loading it and evaluating both capped splits."""
    cost = MEASURED.get((cfg.model, cfg.task, cfg.bf16))
    return None if cost is None else cost.startup + _evaluation_seconds(cfg, cost)


def estimate_seconds(cfg: RunConfig, observed: list[float]) -> Optional[float]:
    """Wall time of a run: the mean of the same kind of run already made in this experiment, else the measured
    costs above; None when neither knows the model and task."""
    if observed:
        return statistics.mean(observed)
    cost = MEASURED.get((cfg.model, cfg.task, cfg.bf16))
    if cost is None:
        return None
    examples = (cfg.max_steps or 0) * cfg.batch_size * cfg.grad_accum
    return cost.startup + examples * cost.train_example * METHOD_COST[cfg.method] + _evaluation_seconds(cfg, cost)


@dataclass(frozen=True)
class Status:
    run: Run
    finished: bool
    seconds: Optional[float]  # estimated wall time, for a run not finished
    bf16: bool = False  # a run not finished asks for bf16 autocast


def statuses(experiment: Experiment, runs_dir: Path) -> list[Status]:
    """Every planned run of the experiment: finished, or its estimated time."""
    finished = finished_runs(experiment)
    observed: dict[str, list[float]] = {}
    for result in finished.values():
        if result["suite"]["wall_seconds"] is not None:
            observed.setdefault(result["suite"]["label"], []).append(result["suite"]["wall_seconds"])
    out = []
    for run in plan(experiment, finished):
        if run.name in finished:
            out.append(Status(run, True, None))
            continue
        lr = run.lr if run.ready else experiment.lr_grid[0]  # the time does not depend on the lr
        cfg = Run(experiment, run.label, lr, run.seed).config(runs_dir)
        out.append(Status(run, False, estimate_seconds(cfg, observed.get(run.label, [])), cfg.bf16))
    return out


def zero_shot_status(experiment: Experiment) -> list[Status]:
    """The zero-shot scoring as a status line of its own (none when the experiment asks for none)."""
    if not experiment.zero_shot:
        return []
    cfg = zero_shot.base_config(experiment)
    done = zero_shot.read(experiment) is not None
    return [Status(Run(experiment, zero_shot.NAME, None, experiment.seeds[0]), done,
                   None if done else estimate_zero_shot_seconds(cfg))]


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _left(items: list[Status]) -> str:
    todo = [s for s in items if not s.finished]
    unknown = sum(s.seconds is None for s in todo)
    known = sum(s.seconds for s in todo if s.seconds is not None)
    return f"~{_duration(known)}" + (f" plus {unknown} run(s) with no estimate (model/task not measured)"
                                     if unknown else "")


def dry_run(root: Path, runs_dir: Path, names: Optional[list[str]] = None) -> str:
    """What ``duallora suite`` would run, with estimated times; runs nothing."""
    lines, everything = [], []
    for experiment in load_experiments(root, names):
        items = statuses(experiment, runs_dir)
        zero = zero_shot_status(experiment)
        everything += items + zero
        done = sum(s.finished for s in items)
        lines.append(f"{experiment.name} ({summary(experiment)}): {done} of {len(items)} runs finished, "
                     f"{_left(items + zero)} left")
        for s in zero:
            state = "finished" if s.finished else "to run first (the base model, no training)"
            estimate = "" if s.finished or s.seconds is None else f"~{s.seconds / 60:.1f} min"
            lines.append(f"  {zero_shot.NAME:36s} {state:42s} {estimate}".rstrip())
        for s in items:
            state = ("finished" if s.finished else
                     "to run" if s.run.ready else "after its grid (lr chosen on validation)")
            estimate = "" if s.finished or s.seconds is None else f"~{s.seconds / 60:.1f} min"
            lines.append(f"  {s.run.name:36s} {state:42s} {estimate}".rstrip())
    lines.append(f"total left: {_left(everything)}")
    warning = bf16_warning(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if warning and any(s.bf16 for s in everything):
        lines.append(f"{warning} The estimates above were measured with bfloat16 kernels.")
    return "\n".join(lines)


def listing(root: Path, names: Optional[list[str]] = None) -> str:
    """One line per experiment: how many of its runs are finished, its kind, model, task and budget."""
    lines = []
    for experiment in load_experiments(root, names):
        finished = finished_runs(experiment)
        runs = plan(experiment, finished)
        done = sum(run.name in finished for run in runs)
        lines.append(f"{experiment.name:28s} {done:3d}/{len(runs):<3d} finished  {summary(experiment)}")
    return "\n".join(lines)

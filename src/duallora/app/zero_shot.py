"""The zero-shot row of an experiment (``zero_shot: true``): the base model, with no adapter and no training, scored
on the validation and test examples its runs are scored on. It shows what training added, next to the chance and
majority-class rates of each task. Its results file is ``<experiment>/results/zero-shot.json``; like a run's, it is
made once and reused while the options it depends on (``SCORED_WITH``) stay as the config gives them."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from .evaluate import PRIMARY_METRIC, evaluate
from .experiments import ZERO_SHOT_RUN, Experiment, Run
from .run_config import RunConfig
from .run_files import atomic_write_text
from .tasks import baseline_rates, majority_baseline

NAME = ZERO_SHOT_RUN
# the options a zero-shot score depends on: the model, the data and how much of it is scored
SCORED_WITH = ("model", "task", "max_length", "max_eval_examples", "text_column", "label_column", "text_pair_column")


def results_path(experiment: Experiment) -> Path:
    return experiment.results_dir / f"{NAME}.json"


def base_config(experiment: Experiment) -> RunConfig:
    """The experiment's first run's options: the model, task and evaluation caps every run shares."""
    first = experiment.methods[0] if experiment.methods else next(iter(experiment.variants))
    lr = experiment.lr_grid[0] if experiment.lr_grid else None
    return Run(experiment, first, lr, experiment.seeds[0]).config()


def read(experiment: Experiment) -> Optional[dict]:
    """The zero-shot results, or None when the experiment asks for none or they are not made yet. A file made with
    other options than the config now gives is refused, naming them."""
    path = results_path(experiment)
    if not experiment.zero_shot or not path.exists():
        return None
    record = json.loads(path.read_text())
    now = asdict(base_config(experiment))
    differences = [f"{k}: {record['config'][k]!r} there, {now[k]!r} now" for k in SCORED_WITH
                   if record["config"].get(k) != now[k]]
    if differences:
        raise ValueError(f"{path} was made with other options than {experiment.config_path} now gives "
                         f"({'; '.join(differences)}). Restore the config, or delete the file to score it again.")
    return record


def score(experiment: Experiment, progress: bool = True) -> dict:
    """Score the base model on the experiment's validation and test examples; write the results file atomically."""
    from .train import base_parts

    cfg = base_config(experiment)
    started = time.perf_counter()
    model, tokenizer, task = base_parts(cfg)
    scores = {split: evaluate(model, tokenizer, task, task.split(split)[: cfg.max_eval_examples], cfg.max_length,
                              progress=f"zero-shot {split}" if progress else None)
              for split in ("validation", "test")}
    test_examples = task.test[: cfg.max_eval_examples]
    record = {
        "method": NAME, "model": cfg.model, "task": task.name, "task_kind": task.kind,
        "primary_metric": PRIMARY_METRIC[task.kind], **scores, "test_examples": len(test_examples),
        "majority_baseline": majority_baseline(task, test_examples), "baselines": baseline_rates(task, test_examples),
        "config": {k: asdict(cfg)[k] for k in SCORED_WITH},
        "suite": {"experiment": experiment.name, "run": NAME, "wall_seconds": time.perf_counter() - started},
    }
    experiment.results_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(results_path(experiment), json.dumps(record, indent=1) + "\n")
    return record

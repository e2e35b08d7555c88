"""Classification tasks from a local CSV / JSON / JSONL file or a hub data set (``datasets``, when online)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Optional

from . import Example, Task, deterministic_split

SUFFIXES = (".csv", ".json", ".jsonl")


# a label column with more distinct values than this, or unique in most rows, is free text, not classes
MAX_CLASSES = 100
UNIQUE_SHARE = 0.5


def read_rows(path: Path) -> list[dict]:
    """Rows of a CSV (with a header), a JSON list of objects (or {"data": [...]}) or a JSON-lines file; a file that
    cannot be read stops with its name, the line and the parser's message."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unsupported file type {suffix!r}; use one of {list(SUFFIXES)}.")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"{path} is empty.")
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                rows.append(_json(line, f"{path}, line {number}"))
        return rows
    data = _json(text, str(path))
    rows = data.get("data", data.get("examples")) if isinstance(data, dict) else data
    if not isinstance(rows, list):
        raise ValueError(f"{path}: expected a JSON list of objects (or an object with a 'data' list).")
    return rows


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = f"line {err.lineno}, " if "line" not in where else ""
        raise ValueError(f"{where}: not valid JSON ({line}column {err.colno}: {err.msg}).") from None


def check_label_column(name: str, rows: list[dict], label_column: str, label_names: list[str]) -> None:
    """Refuse a label column that holds free text (most values unique, or more classes than MAX_CLASSES): trained
    as classes, each distinct text would become a class of its own, and the score is 0."""
    if len(label_names) > MAX_CLASSES or (len(rows) >= 20 and len(label_names) > UNIQUE_SHARE * len(rows)):
        raise ValueError(
            f"{name}: the label column {label_column!r} has {len(label_names)} distinct values in {len(rows)} "
            "rows: free text, not classes (duallora trains a classifier on --label-column). To fine-tune a causal "
            "LM on prompts and completions (SFT), drop --text-column and --label-column (docs/cli.md lists the "
            f"formats); to classify, name a column of at most {MAX_CLASSES} classes."
        )


def rows_to_task(name: str, rows: list[dict], text_column: str, label_column: str,
                 text_pair_column: Optional[str] = None) -> Task:
    """A classification task from rows; labels are the sorted distinct values of the label column."""
    if not rows:
        raise ValueError(f"{name}: no rows.")
    columns = list(rows[0].keys())
    for flag, column in (("--text-column", text_column), ("--label-column", label_column),
                         ("--text-pair-column", text_pair_column)):
        if column is not None and column not in columns:
            raise ValueError(f"{name} has no column {column!r} (from {flag}); its columns are {columns}.")
    label_names = sorted({str(row[label_column]) for row in rows})
    check_label_column(name, rows, label_column, label_names)
    if len(label_names) < 2:
        raise ValueError(f"{name}: the label column {label_column!r} has fewer than 2 distinct values.")
    examples = [Example(str(row[text_column]), text_pair=str(row[text_pair_column]) if text_pair_column else None,
                        label=label_names.index(str(row[label_column]))) for row in rows]
    return Task(name, "classification", *deterministic_split(examples), label_names=label_names)


def load_file_task(path: str, text_column: Optional[str] = None, label_column: Optional[str] = None,
                   text_pair_column: Optional[str] = None) -> Task:
    rows = read_rows(Path(path))
    if text_column is None or label_column is None:
        columns = list(rows[0].keys()) if rows else []
        raise ValueError(f"A data file needs --text-column and --label-column; {path} has columns {columns}.")
    return rows_to_task(Path(path).name, rows, text_column, label_column, text_pair_column)


def load_hub_task(dataset_id: str, text_column: Optional[str] = None, label_column: Optional[str] = None,
                  text_pair_column: Optional[str] = None) -> Task:
    """A hub data set's train split (then split deterministically here), through ``datasets``."""
    try:
        import datasets
    except ImportError as err:
        raise ValueError(f"{dataset_id!r} is not a task name or a local file; to use a hub data set, "
                         "`pip install datasets` (and be online).") from err
    try:
        rows = list(datasets.load_dataset(dataset_id, split="train"))
    except Exception as err:  # offline, unknown id, gated: datasets raises many types
        raise ValueError(f"Could not load hub data set {dataset_id!r} ({err}). Offline, pass a local file.") from err
    if text_column is None or label_column is None:
        raise ValueError(f"A data set needs --text-column and --label-column; {dataset_id} has columns "
                         f"{list(rows[0].keys()) if rows else []}.")
    return rows_to_task(dataset_id, rows, text_column, label_column, text_pair_column)

"""``duallora predict``: a trained classifier on new inputs, from a file or standard input, with its label names.

The classifier is a run of ``duallora train`` (base model + adapter, its labels those of the run's task) or a
merged checkpoint (``duallora merge``: the labels are in its config's ``id2label``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch

from .data import collate
from .tasks.files import read_rows

# a merged checkpoint records no max length of its run: inputs are cut where the run's default cuts them
DEFAULT_MAX_LENGTH = 128


def load_classifier(path: Path):
    """Model (eval mode), tokenizer, label names and max input length of a run or a merged checkpoint."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if (path / "run_config.json").exists():
        from .train import load_trained

        model, tokenizer, task, cfg = load_trained(path)
        if task.kind != "classification":
            raise ValueError(f"{path} is a run on {task.name!r}, a {task.kind.replace('_', ' ')} task: predict runs "
                             f"classifiers. Score it with `duallora eval --adapter {path}`.")
        return model.eval(), tokenizer, list(task.label_names), cfg.max_length
    if (path / "config.json").exists():
        try:
            model = AutoModelForSequenceClassification.from_pretrained(path)
        except (OSError, ValueError) as err:
            raise ValueError(f"{path} is not a sequence classifier ({err}).") from err
        tokenizer = AutoTokenizer.from_pretrained(path)
        return model.eval(), tokenizer, [model.config.id2label[i] for i in range(model.config.num_labels)], \
            DEFAULT_MAX_LENGTH
    raise ValueError(f"{path} holds neither a run of `duallora train` (run_config.json) nor a merged checkpoint "
                     "(config.json).")


def read_inputs(source: Optional[str], text_column: Optional[str] = None,
                text_pair_column: Optional[str] = None) -> list[tuple[str, Optional[str]]]:
    """The texts to classify: a .csv/.json/.jsonl file's column (``text_column``, and ``text_pair_column`` for
    pairs), any other file's lines, or standard input's lines (``source`` None or ``-``)."""
    if source in (None, "-"):
        lines = sys.stdin.read().splitlines()
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"No such file: {source!r}.")
        if path.suffix.lower() in (".csv", ".json", ".jsonl"):
            rows = read_rows(path)
            columns = list(rows[0]) if rows else []
            if text_column not in columns:
                raise ValueError(f"{path}: name the column to classify with --text-column; its columns are "
                                 f"{columns}.")
            if text_pair_column is not None and text_pair_column not in columns:
                raise ValueError(f"{path} has no column {text_pair_column!r} (from --text-pair-column); its columns "
                                 f"are {columns}.")
            return [(str(row[text_column]), str(row[text_pair_column]) if text_pair_column else None)
                    for row in rows]
        lines = path.read_text(encoding="utf-8").splitlines()
    inputs = [(line, None) for line in lines if line.strip()]
    if not inputs:
        raise ValueError(f"No inputs in {source or 'standard input'}: one text per line.")
    return inputs


@torch.no_grad()
def class_probabilities(model, tokenizer, inputs: list[tuple[str, Optional[str]]], max_length: int,
                        batch_size: int = 32) -> torch.Tensor:
    """Softmax of the classifier's logits, ``(inputs, classes)``."""
    device = next(model.parameters()).device
    probabilities = []
    for i in range(0, len(inputs), batch_size):
        features = []
        for text, pair in inputs[i:i + batch_size]:
            enc = tokenizer(text, pair, truncation=True, max_length=max_length)
            features.append({"labels": 0, **{k: enc[k] for k in ("input_ids", "token_type_ids") if k in enc}})
        batch = collate(features, tokenizer.pad_token_id)
        batch.pop("labels")  # collate's placeholder: there are none to predict from
        logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
        probabilities.append(logits.float().softmax(-1).cpu())
    return torch.cat(probabilities)


def prediction_lines(inputs, probabilities: torch.Tensor, labels: list[str], as_json: bool) -> list[str]:
    """Per input: ``label<TAB>probability<TAB>text``, or a JSON object with every label's probability."""
    lines = []
    for (text, pair), row in zip(inputs, probabilities.tolist()):
        best = max(range(len(row)), key=row.__getitem__)
        if as_json:
            record = {"text": text, **({"text_pair": pair} if pair is not None else {}), "label": labels[best],
                      "scores": {label: round(p, 6) for label, p in zip(labels, row)}}
            lines.append(json.dumps(record, ensure_ascii=False))
        else:
            lines.append(f"{labels[best]}\t{row[best]:.4f}\t{text}")
    return lines

"""Instruction and chat data for supervised fine-tuning (SFT): the formats that TRL defines and practitioners' files
use, recognised from a file's columns and turned into TRL's records, which TRL's SFTTrainer then puts through the
tokenizer's chat template and masks.

- ``messages``: a conversation, ``[{"role": ..., "content": ...}, ...]``; it becomes a conversational prompt (every
  turn before the last assistant turn) and completion (that turn), so the loss falls on the answer;
- ``prompt-completion``: ``prompt`` and ``completion``, plain text or conversational (TRL's own format);
- ``alpaca``: ``instruction``, an optional ``input`` and ``output``: a user turn (the instruction, then the input
  after a blank line) and the assistant's answer;
- ``text``: plain ``text``, for language modelling (the loss on every token).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .sources import Source, fetch

FORMATS = {
    "messages": "a 'messages' list of {'role', 'content'} turns",
    "prompt-completion": "'prompt' and 'completion', plain or conversational",
    "alpaca": "'instruction', an optional 'input', and 'output'",
    "text": "plain 'text', for language modelling",
}
LLAMAFACTORY = Source(
    requirement="llamafactory==0.9.5", filename="llamafactory-0.9.5.tar.gz",
    sha256="1702c0bfb864e80577a59521d2edcacd2aab05ec6aee06188fcba335a589681f", size_bytes=5_208_876,
    licence="Apache-2.0 (LLaMA-Factory's demo data)", members=("data/alpaca_en_demo.json",),
)


@dataclass(frozen=True)
class SftDataset:
    """A named instruction data set: a member of a pinned source (:mod:`.sources`)."""

    name: str
    source: Source
    member: str
    summary: str

    def path(self) -> Path:
        """The cached file, fetched first if needed."""
        fetch(self.source)
        return self.source.path(self.member)


SFT_DATASETS = {d.name: d for d in [
    SftDataset("alpaca-demo", LLAMAFACTORY, "data/alpaca_en_demo.json",
               "999 English Alpaca-format instructions with answers (LLaMA-Factory's demo set)"),
]}
HELD_OUT_FRACTION = 0.1  # without --eval-file: this share of the examples (at least 1) is held out for validation
SPLIT_SEED = 1234


def detect_format(rows: list[dict], where: str) -> str:
    """The format of a file's rows, from the columns of its first row."""
    columns = set(rows[0]) if rows and isinstance(rows[0], dict) else set()
    if "messages" in columns:
        return "messages"
    if {"prompt", "completion"} <= columns:
        return "prompt-completion"
    if {"instruction", "output"} <= columns:
        return "alpaca"
    if "text" in columns:
        return "text"
    accepted = "; ".join(f"{name}: {what}" for name, what in FORMATS.items())
    raise ValueError(f"{where}: no instruction or chat format in its columns {sorted(columns)}. Accepted: {accepted}. "
                     "For a classifier, name the columns with --text-column and --label-column.")


def sft_records(rows: list[dict], fmt: str, where: str) -> list[dict]:
    """TRL's records of ``rows``: ``{"prompt", "completion"}`` (conversational or plain) or ``{"text"}``."""
    return [_record(row, fmt, f"{where}, example {number}") for number, row in enumerate(rows, start=1)]


def _record(row: dict, fmt: str, where: str) -> dict:
    if fmt == "text":
        return {"text": _text(row, "text", where)}
    if fmt == "alpaca":
        instruction, extra = _text(row, "instruction", where), str(row.get("input") or "").strip()
        content = f"{instruction}\n\n{extra}" if extra else instruction
        return {"prompt": [{"role": "user", "content": content}],
                "completion": [{"role": "assistant", "content": _text(row, "output", where)}]}
    if fmt == "prompt-completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            return {"prompt": prompt, "completion": completion}
        if isinstance(prompt, list) and isinstance(completion, list):
            return {"prompt": _turns(prompt, where), "completion": _turns(completion, where)}
        raise ValueError(f"{where}: 'prompt' and 'completion' must both be text, or both lists of turns.")
    turns = _turns(row.get("messages"), where)
    answers = [i for i, turn in enumerate(turns) if turn["role"] == "assistant"]
    if not answers:
        raise ValueError(f"{where}: a chat with no assistant turn, so nothing to learn from. Each 'messages' list "
                         "needs a {'role': 'assistant', 'content': ...} turn.")
    last = answers[-1]
    return {"prompt": turns[:last], "completion": [turns[last]]}


def _text(row: dict, column: str, where: str) -> str:
    value = row.get(column)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {column!r} is {'missing' if value is None else 'empty or not text'}.")
    return value


def _turns(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of {{'role', 'content'}} turns; got {value!r:.80}.")
    for turn in value:
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str) or "content" not in turn:
            raise ValueError(f"{where}: each turn needs a 'role' and a 'content'; got {turn!r:.80}.")
    return [{"role": turn["role"], "content": turn["content"]} for turn in value]


def held_out(records: list[dict]) -> tuple[list[dict], list[dict]]:
    """Train and validation records: a fixed shuffle, ``HELD_OUT_FRACTION`` (at least one) held out, each part in
    the file's order."""
    if len(records) < 2:
        raise ValueError(f"{len(records)} example(s): SFT needs at least 2 (one to train on, one to validate), or "
                         "a validation file of its own (--eval-file).")
    order = list(range(len(records)))
    random.Random(SPLIT_SEED).shuffle(order)
    validation = set(order[:max(1, int(len(records) * HELD_OUT_FRACTION))])
    return ([r for i, r in enumerate(records) if i not in validation],
            [r for i, r in enumerate(records) if i in validation])

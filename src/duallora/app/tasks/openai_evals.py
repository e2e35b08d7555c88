"""Two tasks from the data of OpenAI's ``evals==3.0.1.post1`` wheel (MIT), read from ``evals/registry/data/``:

- ``sarcasm``: 28,614 news headlines, sarcastic (The Onion) or not (HuffPost): the News Headlines Dataset for
  Sarcasm Detection (Misra and Arora, 2019). Two classes.
- ``quartz``: 3,860 two-way questions about qualitative relations (QuaRTz, Tafjord et al., 2019), scored as
  multiple choice by the answers' log-likelihood.

Both split 80/10/10 with the fixed split seed; a text that occurs twice is kept in one split.
"""

from __future__ import annotations

import json
import re

from . import Example, Task, deterministic_split
from .sources import Source, fetch

DATA = "evals/registry/data/"
FILES = {"sarcasm": "sarcasm/samples.jsonl", "quartz": "quartz/samples.jsonl"}
EVALS = Source(
    requirement="evals==3.0.1.post1", filename="evals-3.0.1.post1-py3-none-any.whl",
    sha256="0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", size_bytes=46_322_659,
    licence="MIT (the evals package)",
    members=tuple(DATA + path for path in FILES.values()),
)
EVALS_SUMMARIES = {"sarcasm": "news headlines: sarcastic (The Onion) or not (HuffPost)",
                   "quartz": "QuaRTz: 2-way questions about qualitative relations"}
EVALS_LICENCES = {"sarcasm": "as its authors publish it (Misra and Arora, 2019)", "quartz": "CC-BY-4.0"}
SARCASM_LABELS = ["not sarcastic", "sarcastic"]
QUARTZ_OPTIONS = re.compile(r"^(.*)\n\n A: (.*)\n B: (.*)$", re.S)  # "question\n\n A: up\n B: down"


def read_samples(name: str) -> list[dict]:
    path = fetch(EVALS) / DATA / FILES[name]
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _user_text(sample: dict) -> str:
    return next(m["content"] for m in reversed(sample["input"]) if m["role"] == "user")


def load_evals_task(name: str) -> Task:
    samples = read_samples(name)
    texts = [_user_text(s) for s in samples]
    if name == "sarcasm":
        examples = [Example(text, label=int(s["ideal"])) for text, s in zip(texts, samples)]
        return Task(name, "classification", *deterministic_split(examples, groups=texts, shuffled=True),
                    label_names=SARCASM_LABELS)
    if name == "quartz":
        examples = []
        for text, s in zip(texts, samples):
            question, a, b = QUARTZ_OPTIONS.match(text).groups()
            examples.append(Example(f"Question: {question.strip()}\nAnswer:", choices=[a.strip(), b.strip()],
                                    label="AB".index(s["ideal"])))
        return Task(name, "multiple_choice", *deterministic_split(examples, groups=texts, shuffled=True))
    raise ValueError(f"Unknown evals task {name!r}; valid: {sorted(FILES)}")

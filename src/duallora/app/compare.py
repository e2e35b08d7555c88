"""Many runs on one budget: every method x seed, then ``results.json``, a markdown table and a bar plot.

Finished runs (those with ``metrics.json``) are kept and skipped, and a run that was interrupted resumes from its
last checkpoint, so an interrupted compare picks up where it stopped.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path

from .train import RunConfig, atomic_write_text


def matched_rank(method: str, r: int) -> int:
    """The rank that gives ``method`` LoRA-at-r's parameter count where the method allows it: D2-LoRA's two
    branches hold 2 r (out + in) parameters, so it runs at r / 2; the others already match (DoRA adds its
    magnitude vector, full fine-tuning cannot match)."""
    return max(1, r // 2) if method == "d2" else r


def run_in_child(cfg: RunConfig, resume: bool) -> None:
    """One run in its own process: its time and peak memory are its own, and nothing leaks into the next run."""
    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    request = run_dir / "run_request.json"
    atomic_write_text(request, json.dumps(asdict(cfg), indent=2))
    cmd = [sys.executable, "-m", "duallora", "train", "--config", str(request), "--resume" if resume else "--overwrite"]
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise RuntimeError(f"The run {run_dir.name} failed (exit code {result.returncode}); see its output above. "
                           "Finished runs are kept: run the same compare again to continue.")


def compare(base: RunConfig, methods: list[str], seeds: list[int], progress: bool = True) -> dict:
    """Run every method x seed (each in its own process), then write results.json, results.md, results.png."""
    out = Path(base.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for method in methods:
        for seed in seeds:
            run_dir = out / f"{method}-seed{seed}"
            cfg = replace(base, method=method, seed=seed, r=matched_rank(method, base.r), output_dir=str(run_dir),
                          alpha=None if base.alpha is None else base.alpha * matched_rank(method, base.r) / base.r)
            if (run_dir / "metrics.json").exists():
                if progress:
                    print(f"{run_dir.name}: finished earlier, kept", flush=True)
            else:
                run_in_child(cfg, resume=(run_dir / "checkpoints").exists())
            runs.append(json.loads((run_dir / "metrics.json").read_text()))
    summary = summarise(runs)
    results = {"methods": methods, "seeds": seeds, "budget": {k: v for k, v in vars(base).items()
                                                              if k not in ("method", "seed", "output_dir")},
               "summary": summary, "runs": [_slim(m) for m in runs]}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    table = markdown_table(results)
    atomic_write_text(out / "results.md", table)
    plot_results(results, out / "results.png")
    return results


def _slim(metrics: dict) -> dict:
    """A run's entry in results.json: scores and costs, not its loss curve."""
    keep = ("method", "model", "task", "primary_metric", "test", "validation", "train_seconds", "peak_memory_mib",
            "trainable_params", "majority_baseline", "steps")
    return {**{k: metrics[k] for k in keep}, "seed": metrics["config"]["seed"], "r": metrics["config"]["r"]}


def summarise(runs: list[dict]) -> list[dict]:
    """Mean and standard deviation of the test score per method, with the costs."""
    by_method: dict[str, list[dict]] = {}
    for m in runs:
        by_method.setdefault(m["method"], []).append(m)
    rows = []
    for method, ms in by_method.items():
        metric = ms[0]["primary_metric"]
        scores = [m["test"][metric] for m in ms]
        rows.append({"method": method, "metric": metric, "mean": statistics.mean(scores),
                     "std": statistics.stdev(scores) if len(scores) > 1 else 0.0, "n": len(scores),
                     "trainable_params": ms[0]["trainable_params"], "r": ms[0]["config"]["r"],
                     "train_seconds": statistics.mean(m["train_seconds"] for m in ms),
                     "peak_memory_mib": max(m["peak_memory_mib"] for m in ms),
                     "majority_baseline": ms[0]["majority_baseline"]})
    return rows


def markdown_table(results: dict) -> str:
    rows = results["summary"]
    best = max(r["mean"] for r in rows)
    first = results["runs"][0]
    lines = [f"{first['model']} / {first['task']}, {first['steps']} steps, seeds {results['seeds']}; test "
             f"{rows[0]['metric']} (mean ± std over seeds)" +
             (f"; majority class {rows[0]['majority_baseline']:.3f}" if rows[0]["majority_baseline"] else "") + ".",
             "", f"| method | r | trainable params | test {rows[0]['metric']} | train time | peak memory |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        score = f"{r['mean']:.4f} ± {r['std']:.4f}"
        score = f"**{score}**" if r["mean"] == best else score
        lines.append(f"| {r['method']} | {r['r']} | {r['trainable_params']:,} | {score} | {r['train_seconds']:.0f} s "
                     f"| {r['peak_memory_mib']:.0f} MiB |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict, path: Path) -> None:
    """Bars of the mean test score per method with the standard deviation over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["summary"]
    fig, ax = plt.subplots(figsize=(1.4 * len(rows) + 2, 3.8))
    ax.bar([r["method"] for r in rows], [r["mean"] for r in rows], yerr=[r["std"] for r in rows], capsize=6,
           color=["tab:orange" if r["method"] in ("dual", "d2") else "tab:gray" for r in rows])
    if rows[0]["majority_baseline"]:
        ax.axhline(rows[0]["majority_baseline"], color="black", linestyle=":", label="majority class")
        ax.legend(loc="lower right")
    low = min([r["mean"] - r["std"] for r in rows] + [rows[0]["majority_baseline"] or float("inf")])
    ax.set_ylim(max(0.0, low - 0.1 * abs(low)), None)  # zoomed to the scores, the majority line kept in view
    ax.set_ylabel(f"test {rows[0]['metric']}")
    run = results["runs"][0]
    ax.set_title(f"{run['model']} / {run['task']} ({len(results['seeds'])} seed(s))")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['trainable_params'] / 1e3:.0f}k params", (i, r["mean"]), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 8), textcoords="offset points")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

"""Measure Dual LoRA's Gaussian init std (and the LoRA baseline) on the quickstart task; pick the default.

Writes ``docs/init_std_sweep.json``, ``docs/init_std_sweep.md`` (the table docs/methods/dual_lora.md links) and a
loss-curve plot ``docs/init_std_sweep.png``.
Usage: ``python examples/sweep_init_std.py [steps]``; ``--table`` rebuilds the table from the JSON only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from line_plot import save_line_plot  # noqa: E402
from quickstart import finetune  # noqa: E402

DOCS = Path(__file__).parent.parent / "docs"
# None is the shipped default, 0.25 / sqrt(in_features); "fan_in" is the per-factor 1/sqrt(fan-in) candidate
STDS = (None, "fan_in", 0.05, 0.02, 0.01, 0.005)
RUNS = [("lora", {}, 1e-3)] + [("dual", {"init_std": std}, 1e-3) for std in STDS]


def label(result: dict) -> str:
    if result["method"] != "dual":
        return "LoRA (Kaiming A, zero B)"
    std = result["method_options"].get("init_std")
    return {None: "**0.25 / sqrt(in) (default): 0.0128 at in=384, 0.0064 at in=1536**",
            "fan_in": "1 / sqrt(fan-in) per factor"}.get(std, str(std))


def table(results: list[dict]) -> str:
    first = results[0]
    lines = [f"MiniLM + BBC News (5 classes), all-linear, r={first['r']}, {first['steps']} steps of batch 16, "
             f"AdamW lr {first['lr']}, seed {first['seed']}; majority class {first['majority_baseline']:.3f}.",
             "", "| method | init std | train loss (last 10 steps) | test accuracy |", "| --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['method']} | {label(r)} | {r['last_10_loss']:.3f} | {r['test_accuracy']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Training-loss curves (moving average over 10 steps), one per run."""
    lines = []
    for r in results:
        losses = r["losses"]
        smooth = [sum(losses[max(0, i - 9):i + 1]) / len(losses[max(0, i - 9):i + 1]) for i in range(len(losses))]
        lines.append((f"{r['method']}: {label(r).strip('*')}", list(range(1, len(smooth) + 1)), smooth,
                      r["method"] == "lora"))
    save_line_plot(lines, path, "optimizer step", "training loss (10-step mean)",
                   "Dual LoRA init std vs LoRA, MiniLM + BBC News")


def main() -> None:
    if "--table" in sys.argv:
        results = json.loads((DOCS / "init_std_sweep.json").read_text())
    else:
        steps = int(sys.argv[1]) if len(sys.argv) > 1 else 60
        results = []
        for method, options, lr in RUNS:
            results.append(finetune(method, steps=steps, lr=lr, progress=False, **options))
            print(f"{method} {options}: test accuracy {results[-1]['test_accuracy']:.3f}", flush=True)
        DOCS.mkdir(exist_ok=True)
        (DOCS / "init_std_sweep.json").write_text(json.dumps(results, indent=1))
    (DOCS / "init_std_sweep.md").write_text(table(results))
    plot(results, DOCS / "init_std_sweep.png")
    print(table(results))


if __name__ == "__main__":
    main()

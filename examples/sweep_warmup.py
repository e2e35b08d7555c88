"""Measure Dual LoRA's warm-up length against the run's length; the measurement behind ``warmup_steps="auto"``.

Dual LoRA scales ``dW`` by ``lam_t = min(1, t / warmup_steps)``. A fixed 100-step warm-up leaves a 20-step run at
``lam = 0.2``; no warm-up at all leaves the random factors' ``dW`` in from the first step. This runs the command
line's own training (``duallora train``) at several run lengths with warm-ups of 0, 100 (the fixed default of 0.2)
and ``ceil(T / 10)`` capped at 100 (the auto rule), with LoRA as the control (no warm-up is not run past
1,000 steps):

- classification: MiniLM on rated-sentiment (3 classes), all-linear r=8, batch 16, 64 tokens, lr 1e-3 with the
  default 6 % linear warm-up and decay; validation accuracy on 500 examples; 3 seeds at 20 and 100 steps, 1 above;
- SFT: SmolLM2 on alpaca-demo, 20 steps of batch 4, 256 tokens; validation loss on 32 held-out examples.

Writes ``docs/warmup_sweep.json`` after every run (a rerun skips the runs it holds), ``docs/warmup_sweep.md`` (the
table docs/methods/dual_lora.md links) and ``docs/warmup_sweep.png``.
Usage: ``python examples/sweep_warmup.py [--lengths 20,100,400,2000]``; ``--table`` rebuilds table and plot only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

sys.path.insert(0, str(Path(__file__).parent))
from line_plot import save_line_plot  # noqa: E402

from duallora import auto_warmup_steps  # noqa: E402
from duallora.app.run_config import RunConfig  # noqa: E402
from duallora.app.train import train  # noqa: E402

DOCS = Path(__file__).parent.parent / "docs"
RESULTS = DOCS / "warmup_sweep.json"
SETTINGS = ("lora", "dual, no warm-up", "dual, 100 steps", "dual, auto")
SHORT = dict(zip(("lora", "off", "100", "auto"), SETTINGS))  # --settings' names
CLASSIFICATION = dict(model="minilm", task="rated-sentiment", max_length=64, batch_size=16, max_eval_examples=500)
SFT = dict(model="smollm2", task="alpaca-demo", max_length=256, batch_size=4, max_eval_examples=32)


def seeds_for(steps: int) -> tuple[int, ...]:
    return (0, 1, 2) if steps <= 100 else (0,)


def warmup_of(setting: str, steps: int) -> int | None:
    return {"dual, no warm-up": 0, "dual, 100 steps": 100, "dual, auto": auto_warmup_steps(steps)}.get(setting)


def plan(lengths: list[int], settings: tuple[str, ...] = SETTINGS, sft: bool = True) -> list[dict]:
    """Every run, shortest first; a setting whose warm-up equals another's at that length is run once."""
    runs = []
    for kind, steps_list in (("classification", [n for n in lengths if n <= 100]), ("sft", [20] if sft else []),
                             ("classification", [n for n in lengths if n > 100])):
        for steps in steps_list:
            seen = set()
            # past 1,000 steps the Dual LoRA run first: a sweep cut short by time still has the setting that matters
            for setting in [s for s in (SETTINGS if steps <= 1000 else SETTINGS[1:] + SETTINGS[:1]) if s in settings]:
                warmup = warmup_of(setting, steps)
                if setting != "lora" and warmup in seen:
                    continue  # the auto rule gives 100 from 1,000 steps on: the same run as "dual, 100 steps"
                if warmup == 0 and steps > 1000:
                    continue  # 40 minutes of CPU to confirm a setting that no default takes
                seen.add(warmup)
                for seed in seeds_for(steps) if kind == "classification" else (0,):
                    runs.append({"kind": kind, "steps": steps, "setting": setting, "warmup_steps": warmup,
                                 "seed": seed})
    return runs


def key(run: dict) -> tuple:
    return run["kind"], run["steps"], run["setting"], run["seed"]


def measure(run: dict) -> dict:
    options = CLASSIFICATION if run["kind"] == "classification" else SFT
    method = "lora" if run["setting"] == "lora" else "dual"
    with tempfile.TemporaryDirectory() as out:
        cfg = RunConfig(method=method, max_steps=run["steps"], seed=run["seed"], output_dir=out,
                        warmup_steps=run["warmup_steps"], **options)
        metrics = train(cfg, overwrite=True, progress=False)
    primary = metrics["primary_metric"]
    return {**run, "metric": primary, "validation": metrics["validation"][primary],
            "base_validation": metrics.get("base_validation", {}).get(primary),
            "last_10_loss": statistics.mean(metrics["losses"][-10:]), "train_seconds": metrics["train_seconds"]}


def runs_of(results: list[dict], kind: str, steps: int, setting: str) -> list[dict]:
    """The runs of a setting at a run length; a Dual LoRA setting takes any Dual run with its warm-up (from 1,000
    steps the auto rule's run is the 100-step one)."""
    if setting == "lora":
        return [r for r in results if (r["kind"], r["steps"], r["setting"]) == (kind, steps, "lora")]
    warmup = warmup_of(setting, steps)
    return [r for r in results if (r["kind"], r["steps"], r["warmup_steps"]) == (kind, steps, warmup)
            and r["setting"] != "lora"]


def cell(results: list[dict], kind: str, steps: int, setting: str) -> str:
    """Mean ± std of the validation score over seeds, and the mean training loss of the last 10 steps."""
    runs = runs_of(results, kind, steps, setting)
    if not runs:
        return "not run"
    values = [r["validation"] for r in runs]
    text = f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")
    return text + f" (train loss {statistics.mean(r['last_10_loss'] for r in runs):.3f})"


def table(results: list[dict]) -> str:
    lines = []
    for kind, title, metric in (("classification", "MiniLM, rated-sentiment (3 classes)", "validation accuracy"),
                                ("sft", "SmolLM2, alpaca-demo", "validation loss (lower is better)")):
        lengths = sorted({r["steps"] for r in results if r["kind"] == kind})
        if not lengths:
            continue
        options = CLASSIFICATION if kind == "classification" else SFT
        seeds = ", ".join(f"{len(seeds_for(n)) if kind == 'classification' else 1} seed(s) at {n}" for n in lengths)
        base = [r["base_validation"] for r in results if r["kind"] == kind and r["base_validation"] is not None]
        lines += [f"**{title}**: {metric} (and the mean training loss of the last 10 steps), batch "
                  f"{options['batch_size']}, {options['max_length']} tokens, r=8 all-linear, lr 1e-3; mean ± std "
                  f"over seeds ({seeds})"
                  + (f"; the base model's loss {base[0]:.4f}." if base else "."), "",
                  "| warm-up | " + " | ".join(f"{n} steps" for n in lengths) + " |",
                  "| --- | " + " | ".join("---" for _ in lengths) + " |"]
        for setting in SETTINGS:
            label = setting if setting != "dual, auto" else "dual, auto: ceil(T / 10), at most 100"
            lines.append(f"| {label} | " + " | ".join(cell(results, kind, n, setting) for n in lengths) + " |")
        lines.append("")
    lines.append("Written by `python examples/sweep_warmup.py` (it runs what docs/warmup_sweep.json lacks; `--table` "
                 "rebuilds this page and the plot from it). One run per cell above 100 steps: read differences "
                 "there against the spread over seeds at 100.")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    """Validation accuracy against run length, one line per warm-up setting (classification)."""
    lengths = sorted({r["steps"] for r in results if r["kind"] == "classification"})
    lines = []
    for setting in SETTINGS:
        points = [(n, statistics.mean(r["validation"] for r in runs)) for n in lengths
                  if (runs := runs_of(results, "classification", n, setting))]
        if points:
            lines.append((setting, *map(list, zip(*points)), setting == "lora"))
    save_line_plot(lines, path, "run length (optimizer steps)", "validation accuracy",
                   "Dual LoRA warm-up vs run length, MiniLM + rated-sentiment", log_x=True, marker="o")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default="20,100,400,2000", help="classification run lengths, comma-separated")
    parser.add_argument("--settings", default=",".join(SHORT),
                        help=f"the settings to run, comma-separated, from {list(SHORT)}")
    parser.add_argument("--no-sft", action="store_true", help="leave out the SmolLM2 SFT runs")
    parser.add_argument("--table", action="store_true", help="rebuild the table and plot from the JSON only")
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    if not args.table:
        done = {key(r) for r in results}
        lengths = [int(n) for n in args.lengths.split(",")]
        settings = tuple(SHORT[name] for name in args.settings.split(","))
        todo = [run for run in plan(lengths, settings, not args.no_sft) if key(run) not in done]
        for i, run in enumerate(todo, 1):
            results.append(measure(run))
            RESULTS.write_text(json.dumps(results, indent=1))
            print(f"[{i}/{len(todo)}] {run['kind']} {run['steps']} steps, {run['setting']} (warm-up "
                  f"{run['warmup_steps']}), seed {run['seed']}: {results[-1]['metric']} "
                  f"{results[-1]['validation']:.4f}", file=sys.stderr, flush=True)
    (DOCS / "warmup_sweep.md").write_text(table(results))
    plot(results, DOCS / "warmup_sweep.png")
    print(table(results))


if __name__ == "__main__":
    main()

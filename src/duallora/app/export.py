"""`duallora export --to-lora`: a trained run's Dual LoRA or D2-LoRA adapter as plain peft LoRA adapters at one or
more ranks K (``duallora.save_as_lora``), with each layer's relative Frobenius error of the rank-K approximation of
``dW`` and, with ``--evaluate``, the task score of each LoRA adapter (loaded by peft alone) against the adapter's own.
Writes ``lora-r{K}/`` per rank and ``export.json``, ``export.md`` and ``export.png`` in the output directory."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from .run_files import atomic_write_text


def _module_kind(layer: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``self_attn.q_proj``: the layer's place within a block."""
    parts = layer.split(".")
    digits = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[digits[-1] + 1:]) if digits else layer


def export_run(run_dir: str | Path, ranks: list[int], output: str | Path, evaluate_split: Optional[str] = None,
               max_examples: Optional[int] = None, overwrite: bool = False) -> dict:
    """Export the run in ``run_dir`` at each rank of ``ranks`` to ``output``; the report (also written as JSON,
    markdown and a plot)."""
    from .. import save_as_lora
    from ..core.lora_export import total_error
    from .evaluate import PRIMARY_METRIC, evaluate
    from .train import load_trained

    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} is not empty; pass --overwrite to replace what is there, or choose another "
                              "--output.")
    model, tokenizer, task, cfg = load_trained(run_dir)
    if cfg.method not in ("dual", "d2"):
        raise ValueError(f"{run_dir} is a {cfg.method} run: --to-lora converts Dual LoRA and D2-LoRA adapters "
                         "(a LoRA adapter serves as it is; for other peft methods see peft.convert_to_lora).")
    metric = PRIMARY_METRIC[task.kind]
    examples = task.split(evaluate_split)[:max_examples] if evaluate_split else []
    report = {"run": str(run_dir), "method": cfg.method, "model": cfg.model, "task": task.name, "r": cfg.r,
              "metric": metric, "split": evaluate_split, "examples": len(examples), "exports": []}
    if examples:
        report["score_before"] = evaluate(model, tokenizer, task, examples, cfg.max_length)[metric]
    for rank in ranks:
        path = out / f"lora-r{rank}"
        errors = save_as_lora(path, model, rank, progressbar=True)
        written = max(e["rank"] for e in errors)  # the adapter's r: below K where K exceeds every layer's rank
        if written < rank:
            print(f"rank {rank} exceeds every layer's full rank: written at r={written} (exact)")
        entry = {"rank": rank, "r_written": written, "path": str(path), "total_error": total_error(errors),
                 "mean_error": statistics.mean(e["relative_error"] for e in errors),
                 "max_error": max(e["relative_error"] for e in errors), "layers": errors}
        if examples:
            entry["score_after"] = evaluate(load_lora(cfg, path), tokenizer, task, examples, cfg.max_length)[metric]
        report["exports"].append(entry)
        print(f"rank {rank}: relative Frobenius error of dW {entry['total_error']:.3f} over all layers (per layer "
              f"{entry['mean_error']:.3f} mean, {entry['max_error']:.3f} max)"
              + (f"; {metric} {100 * entry['score_after']:.1f} (adapter {100 * report['score_before']:.1f})"
                 if examples else "") + f" -> {path}")
    atomic_write_text(out / "export.json", json.dumps(report, indent=1))
    atomic_write_text(out / "export.md", markdown(report))
    plot(report, out / "export.png")
    return report


def load_lora(cfg, path: Path):
    """A fresh base model of the run with the exported LoRA adapter, loaded by peft alone."""
    from peft import PeftModel

    from .train import base_parts

    base, _, _ = base_parts(cfg)
    return PeftModel.from_pretrained(base, str(path))


def _points(value: float, metric: str) -> float:
    return 100 * value if metric == "accuracy" else value


def markdown(report: dict) -> str:
    metric, exports = report["metric"], report["exports"]
    scored = "score_before" in report
    lines = [f"{report['method']} r={report['r']} on {report['model']} / {report['task']} exported to LoRA by "
             "truncated SVD of each layer's dW (a layer narrower than K is exact at its full rank). Error: "
             "||dW - B A||_F / ||dW||_F." + (f" Scores: {metric} on {report['examples']} {report['split']} "
                                              "examples, each LoRA adapter loaded by peft alone." if scored else ""),
             "", "| K | error, all layers | mean per layer | max per layer |" + (f" {metric} |" if scored else ""),
             "| --- | --- | --- | --- |" + (" --- |" if scored else "")]
    if scored:
        lines.append(f"| adapter | 0 | 0 | 0 | {_points(report['score_before'], metric):.1f} |")
    for e in exports:
        lines.append(f"| {e['rank']} | {e['total_error']:.3f} | {e['mean_error']:.3f} | {e['max_error']:.3f} |"
                     + (f" {_points(e['score_after'], metric):.1f} |" if scored else ""))
    kinds = list(dict.fromkeys(_module_kind(row["layer"]) for row in exports[0]["layers"]))
    lines += ["", "Mean relative error per module kind:", "",
              "| module | shape | " + " | ".join(f"K={e['rank']}" for e in exports) + " |",
              "| --- | --- |" + " --- |" * len(exports)]
    for kind in kinds:
        rows = [[r for r in e["layers"] if _module_kind(r["layer"]) == kind] for e in exports]
        shape = "x".join(map(str, rows[0][0]["shape"]))
        lines.append(f"| {kind} | {shape} | " + " | ".join(
            f"{statistics.mean(r['relative_error'] for r in group):.3f}" for group in rows) + " |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> None:
    """Relative error per layer (model order), one line per K."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(max(6.0, 0.05 * len(report["exports"][0]["layers"]) + 5), 4))
    for e in report["exports"]:
        ax.plot([r["relative_error"] for r in e["layers"]], linewidth=1.2,
                label=f"K={e['rank']} (all layers {e['total_error']:.2f})")
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("adapted layer (model order)")
    ax.set_ylabel("||dW - B A||_F / ||dW||_F")
    ax.set_title(f"{report['method']} r={report['r']} on {report['model']} / {report['task']}: LoRA export error")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

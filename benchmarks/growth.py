"""How step time and peak memory grow with the rank and with the sequence length, LoRA against Dual LoRA (and DoRA),
each point measured in its own process by ``train_step.py``.

    python benchmarks/growth.py [--model smollm2] [--ranks 8,16,32,64,128] [--seqs 64,128,256,512,1024]

Writes ``docs/bench/growth_<model>.json``, ``.md`` and ``.png`` (four panels: time and memory against rank at
batch x 128 tokens, and against sequence length at rank 16).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOCS = HERE.parent / "docs" / "bench"


def point(method: str, model: str, r: int, batch: int, seq: int, steps: int) -> dict:
    cmd = [sys.executable, str(HERE / "train_step.py"), "--child", method, "--model", model, "--r", str(r),
           "--batch", str(batch), "--seq", str(seq), "--steps", str(steps), "--precision", "fp32"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{method} r={r} seq={seq} failed:\n{out.stderr[-2000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "r": r, "seq": seq, "batch": batch}


def plot(rows: list[dict], methods: list[str], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for column, (sweep, key) in enumerate((("rank", "r"), ("seq", "seq"))):
        for method in methods:
            pts = sorted((r[key], r) for r in rows if r["sweep"] == sweep and r["method"] == method)
            xs = [x for x, _ in pts]
            axes[0][column].plot(xs, [r["step_seconds"] for _, r in pts], "o-", label=method)
            axes[1][column].plot(xs, [r["peak_mib"] for _, r in pts], "o-", label=method)
        for row, label in enumerate(("step time (s)", "peak memory (MiB)")):
            ax = axes[row][column]
            ax.set_xscale("log", base=2)
            ax.set_xlabel("rank r" if sweep == "rank" else "sequence length (tokens)")
            ax.set_ylabel(label)
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "minilm", "tiny"])
    parser.add_argument("--methods", default="lora,dual,dora")
    parser.add_argument("--ranks", default="8,16,32,64,128")
    parser.add_argument("--seqs", default="64,128,256,512,1024")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output-dir", default=str(DOCS))
    args = parser.parse_args()
    methods = args.methods.split(",")
    rows = []
    for method in methods:
        for r in (int(v) for v in args.ranks.split(",")):
            rows.append({**point(method, args.model, r, args.batch, 128, args.steps), "sweep": "rank"})
            print(f"{method} r={r}: {rows[-1]['step_seconds']:.2f} s, {rows[-1]['peak_mib']:.0f} MiB", flush=True)
        for seq in (int(v) for v in args.seqs.split(",")):
            rows.append({**point(method, args.model, 16, args.batch, seq, args.steps), "sweep": "seq"})
            print(f"{method} seq={seq}: {rows[-1]['step_seconds']:.2f} s, {rows[-1]['peak_mib']:.0f} MiB", flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"growth_{args.model}"
    stem.with_suffix(".json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    lines = [f"{args.model}, all linear layers, float32, batch {args.batch}; rank sweep at 128 tokens, sequence sweep "
             f"at r=16; median of {args.steps} steps.", "", "| sweep | value | " + " | ".join(
                 f"{m} time | {m} memory" for m in methods) + " |", "|" + " --- |" * (2 + 2 * len(methods))]
    for sweep, key in (("rank", "r"), ("seq", "seq")):
        for value in sorted({r[key] for r in rows if r["sweep"] == sweep}):
            cells = []
            for m in methods:
                hit = next(r for r in rows if r["sweep"] == sweep and r["method"] == m and r[key] == value)
                cells.append(f"{hit['step_seconds']:.2f} s | {hit['peak_mib']:.0f} MiB")
            lines.append(f"| {sweep} | {value} | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(rows, methods, stem.with_suffix(".png"), f"Growth on {args.model}: " + " vs ".join(methods))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Row blocks on a large layer: the memory the block bound saves, and what it costs in time, on a LLaMA-7B MLP
shape. Each configuration runs in its own process, so its peak memory is its own.

    python benchmarks/large_layer.py          # 4096x11008 and 11008x4096 (out x in), 2048 tokens, r=16, float32

Writes ``docs/bench/large_layer.json`` and ``.md``.

Without blocks the memory-efficient Functions hold a handful of ``out x in`` float32 matrices at once (P, Q, the
built W, the weight gradient G, the two branch gradients: 180 MiB each at 4096 x 11008). With ``block_mib`` they are
built for as many output rows as fit in the bound, so that set shrinks to blocks of at most ``block_mib`` each, and
the factor gradients are summed over the blocks. "Extra peak" is the peak resident memory of one forward + backward
minus that of the frozen layer doing the same (its own y, input gradient and weight are common to all).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from train_step import PeakRss

DOCS = Path(__file__).resolve().parent.parent / "docs" / "bench"
# (name, method, block_mib): None = whole matrices
CONFIGS = [("frozen", "frozen", None), ("lora", "lora", None), ("dual-whole", "dual", None),
           ("dual-64MiB", "dual", 64.0), ("dual-16MiB", "dual", 16.0), ("dual-4MiB", "dual", 4.0),
           ("d2-whole", "d2", None), ("d2-64MiB", "d2", 64.0)]


def build(method: str, block_mib, out_f: int, in_f: int, r: int):
    import torch
    from peft import LoraConfig, get_peft_model

    from duallora import D2LoraConfig, DualLoraConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False))
    model[0].weight.requires_grad_(False)
    if method == "frozen":
        return model
    config = {"lora": lambda: LoraConfig(r=r, target_modules=["0"]),
              "dual": lambda: DualLoraConfig(r=r, target_modules=["0"], warmup_steps=0, block_mib=block_mib),
              "d2": lambda: D2LoraConfig(r=r, target_modules=["0"], block_mib=block_mib)}[method]()
    return get_peft_model(model, config)


def measure(name: str, args) -> dict:
    import torch

    _, method, block_mib = next(c for c in CONFIGS if c[0] == name)
    out_f, in_f = args.shape
    model = build(method, block_mib, out_f, in_f, args.r)
    x = torch.randn(args.tokens, in_f, requires_grad=True)  # a layer inside a network also returns the input grad
    g = torch.randn(args.tokens, out_f)

    def step():
        model(x).backward(g)
        for p in model.parameters():
            p.grad = None
        x.grad = None

    step()  # warm-up: compile, allocator
    if args.measure == "memory":
        with PeakRss() as rss:
            step()
        return {"peak_mib": rss.peak / 2**20}
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"config": name, "method": method, "block_mib": block_mib, "shape": [out_f, in_f],
            "seconds": statistics.median(times)}


def child(name: str, shape: str, args, measure: str) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--shape", shape, "--tokens", str(args.tokens), "--r",
           str(args.r), "--repeats", str(args.repeats), "--measure", measure]
    # Memory runs map every allocation of 1 MiB or more on its own (returned to the system when freed): glibc keeps
    # freed heap blocks below its dynamic mmap threshold (up to 32 MiB) in the process, so the RSS of block-sized
    # transients would show fragmentation rather than live memory. Time runs keep the default allocator, whose reuse
    # of freed memory is what a training run sees (mapping every block anew costs page faults).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)} if measure == "memory" else None
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{shape} {name} ({measure}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def blocks(out_f: int, in_f: int, block_mib) -> int:
    from duallora.core.blocked import KernelOptions

    rows = KernelOptions(block_mib=block_mib).rows_per_block(out_f, in_f, 4)
    return -(-out_f // rows)


def markdown(payload: dict) -> str:
    a = payload["args"]
    lines = [f"One Linear, {a['tokens']} tokens, r={a['r']}, float32, forward + backward (input gradient included); "
             f"time: median of {a['repeats']} after a warm-up; peak resident memory: one step after a warm-up, in its "
             f"own process, every allocation of 1 MiB or more mapped on its own (so freed blocks leave); "
             f"{payload['device']}. One out x in float32 matrix is 4 out in bytes.", "",
             "| layer (out x in) | configuration | blocks | extra peak over frozen | vs whole | time | vs whole |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for shape in dict.fromkeys(tuple(r["shape"]) for r in payload["rows"]):
        rows = [r for r in payload["rows"] if tuple(r["shape"]) == shape]
        frozen = next(r for r in rows if r["method"] == "frozen")["peak_mib"]
        for r in rows:
            if r["method"] == "frozen":
                continue
            extra = r["peak_mib"] - frozen
            whole = next((w for w in rows if w["method"] == r["method"] and w["block_mib"] is None), None)
            vs_memory = vs_time = n_blocks = "-"
            if r["method"] in ("dual", "d2"):
                n_blocks = blocks(*shape, r["block_mib"])
            if r["method"] in ("dual", "d2") and whole is not None:
                vs_memory = f"{extra / (whole['peak_mib'] - frozen):.2f}x"
                vs_time = f"{r['seconds'] / whole['seconds']:.2f}x"
            lines.append(f"| {shape[0]}x{shape[1]} | {r['config']} | {n_blocks} | {extra:.0f} MiB | {vs_memory} | "
                         f"{r['seconds']:.2f} s | {vs_time} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4096x11008,11008x4096", help="out x in, comma-separated")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--configs", default=",".join(c[0] for c in CONFIGS))
    parser.add_argument("--output-dir", default=str(DOCS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    parser.add_argument("--measure", choices=["time", "memory"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.shape = [int(v) for v in args.shape.split("x")]
        print(json.dumps(measure(args.child, args)))
        return
    import torch

    rows = []
    for shape in args.shapes.split(","):
        for name in args.configs.split(","):
            rows.append({**child(name, shape, args, "time"), **child(name, shape, args, "memory")})
            print(f"{shape} {name}: {rows[-1]['seconds']:.2f} s, peak {rows[-1]['peak_mib']:.0f} MiB", flush=True)
    payload = {"args": vars(args), "device": f"CPU, {torch.get_num_threads()} threads", "rows": rows}
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "large_layer.json").write_text(json.dumps(payload, indent=1))
    (out_dir / "large_layer.md").write_text(markdown(payload))
    print("\n" + markdown(payload))


if __name__ == "__main__":
    main()

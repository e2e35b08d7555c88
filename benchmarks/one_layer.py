"""One adapted Linear layer: forward + backward time, memory kept for backward and peak memory, next to the FLOP
and byte counts of a simple cost model, so that the cost model can be checked.

    python benchmarks/one_layer.py                      # 2048x2048 and 4096x4096, 2048 tokens, r=16, float32

Writes ``docs/bench/one_layer.json`` and ``.md``.

Cost model (T tokens, a layer of out x in, rank r, one step):

- frozen layer: forward ``x W0^T`` and input gradient ``g W0``: 4 T out in FLOPs.
- LoRA: the same plus 6 T r (out + in): its extra activations are ``x`` (shared) and ``x A^T`` (T x r).
- Dual LoRA (memory-efficient): plus the full weight gradient ``G = g^T x`` (2 T out in) and about 16 r out in
  FLOPs for the factor products; keeps only ``x`` and the factors for backward, and holds a few ``out x in``
  float32 transients at a time (4 out in bytes each) while it builds ``W`` and the factor gradients.
- full fine-tuning: 6 T out in FLOPs, and the optimizer state of out x in parameters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs" / "bench"
METHODS = ("frozen", "lora", "dora", "dual", "dual-bf16-grad", "dual-autograd", "d2", "full")


def build(method: str, out_f: int, in_f: int, r: int):
    from peft import LoraConfig, get_peft_model

    from duallora import D2LoraConfig, DualLoraConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(in_f, out_f, bias=False))
    configs = {
        "lora": lambda: LoraConfig(r=r, target_modules=["0"]),
        "dora": lambda: LoraConfig(r=r, use_dora=True, target_modules=["0"]),
        "dual": lambda: DualLoraConfig(r=r, target_modules=["0"], warmup_steps=0),
        "dual-bf16-grad": lambda: DualLoraConfig(r=r, target_modules=["0"], warmup_steps=0,
                                                 weight_grad_dtype="bfloat16"),
        "dual-autograd": lambda: DualLoraConfig(r=r, target_modules=["0"], warmup_steps=0, memory_efficient=False),
        "d2": lambda: D2LoraConfig(r=r, target_modules=["0"]),
    }
    if method in configs:
        return get_peft_model(model, configs[method]())
    model[0].weight.requires_grad_(method == "full")
    return model


def saved_bytes(model, x) -> int:
    """Bytes autograd keeps from forward to backward, parameters and the input excluded (they exist anyway)."""
    held = {p.data_ptr() for p in model.parameters()} | {x.data_ptr()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in held:
            held.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.backward(torch.ones_like(y))
    return total


def measure(method: str, out_f: int, in_f: int, tokens: int, r: int, repeats: int) -> dict:
    model = build(method, out_f, in_f, r)
    x = torch.randn(tokens, in_f, requires_grad=True)
    g = torch.randn(tokens, out_f)

    def step():
        y = model(x)
        y.backward(g)
        for p in model.parameters():
            p.grad = None
        x.grad = None

    for _ in range(2):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    oi, t = out_f * in_f, tokens
    flops = {"frozen": 4 * t * oi, "lora": 4 * t * oi + 6 * t * r * (out_f + in_f),
             "dora": 4 * t * oi + 6 * t * r * (out_f + in_f) + 4 * r * oi,
             "full": 6 * t * oi}.get(method, 6 * t * oi + 16 * r * oi)
    seconds = statistics.median(times)
    return {"method": method, "shape": [out_f, in_f], "tokens": tokens, "ms": 1e3 * seconds,
            "saved_for_backward_mib": saved_bytes(model, x) / 2**20, "model_gflop": flops / 1e9,
            "gflop_per_s": flops / seconds / 1e9, "weight_mib": 4 * oi / 2**20}


def markdown(rows: list[dict]) -> str:
    lines = ["| layer | method | fwd+bwd | vs frozen | vs LoRA | kept for backward | GFLOP (model) | GFLOP/s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        same = [x for x in rows if x["shape"] == r["shape"]]
        frozen = next(x for x in same if x["method"] == "frozen")["ms"]
        lora = next(x for x in same if x["method"] == "lora")["ms"]
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['method']} | {r['ms']:.1f} ms | "
                     f"{r['ms'] / frozen:.2f}x | {r['ms'] / lora:.2f}x | {r['saved_for_backward_mib']:.1f} MiB | "
                     f"{r['model_gflop']:.1f} | {r['gflop_per_s']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2048x2048,4096x4096")
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--output-dir", default=str(DOCS))
    args = parser.parse_args()
    rows = []
    for shape in args.shapes.split(","):
        out_f, in_f = (int(v) for v in shape.split("x"))
        for method in args.methods.split(","):
            rows.append(measure(method, out_f, in_f, args.tokens, args.r, args.repeats))
            print(f"{shape} {method}: {rows[-1]['ms']:.1f} ms, kept {rows[-1]['saved_for_backward_mib']:.1f} MiB",
                  flush=True)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "one_layer.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / "one_layer.md").write_text(
        f"{args.tokens} tokens, r={args.r}, float32, CPU {torch.get_num_threads()} threads; median of "
        f"{args.repeats}.\n\n" + markdown(rows))
    print(markdown(rows))


if __name__ == "__main__":
    main()

"""Training step on a mixture-of-experts model with the experts adapted (``target_parameters``): time, peak memory and
the memory autograd keeps for the backward, per method, as ratios against peft's LoRA on the same parameters.

    python benchmarks/moe.py                                  # random-init Mixtral: 16 experts, hidden 1024, width 768
    python benchmarks/moe.py --precision bf16
    python benchmarks/moe.py --experts 4 --hidden 64 --width 48 --layers 1 --steps 1 --batch 1 --seq 16  # smoke

Each method runs in its own process on the same random-init model (transformers' Mixtral with its default
``grouped_mm`` experts), ``target_parameters=["gate_up_proj", "down_proj"]`` and nothing else adapted, r=16,
dropout 0 (peft refuses dropout on parameters), AdamW. Time is the median of ``--steps`` steps after a warm-up step;
peak memory the process's resident set during the measured steps (CUDA's allocator peak on a GPU); "kept for
backward" counts the bytes of the tensors autograd saves in one forward, the parameters and the input excluded.
In each forward, peft builds every expert's ``W + s B A`` in one ``baddbmm``; Dual LoRA and D2-LoRA build ``f(W0)`` in
row blocks and keep only their factors (the adapted stack itself is kept by the experts' matmuls, as LoRA's is).

Writes ``docs/bench/moe_<precision>.json`` and ``.md`` (``moe_<precision>_block<N>`` with ``--block-mib N``: the
bound on each of the transient blocks Dual LoRA and D2-LoRA build ``f(W0)`` and its gradients in; 16 MiB by
default). Timings on a shared CPU vary by about 15 %: compare the ratios of one run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "bench"
METHODS = ("lora", "dual", "d2", "dual-eager", "d2-eager")
# a method run without torch.compile (DUALLORA_COMPILE=0): the compiled kernels' share of time and memory, the
# compiler's own runtime included (in a CPU process's resident set, not in a GPU's allocator)
ENVIRONMENT = {"dual-eager": {"DUALLORA_COMPILE": "0"}, "d2-eager": {"DUALLORA_COMPILE": "0"}}
TARGETS = [  # (method, metric, bound, description): the goals of the MoE issue, against LoRA
    ("dual", "peak_mib", 1.0, "Dual LoRA peak memory <= LoRA"),
    ("dual", "step_seconds", 1.5, "Dual LoRA step time <= 1.5x LoRA"),
    ("dual", "kept_mib", 1.0, "Dual LoRA kept for backward <= LoRA"),
    ("d2", "peak_mib", 1.0, "D2-LoRA peak memory <= LoRA"),
    ("d2", "step_seconds", 1.5, "D2-LoRA step time <= 1.5x LoRA"),
]


def build(args, method: str):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import MixtralConfig, MixtralForCausalLM

    from duallora import D2LoraConfig, DualLoraConfig

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.width,
                           num_hidden_layers=args.layers, num_attention_heads=max(1, args.hidden // 64),
                           num_key_value_heads=max(1, args.hidden // 256), num_local_experts=args.experts,
                           num_experts_per_tok=2, max_position_embeddings=max(512, args.seq))
    model = MixtralForCausalLM(config)
    if args.precision == "bf16":
        model = model.to(torch.bfloat16)
    targets = dict(r=args.r, target_modules=[], target_parameters=["gate_up_proj", "down_proj"])
    ours = {"block_mib": args.block_mib}
    peft_config = {"lora": lambda: LoraConfig(**targets), "dual": lambda: DualLoraConfig(**targets, **ours),
                   "d2": lambda: D2LoraConfig(**targets, **ours)}[method.removesuffix("-eager")]()
    return get_peft_model(model, peft_config).train()  # factors in float32 (peft's autocast_adapter_dtype)


def kept_for_backward(model, ids) -> int:
    """Bytes of the tensors autograd saves in one forward (each storage once), parameters and input excluded."""
    import torch

    held = {p.untyped_storage().data_ptr() for p in model.parameters()} | {ids.untyped_storage().data_ptr()}
    total = 0

    def pack(t):
        nonlocal total
        ptr = t.untyped_storage().data_ptr()
        if ptr not in held:
            held.add(ptr)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return total


def measure(method: str, args) -> dict:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_step import timed_steps

    model = build(args, method)
    cuda = torch.cuda.is_available()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    if cuda:
        model, ids = model.cuda(), ids.cuda()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: the compiler, the allocator, the optimizer state
    kept = kept_for_backward(model, ids)
    times, peak = timed_steps(step, args.steps, cuda)
    stacks = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if p.dim() == 3) / 2**20
    return {"method": method, "step_seconds": statistics.median(times), "all_step_seconds": times, "peak_mib": peak,
            "kept_mib": kept / 2**20, "expert_stacks_mib": stacks,
            "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)}


def check_targets(results: dict) -> list[dict]:
    checks = []
    for method, metric, bound, text in TARGETS:
        if method in results and "lora" in results:
            ratio = results[method][metric] / results["lora"][metric]
            checks.append({"target": text, "ratio": ratio, "bound": bound, "holds": round(ratio, 2) <= bound})
    return checks


def markdown(payload: dict) -> str:
    a = payload["args"]
    results = payload["results"]
    lora = next(r for r in results if r["method"] == "lora")
    lines = [f"Mixtral, random init: {a['layers']} layers, {a['experts']} experts (top 2), hidden {a['hidden']}, "
             f"expert "
             f"width {a['width']}, vocab {a['vocab']}; target_parameters gate_up_proj and down_proj, r={a['r']}, "
             f"dropout 0, block_mib {a['block_mib']:g}; batch {a['batch']}x{a['seq']}, {a['precision']}, AdamW; "
             f"median of {a['steps']} steps after a "
             f"warm-up step; one process per method; {payload['device']}. The expert stacks hold "
             f"{lora['expert_stacks_mib']:.0f} MiB.", "",
             "Ratios of one run: on a shared CPU, timings vary by about 15 %. `-eager`: without torch.compile.", "",
             "| method | trainable | step time | vs LoRA | peak memory | vs LoRA | kept for backward | vs LoRA |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['step_seconds']:.3f} s | "
                     f"{r['step_seconds'] / lora['step_seconds']:.2f}x | {r['peak_mib']:.0f} MiB | "
                     f"{r['peak_mib'] / lora['peak_mib']:.2f}x | {r['kept_mib']:.0f} MiB | "
                     f"{r['kept_mib'] / lora['kept_mib']:.2f}x |")
    if payload["targets"]:
        lines += ["", "| target | measured | holds |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['ratio']:.2f}x | {'yes' if t['holds'] else 'no'} |"
                  for t in payload["targets"]]
    lines += ["", f"Regenerate: `{payload['command']}`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--width", type=int, default=768, help="each expert's intermediate size")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--block-mib", type=float, default=16.0, help="Dual/D2: the bound on each transient block")
    parser.add_argument("--output-dir", default=str(DOCS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args)))
        return
    import torch
    from tqdm import tqdm

    results = []
    progress = tqdm(args.methods.split(","), desc="methods", unit="method")
    for method in progress:
        progress.set_postfix(method=method)
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", method], capture_output=True,
                             text=True, check=True, env={**os.environ, **ENVIRONMENT.get(method, {})})
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        progress.write(f"{method}: {r['step_seconds']:.3f} s/step, peak {r['peak_mib']:.0f} MiB, "
                       f"kept {r['kept_mib']:.0f} MiB")
    cpu = f"CPU ({torch.get_num_threads()} threads)"
    payload = {"args": vars(args) | {"child": None},
               "device": torch.cuda.get_device_name() if torch.cuda.is_available() else cpu,
               "command": "python benchmarks/moe.py " + " ".join(sys.argv[1:]),
               "results": results, "targets": check_targets({r["method"]: r for r in results})}
    block = "" if args.block_mib == 16.0 else f"_block{args.block_mib:g}"
    stem = Path(args.output_dir) / f"moe_{args.precision}{block}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    stem.with_suffix(".md").write_text(markdown(payload))
    print(markdown(payload))


if __name__ == "__main__":
    main()

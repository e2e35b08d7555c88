"""One prepared command that proves correctness, speed and memory on a CUDA machine.

    python benchmarks/gpu_check.py --out DIR              # on one GPU: at most --budget-s (480 s), no network
    python benchmarks/gpu_check.py --dry-run --out DIR    # the same code paths on the CPU at toy sizes, < 1 minute

1. Correctness: per method (Dual LoRA, D2-LoRA) and precision (fp32, bf16 autocast, fp16 autocast with a
   GradScaler), on one layer of Llama-3-8B's MLP width: the compiled kernels against the eager reference (forward,
   every factor gradient, the input gradient), the memory-efficient path against plain autograd, merged against
   unmerged, within bounds derived from each precision (``gpu_correctness.bound``). A failure is printed and
   recorded, and the command exits 1.
2. Training step, bf16 autocast over bf16 random-weight LLaMAs at SmolLM2-135M, Llama-3.2-1B and Llama-3-8B widths
   (8B: 4 decoder layers), all seven linear types adapted at r = 16, batch x sequence 8 x 512 and 1 x 2048,
   gradient checkpointing off and on: median time of --steps steps after two warm-up steps and peak memory, each
   method on a fresh model, as ratios against peft's LoRA in the same run; first, at Llama-3-8B widths on a 4-bit
   NF4 base (bitsandbytes, double quantization, bf16 compute), QLoRA against QDual and QD2. Cases run in order of
   importance; those the time budget leaves out are listed as skipped.
3. A profiler table of the top kernels of one Llama-3-8B decoder layer, Dual LoRA against LoRA.

Writes DIR/gpu_check.json (the device, torch/CUDA/driver versions, every figure) and DIR/gpu_check.md (tables, and
the targets with whether each holds, and where one is missed, by how much and why, with FLOP and byte counts).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from gpu_correctness import run_checks
from gpu_speed import METHODS, MODELS, QUANTIZED_METHODS, StepCase, measure, profile_layer, release
from gpu_report import markdown, targets

GPU_PLAN = {"correctness": {"out_features": 14336, "in_features": 4096, "tokens": 2048},
            "profile": ("llama-3-8b", 4096),
            "quantized_cases": [StepCase("llama-3-8b", 1, 2048, ckpt, quantized=True) for ckpt in (False, True)],
            "cases": [StepCase(m, b, s, ckpt) for ckpt in (False, True) for m in ("llama-3.2-1b", "llama-3-8b",
                                                                                  "smollm2-135m")
                      for b, s in ((8, 512), (1, 2048))]}
DRY_PLAN = {"correctness": {"out_features": 96, "in_features": 64, "tokens": 48},
            "profile": ("toy", 64),
            "quantized_cases": [StepCase("toy", 1, 64, True, quantized=True)],
            "cases": [StepCase("toy", b, s, ckpt) for ckpt in (False, True) for b, s in ((2, 32), (1, 64))]}


def environment(device: str) -> dict:
    import peft
    import transformers

    import duallora

    env = {"device": torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads",
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "transformers": transformers.__version__, "peft": peft.__version__, "duallora": duallora.__version__}
    if device == "cuda":
        try:
            env["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                           capture_output=True, text=True, timeout=30).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            env["driver"] = None
        try:
            import triton

            env["triton"] = triton.__version__
        except ImportError:
            env["triton"] = None
    return env


def run(plan: dict, device: str, budget_s: float, steps: int, methods: list[str]) -> dict:
    started = time.monotonic()

    def out_of_time() -> bool:
        return time.monotonic() - started > budget_s

    print(f"correctness on one {plan['correctness']['out_features']} x {plan['correctness']['in_features']} layer",
          flush=True)
    checks, skipped = run_checks(plan["correctness"], device, out_of_time)
    for c in checks:
        if not c["holds"]:
            print(f"FAILED {c['method']} {c['precision']} {c['what']}: {c['difference']:.3g} > bound {c['bound']:.3g}",
                  flush=True)
    profile = {}
    if not out_of_time():
        print(f"profiling one {plan['profile'][0]} decoder layer", flush=True)
        profile = profile_layer(*plan["profile"], device=device)
    else:
        skipped.append("profile")
    steps_measured = []
    # the 4-bit rows first: few, and the only measurement of QLoRA against QDual
    quantized = [(case, m) for case in plan["quantized_cases"] for m in QUANTIZED_METHODS if m in methods]
    if quantized and importlib.util.find_spec("bitsandbytes") is None:
        skipped += [f"{case.label} {m} (bitsandbytes is not installed)" for case, m in quantized]
        quantized = []
    for case, method in quantized + [(case, m) for case in plan["cases"] for m in methods]:
        if out_of_time():
            skipped.append(f"{case.label} {method}")
            continue
        try:
            steps_measured.append(measure(case, method, device, steps))
            release(device)
            r = steps_measured[-1]
            print(f"{case.label:28s} {method:15s} {r['step_seconds'] * 1e3:9.1f} ms {r['peak_mib']:9.0f} MiB",
                  flush=True)
        except torch.OutOfMemoryError as err:
            steps_measured.append({"case": case.label, **case.__dict__, "method": method, "error": str(err)[:200]})
            release(device)
    return {"checks": checks, "profile": profile, "step_results": steps_measured, "skipped": skipped,
            "seconds": time.monotonic() - started}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory for gpu_check.json and gpu_check.md")
    parser.add_argument("--dry-run", action="store_true", help="the same code paths on the CPU at toy sizes")
    parser.add_argument("--budget-s", type=float, default=None, help="time for the whole run (default 480; dry: 50)")
    parser.add_argument("--steps", type=int, default=5, help="measured steps per method and case (median)")
    parser.add_argument("--methods", default=",".join(METHODS))
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; run with --dry-run for the CPU's toy version", file=sys.stderr)
        return 2
    device = "cpu" if args.dry_run else "cuda"
    plan = DRY_PLAN if args.dry_run else GPU_PLAN
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown or "lora" not in methods:
        print(f"gpu_check: --methods must include lora (the baseline) and name only {list(METHODS)}; got {unknown}",
              file=sys.stderr)
        return 2
    budget = args.budget_s if args.budget_s is not None else (50.0 if args.dry_run else 480.0)
    results = run(plan, device, budget, args.steps, methods)
    payload = {"environment": environment(device), "dry_run": args.dry_run, "budget_s": budget,
               "measured_steps": args.steps,
               "command": " ".join(["python benchmarks/gpu_check.py", *(argv if argv is not None else sys.argv[1:])]),
               "models": {name: MODELS[name] for name in sorted({c.model for c in plan["cases"]})}, **results}
    payload["targets"] = targets(payload)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=1))
    (out / "gpu_check.md").write_text(markdown(payload))
    failed = [c for c in results["checks"] if not c["holds"]]
    print(f"\n{len(results['checks']) - len(failed)} of {len(results['checks'])} correctness checks hold; "
          f"{len(results['step_results'])} step measurements, {len(results['skipped'])} skipped; "
          f"{results['seconds']:.0f} s. Written: {out / 'gpu_check.json'}, {out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())

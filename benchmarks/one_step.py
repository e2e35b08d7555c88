"""Time and peak memory of one training step on the embedded SmolLM2, one process per method.

Default: all linear layers, r=16, batch 8 x 128 tokens, float32, AdamW. Reports the median step time over the
measured steps (after one warm-up step) and the peak RSS during the steps, as ratios against peft's LoRA
measured in the same run. Writes ``docs/one_step.json`` and ``docs/one_step.md``.

    python benchmarks/one_step.py [--methods lora,dual,dual-autograd,dora,d2] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

METHODS = ("lora", "dora", "dual", "dual-autograd", "d2")


def adapter_config(method: str, r: int):
    from peft import LoraConfig

    from duallora import D2LoraConfig, DualLoraConfig

    common = dict(r=r, lora_alpha=2 * r, target_modules="all-linear")
    return {
        "lora": lambda: LoraConfig(**common),
        "dora": lambda: LoraConfig(use_dora=True, **common),
        "dual": lambda: DualLoraConfig(**common),
        "dual-autograd": lambda: DualLoraConfig(memory_efficient=False, **common),
        "d2": lambda: D2LoraConfig(**common),
    }[method]()


class PeakRss:
    """Samples this process's resident set size every 2 ms; ``peak`` is the highest value seen."""

    def __init__(self):
        self.peak, self._stop = 0, threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE")

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def __enter__(self):
        self.peak = self.current()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def measure(method: str, r: int, batch: int, seq: int, steps: int) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from duallora.models import smollm2_path

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(smollm2_path()), adapter_config(method, r))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, optimizer state
    times = []
    with PeakRss() as rss:
        before = rss.current()
        for _ in range(steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
    return {"method": method, "step_seconds": statistics.median(times), "all_step_seconds": times,
            "peak_rss_mib": rss.peak / 2**20, "rss_before_mib": before / 2**20,
            "trainable_params": model.get_nb_trainable_parameters()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,dual,dual-autograd,dora,d2")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.r, args.batch, args.seq, args.steps)))
        return
    from duallora.models import smollm2_path

    smollm2_path()  # convert once, outside the measured processes
    results = []
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--child", method, "--r", str(args.r), "--batch", str(args.batch),
               "--seq", str(args.seq), "--steps", str(args.steps)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(out))
        print(f"{method}: {results[-1]['step_seconds']:.2f} s, peak {results[-1]['peak_rss_mib']:.0f} MiB", flush=True)
    table = markdown_table(results, args)
    print("\n" + table)
    docs = Path(__file__).parent.parent / "docs"
    docs.mkdir(exist_ok=True)
    (docs / "one_step.json").write_text(json.dumps({"config": vars(args), "results": results}, indent=1))
    (docs / "one_step.md").write_text(table)


def markdown_table(results: list[dict], args) -> str:
    lora = next((r for r in results if r["method"] == "lora"), results[0])
    lines = [f"SmolLM2-135M, all linear layers, r={args.r}, batch {args.batch}x{args.seq}, float32, AdamW; median of "
             f"{args.steps} steps after one warm-up step, one process per method, ratios against peft LoRA in the "
             "same run.", "", "| method | trainable | step time | vs LoRA | peak RSS | vs LoRA |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['step_seconds']:.2f} s | "
                     f"{r['step_seconds'] / lora['step_seconds']:.2f}x | {r['peak_rss_mib']:.0f} MiB | "
                     f"{r['peak_rss_mib'] / lora['peak_rss_mib']:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

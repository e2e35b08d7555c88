"""Training-step time and peak memory per method, each method in its own process, as ratios against peft's LoRA
measured in the same run, with the performance targets checked.

    python benchmarks/train_step.py --model smollm2 --precision fp32      # all linear layers, r=16, batch 8 x 128
    python benchmarks/train_step.py --model smollm2 --precision bf16
    python benchmarks/train_step.py --model minilm --batch 16             # MiniLM all-linear, 16 x 128
    python benchmarks/train_step.py --model tiny --steps 2                # smoke test (a tiny random LLaMA)
    python benchmarks/train_step.py --model smollm2 --quantize 4bit       # QLoRA, QDoRA, QDual, QD2 on an NF4 base

Writes ``docs/bench/train_step_<model>_<precision>.json``, ``.md`` and ``.png`` (``--replot`` redraws the last two
from the JSON). Time is the median of ``--steps`` steps after
one warm-up step; with ``--quantize`` every method trains on the same bitsandbytes-quantized base (NF4 with double
quantization, or LLM.int8()), prepared as QLoRA prepares it, and the file names end in ``_4bit`` / ``_8bit``; memory
is the peak resident set size during the measured steps (``torch.cuda.max_memory_allocated``
on a GPU). Timings on a shared CPU vary by about 15 % between runs: compare ratios from one run.
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

DOCS = Path(__file__).resolve().parent.parent / "docs" / "bench"
METHODS = ("lora", "lora-2r", "loraplus", "dora", "hira", "dual", "dual-eager", "dual-bf16-grad", "dual-autograd",
           "d2", "d2-nocache", "full")
# methods that are another method run with an environment setting: dual-eager is dual without torch.compile, so
# that the compiled kernels' share of time and memory (the compiler's runtime included) can be read off;
# d2-nocache is D2-LoRA computing n(W0) in every forward, as before its cache (a dequantization on a 4-bit base)
ENVIRONMENT = {"dual-eager": {"DUALLORA_COMPILE": "0"}, "d2-nocache": {"DUALLORA_NORM_CACHE": "0"}}
QUANTIZED_METHODS = ("lora", "dora", "dual", "d2", "d2-nocache")  # QLoRA, QDoRA, QDual, QD2: each against QLoRA
TARGETS = [  # (method, metric, against, bound, description)
    ("dual", "peak_mib", "lora", 0.85, "Dual LoRA peak memory <= 0.85x LoRA"),
    ("dual", "step_seconds", "lora", 1.15, "Dual LoRA step time <= 1.15x LoRA"),
    ("dual", "peak_mib", "dora", 1.0, "Dual LoRA memory below DoRA"),
    ("dual", "step_seconds", "dora", 1.0, "Dual LoRA time below DoRA"),
    ("dual-bf16-grad", "step_seconds", "lora", 1.15, "Dual LoRA (bf16 weight gradient) time <= 1.15x LoRA"),
    ("dual", "peak_mib", "hira", 1.0, "Dual LoRA memory below HiRA (the other full-rank update)"),
    ("dual", "step_seconds", "hira", 1.0, "Dual LoRA time below HiRA"),
    ("d2", "peak_mib", "dora", 1.0, "D2-LoRA memory <= DoRA"),
    ("d2", "step_seconds", "dora", 1.0, "D2-LoRA time <= DoRA"),
    ("d2", "step_seconds", "d2-nocache", 1.0, "D2-LoRA with its n(W0) cache no slower than without"),
]


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


def timed_steps(step, steps: int, cuda: bool) -> tuple[list[float], float]:
    """Seconds of each of ``steps`` calls of ``step`` and the peak memory in MiB over them (CUDA's allocator on a GPU,
    the resident set on the CPU); call it after a warm-up step."""
    import torch

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    with PeakRss() as rss:
        for _ in range(steps):
            start = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    return times, (torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.peak / 2**20)


def load_model(name: str, quantize: str | None = None):
    """(model, task_type) for a benchmark model; ``quantize`` loads it 4-bit or 8-bit, prepared for k-bit training."""
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from duallora.app.models import minilm_path, quantization_config, smollm2_path

    extra = {} if quantize is None else {"quantization_config": quantization_config(quantize, torch.float32)}
    if name == "smollm2":
        model, task_type = AutoModelForCausalLM.from_pretrained(smollm2_path(), **extra), "CAUSAL_LM"
    elif name == "minilm":
        model, task_type = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=4,
                                                                              **extra), "SEQ_CLS"
    else:
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=128, max_position_embeddings=512)
        model, task_type = LlamaForCausalLM(config), "CAUSAL_LM"
        if quantize is not None:  # bitsandbytes quantizes while loading: through a checkpoint
            with tempfile.TemporaryDirectory() as path:
                model.save_pretrained(path)
                model = LlamaForCausalLM.from_pretrained(path, **extra)
    if quantize is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, task_type


def measure(method: str, args) -> dict:
    import torch
    from peft import get_peft_model

    from duallora.app.run_config import optimizer as make_optimizer
    from variants import VARIANTS, peft_config

    torch.manual_seed(0)
    model, task_type = load_model(args.model, args.quantize)
    config = peft_config(method, args.r, task_type)
    if config is not None:
        model = get_peft_model(model, config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(model, VARIANTS[method].method, lr=1e-5)  # AdamW; LoRA+'s groups for loraplus
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq))
    labels = ids if task_type == "CAUSAL_LM" else torch.randint(0, 4, (args.batch,))
    use_bf16 = args.precision == "bf16"
    cuda = torch.cuda.is_available()
    if cuda:
        model.cuda()
        ids, labels = ids.cuda(), labels.cuda()

    def step():
        with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up: allocator, optimizer state
    times, peak = timed_steps(step, args.steps, cuda)
    return {"method": method, "step_seconds": statistics.median(times), "all_step_seconds": times,
            "peak_mib": peak, "trainable_params": sum(p.numel() for p in params)}


def answered_alone(args, stem: Path, write_outputs, measure) -> bool:
    """The two calls that run no benchmark: ``--replot`` redraws the outputs at ``stem`` from their JSON, and
    ``--child METHOD`` (one of :func:`measure_in_children`'s processes) prints one method's measurement."""
    if args.replot:
        write_outputs(json.loads(stem.with_suffix(".json").read_text()), stem)
    elif args.child:
        print(json.dumps(measure(args.child, args)))
    return bool(args.replot or args.child)


def measure_in_children(script: str, args, environment: dict | None = None) -> list[dict]:
    """``script --child METHOD`` with the same options, one process per method of ``args.methods`` (so that time
    and memory are each method's own), its result the last line it prints; ``environment``: extra variables of a
    method's process."""
    results = []
    for method in args.methods.split(","):
        cmd = [sys.executable, script, "--child", method] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("child", "methods", "output_dir", "replot") and v is not None]
        out = subprocess.run(cmd, capture_output=True, text=True,
                             env={**os.environ, **(environment or {}).get(method, {})})
        if out.returncode != 0:
            raise RuntimeError(f"{method} failed:\n{out.stderr[-3000:]}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{method}: {results[-1]['step_seconds']:.3f} s, {results[-1]['peak_mib']:.0f} MiB", flush=True)
    return results


def check_targets(results: dict[str, dict]) -> list[dict]:
    checks = []
    for method, metric, against, bound, text in TARGETS:
        if method in results and against in results:
            ratio = results[method][metric] / results[against][metric]
            checks.append({"target": text, "ratio": ratio, "bound": bound, "holds": ratio <= bound})
    return checks


def markdown_rows(results: list[dict]) -> list[str]:
    """The table of step time and peak memory per method, each also as a multiple of LoRA's."""
    lora = next((r for r in results if r["method"] == "lora"), results[0])
    lines = ["| method | trainable | step time | vs LoRA | peak memory | vs LoRA |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        lines.append(f"| {r['method']} | {r['trainable_params']:,} | {r['step_seconds']:.3f} s | "
                     f"{r['step_seconds'] / lora['step_seconds']:.2f}x | {r['peak_mib']:.0f} MiB | "
                     f"{r['peak_mib'] / lora['peak_mib']:.2f}x |")
    return lines


def markdown(payload: dict) -> str:
    a = payload["args"]
    base = {None: "", "4bit": " on its NF4 4-bit base (QLoRA's: lora is QLoRA, dora QDoRA)",
            "8bit": " on its LLM.int8() 8-bit base"}[a.get("quantize")]
    lines = [f"{a['model']}{base}, all linear layers, r={a['r']}, batch {a['batch']}x{a['seq']}, {a['precision']}, "
             f"AdamW; median of {a['steps']} steps after a warm-up step; one process per method; "
             f"{payload['device']}.", ""] + markdown_rows(payload["results"])
    if payload["targets"]:
        lines += ["", "| target | measured | holds |", "| --- | --- | --- |"]
        for t in payload["targets"]:
            lines.append(f"| {t['target']} | {t['ratio']:.2f}x | {'yes' if t['holds'] else 'no'} |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path, title: str) -> None:
    """Two panels of bars, step time and peak memory as multiples of LoRA's, with the target lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lora = next((r for r in results if r["method"] == "lora"), results[0])
    names = [r["method"] for r in results]
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, metric, label, target in ((axes[0], "step_seconds", "step time", 1.15), (axes[1], "peak_mib",
                                                                                      "peak memory", 0.85)):
        ratios = [r[metric] / lora[metric] for r in results]
        colors = ["tab:orange" if n.startswith(("dual", "d2")) else "tab:gray" for n in names]
        ax.bar(names, ratios, color=colors)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(target, color="tab:red", linestyle=":", label=f"Dual LoRA target ({target}x)")
        for i, v in enumerate(ratios):
            ax.annotate(f"{v:.2f}x", (i, v), ha="center", va="bottom", fontsize=8)
        ax.set_ylim(0, 1.3 * max(ratios))  # headroom for the labels and the legend
        ax.set_ylabel(f"{label} / LoRA's")
        ax.tick_params(axis="x", rotation=30)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(payload: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    stem.with_suffix(".md").write_text(markdown(payload))
    a = payload["args"]
    base = f", {a['quantize']} base" if a.get("quantize") else ""
    plot(payload["results"], stem.with_suffix(".png"),
         f"Training step, {a['model']}{base}, r={a['r']}, batch {a['batch']}x{a['seq']}, {a['precision']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "minilm", "tiny"])
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--methods", help=f"comma-separated, from {METHODS} (default: all; with --quantize: "
                                          f"{','.join(QUANTIZED_METHODS)})")
    parser.add_argument("--quantize", choices=["4bit", "8bit"],
                        help="train every method on the same bitsandbytes-quantized base")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--output-dir", default=str(DOCS))
    parser.add_argument("--tag", help="appended to the output files' names (some methods, beside the full run)")
    parser.add_argument("--replot", action="store_true",
                        help="redraw the table and plot from the JSON of an earlier run of these options")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.methods = args.methods or ",".join(QUANTIZED_METHODS if args.quantize else METHODS)
    if args.quantize and "full" in args.methods.split(","):
        parser.error("full fine-tuning cannot train a quantized base: drop it from --methods")
    suffix = (f"_{args.quantize}" if args.quantize else "") + (f"_{args.tag}" if args.tag else "")
    stem = Path(args.output_dir) / f"train_step_{args.model}_{args.precision}{suffix}"
    if answered_alone(args, stem, write_outputs, measure):
        return
    import torch

    if args.model == "smollm2":
        from duallora.app.models import smollm2_path

        smollm2_path()  # convert the GGUF once, outside the measured processes
    results = measure_in_children(__file__, args, ENVIRONMENT)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    payload = {"args": vars(args), "device": device, "results": results,
               "targets": check_targets({r["method"]: r for r in results})}
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_outputs(payload, stem)
    print("\n" + markdown(payload))


if __name__ == "__main__":
    main()

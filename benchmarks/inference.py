"""Inference throughput: the base model, a merged adapter, and an unmerged adapter in eval mode (which reuses its
cached adapted weight), on the embedded SmolLM2 (all linear layers, r=16), forward passes of batch x seq tokens.

    python benchmarks/inference.py [--model smollm2|tiny] [--batch 8] [--seq 128] [--repeats 5]

Writes ``docs/bench/inference_<model>.json`` and ``.md`` with the targets checked: merged >= 0.98x the base
model's tokens/s; unmerged with the cache >= 0.95x merged.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

DOCS = Path(__file__).resolve().parent.parent / "docs" / "bench"


def load(name: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from duallora.app.models import smollm2_path

    torch.manual_seed(0)
    if name == "smollm2":
        return AutoModelForCausalLM.from_pretrained(smollm2_path())
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=128))


def variants(name: str):
    """(label, model) pairs, each built fresh from the same base weights; adapters get non-zero factors."""
    from peft import LoraConfig, get_peft_model

    from duallora import D2LoraConfig, DualLoraConfig

    def adapted(config):
        model = get_peft_model(load(name), config)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.01)  # a trained-looking adapter (a fresh D2 or LoRA adapter is the identity)
        return model

    common = dict(r=16, lora_alpha=32, target_modules="all-linear")
    yield "base", load(name)
    yield "dual merged", adapted(DualLoraConfig(warmup_steps=0, **common)).merge_and_unload()
    yield "dual unmerged (cached dW)", adapted(DualLoraConfig(warmup_steps=0, **common))
    yield "d2 merged", adapted(D2LoraConfig(**common)).merge_and_unload()
    yield "d2 unmerged (cached W)", adapted(D2LoraConfig(**common))
    yield "lora unmerged (peft)", adapted(LoraConfig(**common))


def tokens_per_second(model, ids, repeats: int) -> float:
    model.eval()
    with torch.no_grad():
        for _ in range(2):
            model(input_ids=ids)  # warm-up, and the adapters build their cached weight here
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(input_ids=ids)
            times.append(time.perf_counter() - start)
    return ids.numel() / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output-dir", default=str(DOCS))
    args = parser.parse_args()
    rows = []
    for label, model in variants(args.model):
        ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq))
        rows.append({"variant": label, "tokens_per_s": tokens_per_second(model, ids, args.repeats)})
        print(f"{label}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
        del model
    by = {r["variant"]: r["tokens_per_s"] for r in rows}
    targets = [
        ("Dual merged >= 0.98x base", by["dual merged"] / by["base"], 0.98),
        ("Dual unmerged with cache >= 0.95x merged", by["dual unmerged (cached dW)"] / by["dual merged"], 0.95),
        ("D2 merged >= 0.98x base", by["d2 merged"] / by["base"], 0.98),
        ("D2 unmerged with cache >= 0.95x merged", by["d2 unmerged (cached W)"] / by["d2 merged"], 0.95),
    ]
    lines = [f"{args.model}, eval forward of {args.batch}x{args.seq} tokens, float32, median of {args.repeats}, "
             f"CPU {torch.get_num_threads()} threads.", "", "| variant | tokens/s | vs base |", "| --- | --- | --- |"]
    lines += [f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['tokens_per_s'] / by['base']:.2f}x |" for r in rows]
    lines += ["", "| target | measured | holds |", "| --- | --- | --- |"]
    lines += [f"| {text} | {ratio:.2f}x | {'yes' if ratio >= bound else 'no'} |" for text, ratio, bound in targets]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"inference_{args.model}.json").write_text(json.dumps(
        {"args": vars(args), "rows": rows, "targets": [{"target": t, "ratio": r, "bound": b, "holds": r >= b}
                                                        for t, r, b in targets]}, indent=1))
    (out / f"inference_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""Mixed-batch inference cost: ``model(ids, adapter_names=[...])`` with 2 and 4 distinct adapters in a batch, against
the forward of the same batch through one adapter (with its eval cache, the serving path, and without it), for
Dual LoRA, D2-LoRA and peft's LoRA, on the embedded SmolLM2 (all linear layers, r=16), eval mode, float32.

    python benchmarks/mixed_batch.py [--model smollm2|tiny] [--batch 8] [--seq 64] [--repeats 3]

Rows are grouped per adapter, so a mixed batch costs one pass per distinct adapter, each building that adapter's
weight in row blocks (no cached copy per adapter). Writes ``docs/bench/mixed_batch_<model>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from inference import DOCS, load

ADAPTERS = ("a0", "a1", "a2", "a3")


def with_adapters(name: str, method: str):
    """Four adapters with different non-zero factors (a fresh D2 or LoRA adapter is the identity)."""
    from peft import LoraConfig, get_peft_model

    from duallora import D2LoraConfig, DualLoraConfig

    def config(eval_cache: bool = True):
        common = dict(r=16, lora_alpha=32, target_modules="all-linear")
        if method == "lora":
            return LoraConfig(**common)
        cls = DualLoraConfig if method == "dual" else D2LoraConfig
        return cls(eval_cache=eval_cache, **({"warmup_steps": 0} if method == "dual" else {}), **common)

    model = get_peft_model(load(name), config(), adapter_name=ADAPTERS[0])
    for adapter in ADAPTERS[1:]:
        model.add_adapter(adapter, config())
    with torch.no_grad():
        for i, (n, p) in enumerate(model.named_parameters()):
            if "lora_" in n:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(i))
    return model.eval()


def seconds(call, repeats: int) -> float:
    with torch.no_grad():
        call()  # warm-up (the single adapter builds its cached weight here)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def set_eval_cache(model, on: bool) -> None:
    from duallora.core.layer import AdaptedLayer

    for m in model.modules():
        if isinstance(m, AdaptedLayer):
            m.eval_cache = {name: on for name in m.eval_cache}
            m.clear_eval_cache()


def measure(name: str, method: str, batch: int, seq: int, repeats: int) -> list[dict]:
    model = with_adapters(name, method)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    model.set_adapter(ADAPTERS[0])
    single = "one adapter" if method == "lora" else "one adapter, eval cache"  # LoRA has no cache to reuse
    rows = [{"method": method, "case": single, "s": seconds(lambda: model(input_ids=ids), repeats)}]
    if method != "lora":
        set_eval_cache(model, False)
        rows.append({"method": method, "case": "one adapter, no cache",
                     "s": seconds(lambda: model(input_ids=ids), repeats)})
        set_eval_cache(model, True)
    for distinct in (2, 4):
        names = [ADAPTERS[i % distinct] for i in range(batch)]
        rows.append({"method": method, "case": f"mixed, {distinct} adapters",
                     "s": seconds(lambda: model(input_ids=ids, adapter_names=names), repeats)})
    for row in rows:
        row["vs_one_cached"] = row["s"] / rows[0]["s"]
        print(f"{method} {row['case']}: {row['s']:.3f} s ({row['vs_one_cached']:.2f}x)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output-dir", default=str(DOCS))
    args = parser.parse_args()
    rows = [row for method in ("dual", "d2", "lora") for row in measure(args.model, method, args.batch, args.seq,
                                                                          args.repeats)]
    lines = [f"{args.model}, eval forward of {args.batch}x{args.seq} tokens, float32, all linear layers at r=16, "
             f"median of {args.repeats}, CPU {torch.get_num_threads()} threads. Command: `python "
             f"benchmarks/mixed_batch.py --model {args.model} --batch {args.batch} --seq {args.seq} --repeats "
             f"{args.repeats}`.", "",
             "| method | case | seconds | vs one adapter |", "| --- | --- | --- | --- |"]
    lines += [f"| {r['method']} | {r['case']} | {r['s']:.3f} | {r['vs_one_cached']:.2f}x |" for r in rows]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"mixed_batch_{args.model}.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    (out / f"mixed_batch_{args.model}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

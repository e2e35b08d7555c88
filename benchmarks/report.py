"""Put the benchmark tables from ``docs/bench/*.md`` into docs/performance.md, between its ``bench`` markers.

    python benchmarks/report.py

Run it after the benchmarks, so the page shows what they measured (never edit the tables by hand).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = [
    ("Training step, SmolLM2-135M, float32", "train_step_smollm2_fp32"),
    ("Training step, SmolLM2-135M, bf16 autocast", "train_step_smollm2_bf16"),
    ("Training step, SmolLM2-135M on a 4-bit NF4 base: QLoRA, QDoRA, QDual, QD2", "train_step_smollm2_fp32_4bit"),
    ("Training step, MiniLM, float32", "train_step_minilm_fp32"),
    ("SFT step through TRL's SFTTrainer, SmolLM2-135M, packed 512-token sequences (benchmarks/sft_step.py)",
     "sft_step_smollm2"),
    ("One layer, against the cost model", "one_layer"),
    ("Large layers in row blocks (LLaMA-7B MLP shapes)", "large_layer"),
    ("Inference, SmolLM2-135M", "inference_smollm2"),
    ("Mixed batches (several adapters in one batch), SmolLM2-135M", "mixed_batch_smollm2"),
    ("Growth with rank and sequence length, SmolLM2-135M", "growth_smollm2"),
    ("Memory per GPU at scale (LLaMA-2 7B and 70B), and on one GPU with a 4-bit base (Llama-3 8B and 70B): "
     "arithmetic model", "memory_per_gpu"),
    ("D2-LoRA's n(W0) cache, SmolLM2-135M, float32", "train_step_smollm2_fp32_normcache"),
    ("D2-LoRA's n(W0) cache, SmolLM2-135M on a 4-bit NF4 base", "train_step_smollm2_fp32_4bit_normcache"),
    ("D2-LoRA's n(W0) cache, SmolLM2-135M on a 4-bit NF4 base, batch 4x64",
     "train_step_smollm2_fp32_4bit_normcache_4x64"),
    ("Mixture of experts: Mixtral's expert stacks (target_parameters), float32", "moe_fp32"),
    ("Mixture of experts, float32, block_mib=4", "moe_fp32_block4"),
    ("Mixture of experts, bf16", "moe_bf16"),
]
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def render() -> str:
    parts = []
    for title, stem in SECTIONS:
        path = ROOT / "docs" / "bench" / f"{stem}.md"
        if path.exists():
            plot = path.with_suffix(".png")
            figure = f"\n![{title}](bench/{plot.name})\n" if plot.exists() else ""
            parts.append(f"### {title}\n\n{path.read_text().strip()}\n{figure}")
    return "\n".join(parts)


def main() -> None:
    page = ROOT / "docs" / "performance.md"
    text = page.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"docs/performance.md lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    page.write_text(f"{head}{START}\n{render()}{END}{tail}")
    print(f"docs/performance.md: benchmark tables updated from docs/bench/ ({len(SECTIONS)} sections)")


if __name__ == "__main__":
    main()

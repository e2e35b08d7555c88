"""SFT step time and peak memory per method, through TRL's SFTTrainer as ``duallora train`` runs it: alpaca-demo
under SmolLM2's chat template, packed into sequences of ``--max-length`` tokens, the loss on the completions. Each
method runs in its own process; the results are ratios against peft's LoRA measured in the same run.

    python benchmarks/sft_step.py                          # dual, d2, lora; SmolLM2, 512 tokens, batch 2
    python benchmarks/sft_step.py --model tiny --steps 1   # smoke test (a tiny random LLaMA, SmolLM2's tokenizer)

Writes ``docs/bench/sft_step_<model>.json``, ``.md`` and ``.png`` (``--replot`` redraws the last two from the JSON).
A step is the Trainer's: the batch from the data loader, forward, backward and the optimizer, timed from
``on_step_begin`` to ``on_step_end``; the median of ``--steps`` steps after one warm-up step. Memory is the peak
resident set size over the whole run (``torch.cuda.max_memory_allocated`` on a GPU). Timings on a shared CPU vary by
about 15 % between runs: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from train_step import DOCS, PeakRss, answered_alone, markdown_rows, measure_in_children, plot

METHODS = ("lora", "dual", "d2")


def tiny_llama(vocab_size: int):
    """A 2-layer random LLaMA with SmolLM2's vocabulary (the smoke test's model)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab_size,
                                        max_position_embeddings=2048))


def measure(method: str, args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from duallora.app.models import load_tokenizer, smollm2_path
    from duallora.app.tasks.chat import SFT_DATASETS, detect_format, sft_records
    from duallora.app.tasks.files import read_rows
    from variants import peft_config

    source = SFT_DATASETS["alpaca-demo"].path()
    rows = read_rows(source)
    records = sft_records(rows, detect_format(rows, str(source)), str(source))
    tokenizer = load_tokenizer(smollm2_path())
    torch.manual_seed(0)
    model = (AutoModelForCausalLM.from_pretrained(smollm2_path()) if args.model == "smollm2"
             else tiny_llama(len(tokenizer)))
    cuda = torch.cuda.is_available()
    starts, times = {}, []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, train_args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            starts[state.global_step] = time.perf_counter()

        def on_step_end(self, train_args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - starts[state.global_step - 1])

    with tempfile.TemporaryDirectory() as scratch:
        config = SFTConfig(output_dir=scratch, max_steps=args.steps + 1, per_device_train_batch_size=args.batch,
                           max_length=args.max_length, packing=True, learning_rate=1e-4, logging_steps=1,
                           save_strategy="no", eval_strategy="no", report_to="none", seed=0, bf16=False,
                           use_cpu=not cuda, disable_tqdm=True)
        trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(records),
                             processing_class=tokenizer, peft_config=peft_config(method, args.r, "CAUSAL_LM"),
                             callbacks=[StepTimer()])
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with PeakRss() as rss:
            trainer.train()
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else rss.peak / 2**20
    measured = times[1:]  # the first step warms the allocator, the compiled kernels and the optimizer state
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    return {"method": method, "step_seconds": statistics.median(measured), "all_step_seconds": measured,
            "peak_mib": peak, "trainable_params": trainable,
            "tokens_per_step": args.batch * args.max_length}


def markdown(payload: dict) -> str:
    a = payload["args"]
    lines = [f"SFT through TRL's SFTTrainer: {a['model']}, alpaca-demo packed into {a['max_length']}-token "
             f"sequences, batch {a['batch']}, all linear layers, r={a['r']}, fp32, AdamW; median of {a['steps']} "
             f"steps after a warm-up step; one process per method; {payload['device']}.", ""]
    return "\n".join(lines + markdown_rows(payload["results"])) + "\n"


def write_outputs(payload: dict, stem: Path) -> None:
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    stem.with_suffix(".md").write_text(markdown(payload))
    a = payload["args"]
    plot(payload["results"], stem.with_suffix(".png"),
         f"SFT step, {a['model']}, packed {a['max_length']} tokens x {a['batch']}, r={a['r']}, fp32")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, from {METHODS}")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--output-dir", default=str(DOCS))
    parser.add_argument("--replot", action="store_true", help="redraw the table and plot from the JSON")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    stem = Path(args.output_dir) / f"sft_step_{args.model}"
    if answered_alone(args, stem, write_outputs, measure):
        return
    import torch

    from duallora.app.models import smollm2_path

    smollm2_path()  # convert the GGUF once, outside the measured processes
    results = measure_in_children(__file__, args)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    payload = {"args": vars(args), "device": device, "results": results}
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_outputs(payload, stem)
    print("\n" + markdown(payload))


if __name__ == "__main__":
    main()

"""Run under `accelerate launch` with a DeepSpeed config (examples/accelerate/zero2.yaml or zero3.yaml): Dual LoRA
or D2-LoRA (argv[2]) on a tiny LLaMA trained by DeepSpeed ZeRO (2 processes, gloo, fp32, gradient accumulation 2), then
the same model trained in one process without DeepSpeed on both processes' micro-batches. Writes both
runs' losses per optimizer step, the factors' largest difference between them, how many factors moved, whether
the processes hold the same factors, the warm-up clock and DeepSpeed's step count, to the JSON file of argv[1].

With argv[3] = "from_pretrained" the base is loaded with from_pretrained, which under zero3.yaml's
zero3_init_flag builds it under `zero.Init` (already partitioned, as the Trainer, accelerate and TRL do), and, after
training, the worker also records: whether a merge outside GatheredParameters is refused with nothing changed; the
merge and unmerge inside it against f(W0) and W0; the adapter saved from accelerate's gathered state dict; and
that adapter loaded onto a plain base and onto a base built under zero.Init again.

    accelerate launch --config_file examples/accelerate/zero3.yaml --num_processes 2 \
        tests/workers/zero_train.py result.json dual [from_pretrained]

One method per launch: accelerate prepares one model per DeepSpeed engine.
"""

import json
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations import is_deepspeed_zero3_enabled

import duallora
from duallora import D2LoraConfig, DualLoraConfig

CONFIGS = {"dual": lambda: DualLoraConfig(r=4, target_modules="all-linear", warmup_steps=4),
           "d2": lambda: D2LoraConfig(r=2, target_modules="all-linear")}
STEPS, ACCUM, MICRO_BATCH, SEQ, VOCAB = 6, 2, 2, 16, 64
LR = 1e-2


def tiny_llama() -> LlamaForCausalLM:
    """Built directly: never under zero.Init (transformers applies it in from_pretrained and from_config only)."""
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(config)


def model_and_optimizer(method: str, base=None):
    base = tiny_llama() if base is None else base
    torch.manual_seed(0)  # the same factors whichever way the base was built
    model = get_peft_model(base, CONFIGS[method]())
    # SGD, not AdamW: AdamW divides by sqrt(v), so a gradient near 0 that differs by rounding moves its weight by up
    # to 2 lr either way; SGD moves it by lr times the gradient's own difference, which stays small
    return model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)


def micro_batches(process: int) -> list[torch.Tensor]:
    """Each process's own micro-batches, the same on every call."""
    generator = torch.Generator().manual_seed(1000 + process)
    return [torch.randint(0, VOCAB, (MICRO_BATCH, SEQ), generator=generator) for _ in range(STEPS * ACCUM)]


def factors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def zero_run(method: str, accelerator: Accelerator, stage: int, checkpoint) -> dict:
    base = None
    if checkpoint is not None:
        base = LlamaForCausalLM.from_pretrained(checkpoint)
        weight = base.model.layers[0].self_attn.q_proj.weight
        built_partitioned = is_deepspeed_zero3_enabled() and weight.numel() == 0 and tuple(weight.ds_shape) == (32, 32)
    model, optimizer = model_and_optimizer(method, base)
    initial = factors(model)
    model, optimizer = accelerator.prepare(model, optimizer)
    losses, clocks = [], []
    for i, ids in enumerate(micro_batches(accelerator.process_index)):
        with accelerator.accumulate(model):
            loss = model(input_ids=ids, labels=ids).loss
            accelerator.backward(loss)  # DeepSpeed's engine: backward, and its step at the accumulation boundary
            optimizer.step()
            optimizer.zero_grad()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        losses.append(loss.item() / accelerator.num_processes)
        if (i + 1) % ACCUM == 0:
            clocks.append(duallora.warmup_steps_taken(model.module) if method == "dual" else None)
    inner = model.module
    params = [p for p in inner.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, enabled=stage == 3):  # ZeRO-3 holds a shard of each factor
        trained = factors(inner)
    flat = torch.cat([t.reshape(-1) for t in trained.values()])
    first = flat.clone()
    dist.broadcast(first, 0)
    result = {"losses": [sum(losses[i:i + ACCUM]) / ACCUM for i in range(0, len(losses), ACCUM)],
              "clocks": clocks, "global_steps": model.global_steps, "trained": trained,
              "unmoved": [k for k in initial if torch.equal(trained[k], initial[k])], "factors": len(initial),
              "processes_agree": torch.equal(flat, first), "optimizer": type(optimizer.optimizer).__name__}
    if checkpoint is not None:
        result.update(built_partitioned=built_partitioned, **merge_save_and_load(method, accelerator, model, trained,
                                                                                 checkpoint))
    return result


def merge_save_and_load(method: str, accelerator: Accelerator, engine, trained: dict, checkpoint) -> dict:
    """Under ZeRO-3, after training: merges refused outside a gather and exact inside it, then the adapter saved from
    the gathered state dict and loaded again, onto a plain base and onto one built under zero.Init."""
    from duallora.core.layer import AdaptedLayer

    inner = engine.module
    layers = [m for m in inner.modules() if isinstance(m, AdaptedLayer)]
    out = {}
    try:
        inner.merge_adapter()
        out["refused"] = None
    except RuntimeError as err:
        out["refused"] = str(err)
    out["merged_after_refusal"] = any(m.merged for m in layers)
    everything = list(inner.parameters())
    with deepspeed.zero.GatheredParameters(everything, modifier_rank=0):
        w0 = [m.base.full().clone() for m in layers]
        wanted = [w + m.delta_weight("default") for w, m in zip(w0, layers)]
        inner.merge_adapter()
        out["merge"] = max(((m.base.full() - w).abs().max() / w.abs().max()).item() for m, w in zip(layers, wanted))
        inner.unmerge_adapter()
        out["unmerge"] = max(((m.base.full() - w).abs().max() / w.abs().max()).item() for m, w in zip(layers, w0))
    state_dict = accelerator.get_state_dict(engine)  # ZeRO-3: gathered on the main process (zero3_save_16bit_model)
    saved = Path(sys.argv[1]).parent / f"adapter-{method}"
    if accelerator.is_main_process:
        inner.save_pretrained(saved, state_dict=state_dict)
    accelerator.wait_for_everyone()
    for name, base in (("plain", tiny_llama()), ("zero_init", LlamaForCausalLM.from_pretrained(checkpoint))):
        loaded = PeftModel.from_pretrained(base, saved)
        got = factors_of(loaded)
        out[f"loaded_{name}_exact"] = (got.keys() == trained.keys()
                                       and all(torch.equal(got[k], trained[k]) for k in got))
        out[f"loaded_{name}_clock"] = duallora.warmup_steps_taken(loaded) if method == "dual" else None
    return out


def factors_of(model) -> dict[str, torch.Tensor]:
    """The adapter's factors by their names in a trained (get_peft_model) model: a loaded one holds them frozen."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if "_lora_" in n}


def reference_run(method: str, processes: int) -> dict:
    """One process, no DeepSpeed: each optimizer step averages the loss over every process's micro-batches. Also
    the largest gradient of each step and the largest factor (what the test's bound on the factors is made of)."""
    model, optimizer = model_and_optimizer(method)
    batches = [micro_batches(p) for p in range(processes)]
    losses, largest_grads = [], []
    for step in range(STEPS):
        total = 0.0
        for micro in range(step * ACCUM, (step + 1) * ACCUM):
            for p in range(processes):
                loss = model(input_ids=batches[p][micro], labels=batches[p][micro]).loss / (ACCUM * processes)
                loss.backward()
                total += loss.item()
        largest_grads.append(max(p.grad.abs().max().item() for p in model.parameters() if p.grad is not None))
        optimizer.step()
        optimizer.zero_grad()
        losses.append(total)
    return {"losses": losses, "trained": factors(model), "largest_grads": largest_grads}


def main() -> None:
    # Named explicitly: without a GPU, accelerate finds no backend and would count each process as a lone rank 0
    # (num_processes 1), although DeepSpeed has joined them in one gloo group
    accelerator = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    plugin = accelerator.state.deepspeed_plugin
    # no DataLoader goes through prepare, so the config's "auto" micro-batch size has nothing to be read off
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = MICRO_BATCH
    plugin.deepspeed_config["gradient_accumulation_steps"] = ACCUM
    stage = plugin.deepspeed_config["zero_optimization"]["stage"]
    method = sys.argv[2]
    checkpoint = None
    if len(sys.argv) > 3 and sys.argv[3] == "from_pretrained":
        checkpoint = Path(sys.argv[1]).parent / "base"
        if accelerator.is_main_process:
            tiny_llama().save_pretrained(checkpoint)
        accelerator.wait_for_everyone()
    result = {"stage": stage, "processes": accelerator.num_processes, "backend": dist.get_backend(),
              **zero_run(method, accelerator, stage, checkpoint)}
    if accelerator.is_main_process:
        ref = reference_run(method, accelerator.num_processes)
        trained = result.pop("trained")
        result["largest_factor_difference"] = max((trained[k] - ref["trained"][k]).abs().max().item()
                                                  for k in ref["trained"])
        result["largest_factor"] = max(t.abs().max().item() for t in ref["trained"].values())
        result["reference_losses"], result["largest_grads"], result["lr"] = ref["losses"], ref["largest_grads"], LR
        with open(sys.argv[1], "w") as f:
            json.dump(result, f, indent=1)
    accelerator.end_training()


if __name__ == "__main__":
    main()

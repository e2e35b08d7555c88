"""Run under torchrun: QLoRA under FSDP2, as peft's recipe sets it up (a 4-bit base stored in bfloat16 through
``bnb_4bit_quant_storage``, the decoder layers and the model each ``fully_shard``-ed), with Dual LoRA and D2-LoRA
on every Linear, against the same model unsharded in one process on the whole batch. FSDP replaces each
``Params4bit`` with a plain Parameter and bitsandbytes keeps the quantization state on the module: the adapters must
read it there. Also whether ``fully_shard`` on the base Linears themselves (what size-based policies do) is refused
before any work, with the message. Writes the JSON file named by argv[1], from rank 0.

    torchrun --nproc_per_node 2 tests/workers/fsdp2_qlora.py result.json
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

from duallora import D2LoraConfig, DualLoraConfig
from duallora.core.layer import AdaptedLayer

CONFIGS = {"dual": lambda: DualLoraConfig(r=4, target_modules="all-linear", warmup_steps=0),
           "d2": lambda: D2LoraConfig(r=2, target_modules="all-linear")}


def quantized(checkpoint: Path, method: str):
    base = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_quant_storage=torch.bfloat16,
        bnb_4bit_compute_dtype=torch.bfloat16))
    torch.manual_seed(1)
    model = get_peft_model(base, CONFIGS[method]())
    with torch.no_grad():  # trained-looking factors: dW != 0, every gradient non-trivial
        for name, p in model.named_parameters():
            if "_lora_" in name:
                p.normal_(0, 0.1)
    return model.train()


def gradients(model) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad).float().clone()
            for n, p in model.named_parameters() if p.grad is not None}


def compare(checkpoint: Path, method: str, rank: int, world: int) -> dict:
    batch = torch.randint(0, 64, (2 * world, 12), generator=torch.Generator().manual_seed(1))
    reference = quantized(checkpoint, method)
    ref_loss = reference(input_ids=batch, labels=batch).loss
    ref_loss.backward()
    sharded = quantized(checkpoint, method)
    for layer in sharded.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(sharded)
    packed = sharded.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    mine = batch[2 * rank:2 * rank + 2]
    loss = sharded(input_ids=mine, labels=mine).loss
    loss.backward()
    loss = loss.detach().float()
    dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # equal token counts: the mean of the means is the batch's mean
    got, expected = gradients(sharded), gradients(reference)
    largest = max(g.abs().max().item() for g in expected.values())
    result = {"base_sharded": isinstance(packed, DTensor), "loss": loss.item(), "reference_loss": ref_loss.item(),
              "factor_grads": len(got), "reference_factor_grads": len(expected),
              "largest_grad_difference": max((got[k] - expected[k]).abs().max().item() for k in expected),
              "largest_grad": largest}
    per_linear = quantized(checkpoint, method)
    for module in per_linear.modules():
        if isinstance(module, AdaptedLayer):
            fully_shard(module.base_layer)  # each base Linear an FSDP unit of its own
    fully_shard(per_linear)
    try:
        per_linear(input_ids=mine, labels=mine)
        result["per_linear_refused"] = None
    except RuntimeError as err:
        result["per_linear_refused"] = str(err)
    return result


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    checkpoint = Path(sys.argv[1]).parent / "llama"
    if rank == 0:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).save_pretrained(
            checkpoint)
    dist.barrier()
    results = {method: compare(checkpoint, method, rank, world) for method in CONFIGS}
    if rank == 0:
        Path(sys.argv[1]).write_text(json.dumps({"world_size": world, **results}, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run under torchrun: Dual LoRA and D2-LoRA on a tiny LLaMA whose decoder layers are sharded with PyTorch FSDP2
(`fully_shard`), against the same model unsharded in one process on the whole batch. Writes, per method, the
largest differences of the loss, the adapter weights after each AdamW step and the eval-mode logits to the JSON
file named by argv[1].

    torchrun --nproc_per_node 2 tests/workers/fsdp2_step.py result.json
"""

import json
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from transformers import LlamaConfig, LlamaForCausalLM

from duallora import D2LoraConfig, DualLoraConfig

CONFIGS = {"dual": lambda: DualLoraConfig(r=4, target_modules="all-linear", warmup_steps=2),
           "d2": lambda: D2LoraConfig(r=2, target_modules="all-linear")}
STEPS = 3


def model_and_optimizer(method: str, shard: bool):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    model = get_peft_model(LlamaForCausalLM(config), CONFIGS[method]())
    if shard:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(trainable, lr=1e-2)


def adapter_weights(model) -> dict[str, torch.Tensor]:
    return {name: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for name, p in model.named_parameters() if p.requires_grad}


def compare(method: str, rank: int, world: int) -> dict:
    batch = torch.randint(0, 64, (2 * world, 12), generator=torch.Generator().manual_seed(1))
    mine = batch[2 * rank:2 * rank + 2]
    reference, ref_opt = model_and_optimizer(method, shard=False)
    sharded, opt = model_and_optimizer(method, shard=True)
    base = sharded.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    result = {"base_weight_sharded": isinstance(base, DTensor) and base.placements == (Shard(0),),
              "loss": [], "weights": []}
    for _ in range(STEPS):
        for model, optimizer, ids in ((reference, ref_opt, batch), (sharded, opt, mine)):
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            if model is reference:
                ref_loss = loss.detach()
            else:  # equal token counts per process: the mean of the processes' means is the whole batch's mean
                loss = loss.detach()
                dist.all_reduce(loss, op=dist.ReduceOp.AVG)
                result["loss"].append((loss - ref_loss).abs().item())
        ref_w, got_w = adapter_weights(reference), adapter_weights(sharded)
        result["weights"].append(max((ref_w[k] - got_w[k]).abs().max().item() for k in ref_w))
    for model in (reference, sharded):
        model.eval()
    with torch.no_grad():
        for _ in range(2):  # the second call is served by the eval cache
            logits = (sharded(input_ids=mine).logits - reference(input_ids=mine).logits).abs().max().item()
    result["eval_logits"] = logits
    return result


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {method: compare(method, rank, world) for method in CONFIGS}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world_size": world, **results}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

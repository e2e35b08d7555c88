"""Run under torchrun: Dual LoRA and D2-LoRA on a tiny LLaMA whose decoder layers are sharded with PyTorch FSDP2
(`fully_shard`), against the same model unsharded in one process on the whole batch. Writes, per method and SGD
step, the relative differences of the loss and of each factor's gradient (before the optimizer touches it), the
absolute differences of the gradients and of the factors after the step, and the largest factor, plus the relative
difference of the eval-mode logits and whether the eval cache stayed off under sharding, to the JSON file named by
argv[1]. With argv[2] = "mixtral", the model is a tiny Mixtral whose experts (3-D parameters, adapted through
target_parameters: all-linear converts to them) are sharded with their decoder layers.

    torchrun --nproc_per_node 2 tests/workers/fsdp2_step.py result.json [mixtral]
"""

import json
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from duallora import D2LoraConfig, DualLoraConfig
from duallora.core.layer import AdaptedLayer

CONFIGS = {"dual": lambda: DualLoraConfig(r=4, target_modules="all-linear", warmup_steps=2),
           "d2": lambda: D2LoraConfig(r=2, target_modules="all-linear")}
STEPS = 3
LR = 1e-2
MODEL = sys.argv[2] if len(sys.argv) > 2 else "llama"


def base_model():
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=64)
    if MODEL == "mixtral":
        return MixtralForCausalLM(MixtralConfig(**sizes, intermediate_size=48, num_local_experts=4,
                                                num_experts_per_tok=2))
    return LlamaForCausalLM(LlamaConfig(**sizes, intermediate_size=64))


def sharded_base(model) -> torch.Tensor:
    layer = model.base_model.model.model.layers[0]
    return layer.mlp.experts.get_base_layer().gate_up_proj if MODEL == "mixtral" else layer.self_attn.q_proj.weight


def model_and_optimizer(method: str, shard: bool):
    torch.manual_seed(0)
    model = get_peft_model(base_model(), CONFIGS[method]())
    if shard:
        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    # SGD, not AdamW: AdamW divides by sqrt(v), so a gradient near 0 that differs by rounding moves its weight by
    # up to 2 lr either way; SGD moves it by lr times the gradient's own difference, which stays small
    return model, torch.optim.SGD(trainable, lr=LR)


def full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone()


def trainable_tensors(model, what: str) -> dict[str, torch.Tensor]:
    return {name: full(p.grad if what == "grad" else p) for name, p in model.named_parameters() if p.requires_grad}


def relative_difference(got: dict, ref: dict) -> float:
    """The largest |got - ref| of any tensor, relative to that tensor's largest |ref| (0 where both are 0)."""
    tiny = torch.finfo(torch.float32).tiny
    return max(((got[k] - ref[k]).abs().max() / ref[k].abs().max().clamp_min(tiny)).item() for k in ref)


def largest_difference(got: dict, ref: dict) -> float:
    return max((got[k] - ref[k]).abs().max().item() for k in ref)


def compare(method: str, rank: int, world: int) -> dict:
    batch = torch.randint(0, 64, (2 * world, 12), generator=torch.Generator().manual_seed(1))
    mine = batch[2 * rank:2 * rank + 2]
    reference, ref_opt = model_and_optimizer(method, shard=False)
    sharded, opt = model_and_optimizer(method, shard=True)
    base = sharded_base(sharded)
    result = {"base_weight_sharded": isinstance(base, DTensor) and base.placements == (Shard(0),),
              "loss": [], "grads": [], "grad_difference": [], "weight_difference": [], "largest_weight": []}
    for _ in range(STEPS):
        losses, grads = {}, {}
        for name, model, ids in (("ref", reference, batch), ("sharded", sharded, mine)):
            model.train()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            losses[name] = loss.detach()
            grads[name] = trainable_tensors(model, "grad")
        # equal token counts per process: the mean of the processes' means is the whole batch's mean
        dist.all_reduce(losses["sharded"], op=dist.ReduceOp.AVG)
        result["loss"].append(((losses["sharded"] - losses["ref"]).abs() / losses["ref"].abs()).item())
        result["grads"].append(relative_difference(grads["sharded"], grads["ref"]))
        result["grad_difference"].append(largest_difference(grads["sharded"], grads["ref"]))
        for optimizer in (ref_opt, opt):
            optimizer.step()
            optimizer.zero_grad()
        ref_w, got_w = trainable_tensors(reference, "weight"), trainable_tensors(sharded, "weight")
        result["weight_difference"].append(largest_difference(got_w, ref_w))
        result["largest_weight"].append(max(w.abs().max().item() for w in ref_w.values()))
    for model in (reference, sharded):
        model.eval()
    with torch.no_grad():
        for _ in range(2):  # the reference's second call is served by its eval cache
            ref_logits = reference(input_ids=mine).logits
            logits = sharded(input_ids=mine).logits
    result["eval_logits"] = ((logits - ref_logits).abs().max() / ref_logits.abs().max()).item()
    result["eval_cache_off_when_sharded"] = all(m._eval_cache is None for m in sharded.modules()
                                                if isinstance(m, AdaptedLayer))
    result["eval_cache_on_when_not"] = all(m._eval_cache is not None for m in reference.modules()
                                           if isinstance(m, AdaptedLayer))
    return result


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {method: compare(method, rank, world) for method in CONFIGS}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world_size": world, "lr": LR, **results}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""Run under torchrun: Dual LoRA and D2-LoRA under FSDP1 with the wrapping accelerate applies to a PEFT model
(peft's ``fsdp_auto_wrap_policy``: the decoder layers, and every leaf module whose ``weight`` trains, each a unit),
with ``use_orig_params`` False (peft's QLoRA+FSDP recipe) and True, on a float32 model and on a bf16 one whose
factors stay float32 (the "uniform dtype" case), against the same model unwrapped in one process on the whole batch.
SGD steps; per step the relative difference of the loss, then the factors' largest difference after the last step
(gathered with ``summon_full_params``), the largest factor and each step's largest reference gradient, to the JSON
file named by argv[1], from rank 0.

    torchrun --nproc_per_node 2 tests/workers/fsdp1_step.py result.json
"""

import json
import sys

import torch
import torch.distributed as dist
from peft import get_peft_model
from peft.utils.other import fsdp_auto_wrap_policy
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from transformers import LlamaConfig, LlamaForCausalLM

from duallora import D2LoraConfig, DualLoraConfig
from duallora.core.factor import Factor

CONFIGS = {"dual": lambda: DualLoraConfig(r=4, target_modules="all-linear", warmup_steps=0),
           "d2": lambda: D2LoraConfig(r=2, target_modules="all-linear")}
STEPS = 3
LR = 1e-2


def model(method: str, dtype: torch.dtype):
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64)
    peft_model = get_peft_model(LlamaForCausalLM(config).to(dtype), CONFIGS[method]())  # factors stay float32
    with torch.no_grad():  # trained-looking factors: dW != 0 and every gradient non-trivial from the first step
        for name, p in peft_model.named_parameters():
            if "_lora_" in name:
                p.normal_(0, 0.1)
    return peft_model.train()


def factors(peft_model) -> dict[str, torch.Tensor]:
    return {n.replace("_fsdp_wrapped_module.", ""): p.detach().float().clone()
            for n, p in peft_model.named_parameters() if "_lora_" in n}


def compare(method: str, dtype: torch.dtype, use_orig_params: bool, rank: int, world: int) -> dict:
    batches = [torch.randint(0, 64, (2 * world, 12), generator=torch.Generator().manual_seed(step))
               for step in range(STEPS)]
    reference = model(method, dtype)
    ref_opt = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=LR)
    wrapped = model(method, dtype)
    wrapped = FSDP(wrapped, auto_wrap_policy=fsdp_auto_wrap_policy(wrapped), use_orig_params=use_orig_params,
                   device_id=torch.device("cpu"))
    opt = torch.optim.SGD([p for p in wrapped.parameters() if p.requires_grad], lr=LR)
    units = sum(isinstance(m, FSDP) and isinstance(m.module, Factor) for m in wrapped.modules())
    result = {"factor_units": units, "loss": [], "largest_grads": []}
    for batch in batches:
        ref_loss = reference(input_ids=batch, labels=batch).loss
        ref_loss.backward()
        result["largest_grads"].append(max(p.grad.abs().max().item() for p in reference.parameters()
                                           if p.grad is not None))
        mine = batch[2 * rank:2 * rank + 2]
        loss = wrapped(input_ids=mine, labels=mine).loss
        loss.backward()
        loss = loss.detach().float()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG)  # equal token counts: the mean of the means is the batch's
        result["loss"].append(((loss - ref_loss.float()).abs() / ref_loss.float().abs()).item())
        for optimizer in (ref_opt, opt):
            optimizer.step()
            optimizer.zero_grad()
    with FSDP.summon_full_params(wrapped):
        got = factors(wrapped)
    expected = factors(reference)
    result["same_names"] = got.keys() == expected.keys()
    result["factor_difference"] = max((got[k] - expected[k]).abs().max().item() for k in expected)
    result["largest_factor"] = max(t.abs().max().item() for t in expected.values())
    result["moved"] = all(not torch.equal(got[k], v) for k, v in factors(model(method, dtype)).items())
    return result


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {f"{method}-{str(dtype).removeprefix('torch.')}-{'orig' if orig else 'flat'}":
               compare(method, dtype, orig, rank, world)
               for method in CONFIGS for dtype in (torch.float32, torch.bfloat16) for orig in (False, True)}
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump({"world_size": world, "lr": LR, **results}, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

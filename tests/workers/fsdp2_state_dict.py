"""Run under torchrun: the state dicts of an adapter on a tiny LLaMA sharded with PyTorch FSDP2 (`fully_shard`,
the factors DTensors), for one method (argv[1]: dual, d2 or lora). In argv[2] (a directory) rank 0 writes:

- ``adapter/``: the adapter after 2 SGD steps under sharding, saved the documented way: the full state dict gathered
  on all ranks with ``get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
  cpu_offload=True))``, then ``model.save_pretrained(path, state_dict=sd, is_main_process=rank == 0)``;
- ``reference.pt``: the gathered adapter entries (model keys), the inputs and the sharded model's eval logits;
- ``result.json``: whether the gathered tensors are the DTensors' full tensors, the warm-up clock, how each way of
  loading into a sharded model reproduces the unsharded model with the same factor values (loading with
  ``PeftModel.from_pretrained`` then sharding; ``set_peft_model_state_dict`` and ``set_model_state_dict`` into an
  already-sharded model), and what ``save_pretrained`` without a ``state_dict`` raises on a sharded model, called
  on all ranks and on rank 0 only; whether ``get_peft_model_state_dict`` gives the DTensor shards (as LoRA's
  does); and ``hotswap_adapter`` of the saved adapter into an already-sharded fresh model.

    torchrun --nproc_per_node 2 tests/workers/fsdp2_state_dict.py dual out/
"""

import json
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/, for conftest's tiny models
from conftest import METHODS, tiny_llama, trained_like

import duallora

WARMUP_STEPS = 4  # Dual LoRA: after 2 steps lam_t = 2 / 4, so a clock that is not restored changes the logits
STEPS = 2
LR = 1e-2


def adapted(method: str, seed: int):
    """The tiny LLaMA of conftest with every factor drawn at random from ``seed`` (so that dW != 0)."""
    if method == "lora":
        config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    else:
        kw = {"warmup_steps": WARMUP_STEPS} if method == "dual" else {}
        config = METHODS[method](r=4, lora_alpha=8, target_modules="all-linear", **kw)
    model = get_peft_model(tiny_llama(), config)
    torch.manual_seed(seed)
    return trained_like(model)


def shard(model):
    """peft's FSDP2 recipe: each decoder layer a unit, then the whole model."""
    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def base_sharded(model) -> bool:
    w = model.base_model.model.model.layers[0].self_attn.q_proj.base_layer.weight
    return isinstance(w, DTensor) and w.placements == (Shard(0),)


def clock(model, method: str):
    return duallora.warmup_steps_taken(model) if method == "dual" else None


@torch.no_grad()
def logits(model, inputs) -> torch.Tensor:
    model.eval()
    return model(input_ids=inputs).logits.detach().clone()


def failure(call) -> dict:
    """What ``call()`` raises: its type, message and the innermost frames (file under site-packages, function)."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 (recorded, not hidden: the test asserts on it)
        frames = [(f.filename.split("site-packages/")[-1], f.name, f.lineno)
                  for f in traceback.extract_tb(e.__traceback__)]
        return {"type": type(e).__name__, "message": str(e), "frames": frames[-6:]}
    return {"type": None}


def compared(model, inputs, reference_logits, method) -> dict:
    """The sharded ``model``'s eval logits against the unsharded reference's, and its clock."""
    got = logits(model, inputs)
    difference = ((got - reference_logits).abs().max() / reference_logits.abs().max()).item()
    return {"relative_difference": difference, "exact": bool(torch.equal(got, reference_logits)),
            "clock": clock(model, method), "base_sharded": base_sharded(model)}


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    method, out = sys.argv[1], Path(sys.argv[2])
    adapter_dir = out / "adapter"
    result = {"world_size": world, "method": method}

    # ---- train 2 SGD steps under sharding, each rank on its own batch
    model = shard(adapted(method, seed=1))
    result["base_sharded"] = base_sharded(model)
    result["factors_are_dtensors"] = all(isinstance(p, DTensor) for n, p in model.named_parameters() if "lora_" in n)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    batch = torch.randint(0, 64, (2 * world, 9), generator=torch.Generator().manual_seed(2))[2 * rank:2 * rank + 2]
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters() if "lora_" in n}
    for _ in range(STEPS):
        model.train()
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    result["clock_after_training"] = clock(model, method)
    full = {n: p.full_tensor().clone() for n, p in model.named_parameters() if "lora_" in n}  # collective: all ranks
    result["factors_moved"] = all(not torch.equal(full[n], before[n]) for n in full if ".default" in n)
    inputs = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))  # conftest's `inputs`
    sharded_logits = logits(model, inputs)

    # ---- (a) save: the full state dict gathered on all ranks, written by rank 0
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    counts = [None] * world
    dist.all_gather_object(counts, len(sd))
    result["gathered_on_ranks"] = counts  # cpu_offload with full_state_dict: rank 0 gets it all, the others {}
    model.save_pretrained(str(adapter_dir), state_dict=sd, is_main_process=rank == 0)
    dist.barrier()  # rank 0's files are written before anyone reads them
    adapter_sd = {k: v for k, v in sd.items() if "lora_" in k}
    if rank == 0:
        result["gathered_is_full_tensor"] = all(torch.equal(adapter_sd[n], full[n]) for n in full)
        result["gathered_adapter_keys"] = sorted(adapter_sd)
        torch.save({"state": adapter_sd, "inputs": inputs, "sharded_logits": sharded_logits}, out / "reference.pt")

    # the unsharded reference: the same model with the gathered values copied in (not loaded through peft)
    reference = adapted(method, seed=1)
    reference_state = reference.state_dict()
    shared = [adapter_sd if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)
    with torch.no_grad():
        for name, value in shared[0].items():
            reference_state[name].copy_(value)
    reference_logits = logits(reference, inputs)
    result["reference_clock"] = clock(reference, method)
    result["trained_sharded_vs_reference"] = compared(model, inputs, reference_logits, method)

    # ---- (b1) load with PeftModel.from_pretrained, then shard
    loaded = shard(PeftModel.from_pretrained(tiny_llama(), str(adapter_dir)))
    result["from_pretrained_then_shard"] = compared(loaded, inputs, reference_logits, method)

    # ---- (b2) set_peft_model_state_dict (the adapter file's full tensors) into an already-sharded fresh model
    fresh = shard(adapted(method, seed=3))  # other factor values, clock at 0
    result["fresh_differs"] = not compared(fresh, inputs, reference_logits, method)["exact"]
    file_sd = load_file(adapter_dir / "adapter_model.safetensors")
    result["set_peft_model_state_dict"] = failure(lambda: set_peft_model_state_dict(fresh, file_sd))
    if result["set_peft_model_state_dict"]["type"] is None:
        result["set_peft_model_state_dict"].update(compared(fresh, inputs, reference_logits, method))

    # ---- (b3) DCP's set_model_state_dict with full tensors from rank 0, broadcast to the other ranks
    fresh = shard(adapted(method, seed=3))
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    result["set_model_state_dict"] = failure(
        lambda: set_model_state_dict(fresh, adapter_sd if rank == 0 else {}, options=options))
    if result["set_model_state_dict"]["type"] is None:
        result["set_model_state_dict"].update(compared(fresh, inputs, reference_logits, method))

    # ---- (b4) hotswap_adapter of the saved folder into an already-sharded fresh model, on every rank
    if method != "lora":
        fresh = shard(adapted(method, seed=3))
        result["hotswap_adapter"] = failure(lambda: duallora.hotswap_adapter(fresh, str(adapter_dir)))
        if result["hotswap_adapter"]["type"] is None:
            result["hotswap_adapter"].update(compared(fresh, inputs, reference_logits, method))

    # ---- get_peft_model_state_dict on the sharded model: the shards, as DTensors of the factors' full shapes
    shards = get_peft_model_state_dict(model)
    factors = {k.replace(".default", ""): v for k, v in full.items() if ".default" in k}  # the parameters
    result["state_dict_shards"] = {
        "all_dtensors": all(isinstance(shards[k], DTensor) for k in factors),
        "full_shapes": all(tuple(shards[k].shape) == tuple(v.shape) for k, v in factors.items()),
    }

    # ---- save_pretrained without a state_dict on a sharded model: on all ranks, then on rank 0 only
    everyone = failure(lambda: model.save_pretrained(str(out / "plain-all-ranks")))
    per_rank = [None] * world
    dist.all_gather_object(per_rank, everyone)
    result["save_pretrained_all_ranks"] = per_rank
    dist.barrier()
    if rank == 0:
        result["save_pretrained_rank0_only"] = failure(lambda: model.save_pretrained(str(out / "plain-rank0")))
        result["save_pretrained_bin"] = failure(  # peft's pickle path would write rank 0's shard, silently
            lambda: model.save_pretrained(str(out / "plain-bin"), safe_serialization=False))
    dist.barrier()
    if rank == 0:
        result["plain_dirs"] = {d: sorted(p.name for p in (out / d).iterdir()) if (out / d).exists() else None
                                for d in ("plain-all-ranks", "plain-rank0", "plain-bin")}
        (out / "result.json").write_text(json.dumps(result, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

"""The state dicts of an adapter on a model sharded with FSDP2 (`fully_shard`, the factors DTensors), two processes
(gloo, CPU): saved from the full state dict that DCP gathers, loaded on an unsharded base, and loaded into a sharded
model both ways (load then shard; load into the sharded model), always with the same logits as the unsharded model of
the same factor values, and Dual LoRA's warm-up clock with them."""

import json
import sys

import pytest
import torch
from conftest import assert_float32_close, tiny_llama
from peft import PeftModel
from safetensors.torch import load_file
from test_distributed import WORKERS, torchrun

import duallora

sys.path.insert(0, str(WORKERS))
from fsdp2_state_dict import STEPS
from fsdp2_state_dict import adapted as worker_adapted


def unsharded_with(method: str, state: dict) -> torch.nn.Module:
    """The worker's model unsharded, with the gathered adapter values copied in (not loaded through peft)."""
    model = worker_adapted(method, seed=1)
    current = model.state_dict()
    with torch.no_grad():
        for name, value in state.items():
            current[name].copy_(value)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_fsdp2_adapter_saves_from_the_gathered_full_state_dict_and_loads_both_ways(method, tmp_path):
    torchrun(str(WORKERS / "fsdp2_state_dict.py"), method, str(tmp_path))
    result = json.loads((tmp_path / "result.json").read_text())
    clock = STEPS if method == "dual" else None  # D2-LoRA has no warm-up clock
    assert result["world_size"] == 2 and result["base_sharded"] and result["factors_are_dtensors"], result
    assert result["factors_moved"] and result["clock_after_training"] == clock, result

    # (a) get_model_state_dict(full_state_dict=True, cpu_offload=True) gives rank 0 the DTensors' full tensors and
    # the other ranks nothing; save_pretrained(state_dict=sd, is_main_process=rank == 0) writes them all, clock too
    assert result["gathered_is_full_tensor"] and result["gathered_on_ranks"][1] == 0, result
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    reference_data = torch.load(tmp_path / "reference.pt")
    state = reference_data["state"]
    assert sorted(saved) == sorted(k.replace(".default", "") for k in state)
    assert any("dual_lora_step" in k for k in saved) == (method == "dual")
    for key, value in state.items():
        assert torch.equal(saved[key.replace(".default", "")], value), key

    inputs = reference_data["inputs"]
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    reference = unsharded_with(method, state)
    with torch.no_grad():
        got, expected = loaded(input_ids=inputs).logits, reference(input_ids=inputs).logits
        base = tiny_llama()(input_ids=inputs).logits
    # one process, the same float32 values in the same kernels on the same shapes: the same bits
    assert torch.equal(got, expected)
    assert not torch.equal(got, base)  # the adapter is not a no-op, so the comparison can fail
    if method == "dual":
        assert duallora.warmup_steps_taken(loaded) == STEPS
        duallora.set_warmup_step(loaded, 0)  # lam_t = 0: a clock that was not restored would show in the logits
        with torch.no_grad():
            assert not torch.equal(loaded(input_ids=inputs).logits, expected)
    # the sharded model's own logits, computed in a worker (one thread there, more here: the matmuls may block
    # their sums differently), agree within the float32 reorder bound
    assert_float32_close(reference_data["sharded_logits"], expected)

    # (b) into a sharded model, both ways, and the trained sharded model itself: the logits of the unsharded model
    # with the same values, bit for bit (FSDP2's all-gather copies the shards' bits, and each process then computes
    # with the same full float32 weights as the unsharded reference in the same process), and the clock restored
    assert result["fresh_differs"], result  # the fresh model's factors give other logits before the load
    for way in ("trained_sharded_vs_reference", "from_pretrained_then_shard", "set_peft_model_state_dict",
                "set_model_state_dict", "hotswap_adapter"):
        outcome = result[way]
        assert outcome.get("type") is None, (way, outcome)  # no error
        assert outcome["base_sharded"] and outcome["exact"] and outcome["relative_difference"] == 0.0, (way, outcome)
        assert outcome["clock"] == clock, (way, outcome)

    # get_peft_model_state_dict gives the shards, as LoRA's does (a sharded checkpoint needs them): only the file
    # write is refused
    assert result["state_dict_shards"] == {"all_dtensors": True, "full_shapes": True}, result

    # save_pretrained without a state_dict on the sharded model is refused, on all ranks and on rank 0 alone alike,
    # with the two lines that save it (LoRA fails there on peft's alias check, "invalid python storage", and its
    # safe_serialization=False writes rank 0's shard as the adapter); no weights file is written
    for failure in (*result["save_pretrained_all_ranks"], result["save_pretrained_rank0_only"],
                    result["save_pretrained_bin"]):
        assert failure["type"] == "ValueError", failure
        assert "DTensor shards" in failure["message"] and "full_state_dict=True" in failure["message"], failure
        assert "is_main_process=dist.get_rank() == 0" in failure["message"], failure
    for directory, names in result["plain_dirs"].items():
        assert not {"adapter_model.safetensors", "adapter_model.bin"} & set(names or []), (directory, names)

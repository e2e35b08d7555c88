"""The memory-per-GPU model of ``benchmarks/memory_per_gpu.py``: its formulas against hand-computed numbers, its
activation formulas against what autograd actually saves on a small LLaMA, and the script end to end."""

import contextlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("memory_per_gpu", ROOT / "benchmarks" / "memory_per_gpu.py")
mem = importlib.util.module_from_spec(_spec)
sys.modules["memory_per_gpu"] = mem  # dataclasses look the module up by name
_spec.loader.exec_module(mem)

S7, S70 = mem.LLAMA2_7B, mem.LLAMA2_70B
MIB, GIB = 2**20, 2**30


def test_parameter_counts_match_the_published_models():
    assert abs(mem.model_params(S7) - 6.74e9) / 6.74e9 < 0.01
    assert mem.model_params(S7) == 6_738_415_616  # LLaMA-2-7B's exact count
    assert abs(mem.model_params(S70) - 68.98e9) / 68.98e9 < 0.01
    assert S70.kv_dim == 1024  # 8 KV heads of 128
    # peft's print_trainable_parameters for LLaMA-2-7B, all seven linears, r=16: 39,976,960
    assert mem.adapter_params(S7, 16) == 39_976_960


def test_full_fine_tuning_on_one_gpu_is_16_bytes_per_param_plus_activations():
    row = mem.memory_row(S7, "full", 1)
    acts = mem.activation_bytes(S7, "full", 2048, checkpointing=True)
    assert row["bytes"]["total"] == 16 * mem.model_params(S7) + acts
    assert row["bytes"]["gathered_unit"] == 0  # nothing to gather on one GPU
    assert mem.memory_row(S7, "full", 1, full_grad_bytes=4)["bytes"]["total"] == 18 * mem.model_params(S7) + acts


def test_adapter_state_is_16_bytes_per_adapter_param_sharded():
    for n in mem.GPUS:
        assert mem.trainable_state_bytes(S7, n, "dual", 16) == 16 * 39_976_960 / n
        assert mem.trainable_state_bytes(S7, n, "lora", 16) == mem.trainable_state_bytes(S7, n, "dual", 16)


def test_sharded_parts_halve_when_gpus_double_until_the_unsharded_parts_dominate():
    rows = {n: mem.memory_row(S7, "lora", n)["bytes"] for n in mem.GPUS}
    for n in mem.GPUS[:-1]:
        assert rows[2 * n]["weights"] == rows[n]["weights"] / 2
        assert rows[2 * n]["trainable_state"] == rows[n]["trainable_state"] / 2
        assert rows[2 * n]["total"] < rows[n]["total"]
    # the gathered layer appears from 2 GPUs on and then stays; activations never shard
    assert rows[2]["gathered_unit"] == rows[64]["gathered_unit"] == 2 * mem.layer_params(S7) + 8 * 1_249_280
    assert rows[1]["activations"] == rows[64]["activations"]
    # 64 GPUs: weights are 1/64 of the 1-GPU weights, but the total is far from 1/64 of the 1-GPU total
    assert rows[64]["weights"] < rows[64]["gathered_unit"] + rows[64]["activations"]
    assert rows[64]["total"] > 5 * rows[1]["total"] / 64


def test_ddp_rows_equal_the_one_gpu_rows_at_every_gpu_count():
    for method in mem.METHODS:
        one = mem.memory_row(S70, method, 1)["bytes"]
        for n in mem.GPUS:
            assert mem.memory_row(S70, method, n, sharding="ddp")["bytes"] == one


def test_dual_transients_with_and_without_blocking():
    bound = 64 * MIB
    # 7B: up/gate (11008 x 4096) cut to 4096 rows = exactly 64 MiB; down (4096 x 11008) to 1524 rows, just under
    assert mem.block_rows(11008, 4096, bound) == 4096 and 4096 * 4096 * 4 == bound
    assert mem.block_rows(4096, 11008, bound) == 1524 == bound // (11008 * 4)
    blocked = mem.dual_transient_bytes(S7, bound)
    assert blocked == 6 * 4096 * 4096 * 4 == 6 * min(bound, 11008 * 4096 * 4)
    for _, o, i in mem.linear_shapes(S70):
        rows = mem.block_rows(o, i, bound)
        assert rows * i * 4 <= min(bound, o * i * 4) and (rows == o or (rows + 1) * i * 4 > bound)
    assert mem.dual_transient_bytes(S70, bound) == 6 * bound  # 2048 rows x 8192 x 4 bytes
    # no blocking: 6 full out x in matrices of the largest linear
    assert mem.dual_transient_bytes(S7, 0) == 6 * 4096 * 11008 * 4
    assert mem.dual_transient_bytes(S70, 0) == 6 * 8192 * 28672 * 4
    # a layer smaller than the bound is never cut
    small = mem.Shape("small", hidden=256, intermediate=688, layers=2, heads=4, kv_heads=2, vocab=1000)
    assert mem.dual_transient_bytes(small, bound) == mem.dual_transient_bytes(small, 0) == 6 * 688 * 256 * 4
    # independent of GPUs and tokens; only Dual LoRA has them
    assert mem.memory_row(S7, "dual", 64, seq=512, block_mib=64)["bytes"]["dual_transients"] == blocked
    assert mem.memory_row(S7, "lora", 1)["bytes"]["dual_transients"] == 0


def test_lora_extra_activations_formulas():
    h, i, r = 4096, 11008, 16
    assert mem.lora_extra_bytes_per_token_layer(S7, r, "bf16") == 8 * h + 14 * r
    assert mem.lora_extra_bytes_per_token_layer(S7, r, "fp32") == 20 * h + 2 * i + 28 * r
    assert mem.lora_extra_bytes_per_token_layer(S7, r, "none") == 7 * r * 2  # x A^T only, T x r per adapted layer
    per_layer = 2048 * (8 * h + 14 * r) + 2 * 1_249_280
    assert mem.lora_extra_activation_bytes(S7, r, 2048, checkpointing=True) == per_layer
    assert mem.lora_extra_activation_bytes(S7, r, 2048, checkpointing=False) == 32 * per_layer
    assert mem.memory_row(S7, "dual", 1)["bytes"]["lora_extra_activations"] == 0


def test_activations_with_and_without_checkpointing():
    tokens, L, h = 2048, 32, 4096
    layer = mem.layer_activation_bytes_per_token(S7, "dual")
    head = mem.head_activation_bytes_per_token(S7, "dual")
    assert layer == 16 * h + 4 * h + 8 * 11008 + 4 * 32 + 8  # no GQA in 7B: kv_dim = h
    assert head == 4 * h + 4 + 6 * 32000 + 8
    assert mem.activation_bytes(S7, "dual", tokens, True) == tokens * (L * 2 * h + layer + head)
    assert mem.activation_bytes(S7, "dual", tokens, False) == tokens * (L * layer + head)
    assert mem.memory_row(S7, "dual", 1, micro_batch=4, seq=512)["bytes"]["activations"] == \
        mem.activation_bytes(S7, "dual", tokens, True)


SMALL = dict(hidden_size=256, intermediate_size=688, num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)


def _saved_bytes_per_token_of_layer_1(method: str, autocast: bool) -> float:
    """Bytes autograd saves inside decoder layer 1 (layer 0's norm sees an input without grad), per token, measured as
    the difference between 128 and 64 tokens so that fixed costs (casts of the small factors) cancel."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from duallora import DualLoraConfig

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

    def measure(tokens: int) -> int:
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, attn_implementation="sdpa", **SMALL))
        model = model.to(torch.bfloat16)
        if method == "lora":
            model = get_peft_model(model, LoraConfig(r=16, target_modules=targets), autocast_adapter_dtype=True)
        elif method == "dual":
            model = get_peft_model(model, DualLoraConfig(r=16, target_modules=targets, warmup_steps=0),
                                   autocast_adapter_dtype=True)
        layer = next(m for n, m in model.named_modules() if n.endswith("layers.1"))
        seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
        state = {"inside": False, "total": 0}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                state["total"] += t.untyped_storage().nbytes() if state["inside"] else 0
            return t

        layer.register_forward_pre_hook(lambda *_: state.update(inside=True))
        layer.register_forward_hook(lambda *_: state.update(inside=False))
        ids = torch.randint(0, SMALL["vocab_size"], (1, tokens))
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
            model(input_ids=ids, labels=ids)
        return state["total"]

    return (measure(128) - measure(64)) / 64


@pytest.mark.parametrize("method,autocast,copy", [
    ("full", False, None), ("lora", True, "bf16"), ("lora", False, "fp32"),
    pytest.param("dual", True, None, marks=pytest.mark.slow),  # its first call compiles the fused kernels (~5 s)
])
def test_layer_activation_formulas_match_what_autograd_saves(method, autocast, copy):
    small = mem.Shape("small", hidden=256, intermediate=688, layers=2, heads=4, kv_heads=2, vocab=1000)
    expected = mem.layer_activation_bytes_per_token(small, method)
    if method == "lora":
        expected += mem.lora_extra_bytes_per_token_layer(small, 16, copy)
    assert _saved_bytes_per_token_of_layer_1(method, autocast) == expected


def test_script_writes_json_table_and_plot(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "memory_per_gpu.py"), "--output-dir",
                             str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    payload = json.loads((tmp_path / "memory_per_gpu.json").read_text())
    assert len(payload["rows"]) == 2 * 2 * 7 * 3  # models x (fsdp, ddp) x GPU counts x methods
    row = next(r for r in payload["rows"] if r["model"] == "LLaMA-2-7B" and r["method"] == "dual"
               and r["gpus"] == 8 and r["sharding"] == "fsdp")
    assert set(row["bytes"]) == {"weights", "gathered_unit", "trainable_state", "activations",
                                 "lora_extra_activations", "dual_transients", "total"}
    assert row["bytes"]["total"] == sum(v for k, v in row["bytes"].items() if k != "total")
    table = (tmp_path / "memory_per_gpu.md").read_text()
    assert "| model | GPUs | full | LoRA | Dual LoRA | Dual / LoRA |" in table
    assert sum(line.startswith("| LLaMA-2-") for line in table.splitlines()) == 14
    assert sum(line.startswith("| Llama-3-") for line in table.splitlines()) == 2 * 2  # 8B, 70B x QLoRA, QDual
    assert len(payload["quantized_rows"]) == 4 and all(set(r["fits"]) == {"24 GB", "80 GB"}
                                                       for r in payload["quantized_rows"])
    assert (tmp_path / "memory_per_gpu.png").stat().st_size > 10_000


def test_a_4bit_base_counts_nf4_codes_their_two_level_scales_and_the_upcast_remainder():
    """Llama-3-8B by hand: 6,979,321,856 weights in the seven linears of its 32 layers (per layer 2 * 4096^2 +
    2 * 1024 * 4096 + 3 * 14336 * 4096), at half a byte plus one byte per 64 plus 4 bytes per 64 * 256; the other
    1,050,939,392 (embedding and head 128256 x 4096 each, 65 norms of 4096) at 4 bytes after
    prepare_model_for_kbit_training. QLoRA additionally dequantizes the widest linear (14336 x 4096) to bf16."""
    s = mem.LLAMA3_8B
    linear = 32 * (2 * 4096**2 + 2 * 1024 * 4096 + 3 * 14336 * 4096)
    assert linear == 6_979_321_856 and mem.model_params(s) - linear == 1_050_939_392
    assert mem.quantized_weights_bytes(s) == linear * (0.5 + 1 / 64 + 4 / 16384) + 1_050_939_392 * 4
    assert (mem.quantized_weights_bytes(s, unquantized_bytes=2)
            == linear * (0.5 + 1 / 64 + 4 / 16384) + 1_050_939_392 * 2)
    assert mem.dequantized_transient_bytes(s, "qlora", 16 * 2**20) == 2 * 14336 * 4096
    assert mem.dequantized_transient_bytes(s, "qdual", 16 * 2**20) == 0
    qlora, qdual = mem.quantized_row(s, "qlora"), mem.quantized_row(s, "qdual")
    assert qlora["bytes"]["trainable_state"] == qdual["bytes"]["trainable_state"] == 16 * 32 * 16 * (
        2 * (4096 + 4096) + 2 * (1024 + 4096) + 3 * (14336 + 4096))
    for row in (qlora, qdual):
        assert row["bytes"]["total"] == sum(v for k, v in row["bytes"].items() if k != "total")
        assert row["fits"] == {"24 GB": row["bytes"]["total"] <= 24e9, "80 GB": row["bytes"]["total"] <= 80e9}

"""The speed and memory half of ``gpu_check.py``: a bf16 training step of LLaMA-architecture models with random
weights per method (median time of the measured steps, peak memory), a profiler table of one decoder layer, and the
FLOP and byte counts that explain the ratios.

Memory is CUDA's allocator peak (``torch.cuda.max_memory_allocated``) on a GPU and the process's resident set on the
CPU; every timed step ends with a synchronisation.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass

import torch

# LLaMA widths (hidden, MLP, layers, heads, kv heads, vocabulary): the layer counts of 8B are cut to fit the time
MODELS = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-3.2-1b": (2048, 8192, 16, 32, 8, 128256),
    "llama-3-8b": (4096, 14336, 4, 32, 8, 128256),
    "toy": (64, 160, 2, 4, 2, 256),  # the dry run's
}
METHODS = ("full", "lora", "lora-2r", "loraplus", "dora", "hira", "dual", "dual-bf16-grad", "d2")
# on a 4-bit base: QLoRA, LoRA+, QDoRA, QDual, QD2. Full fine-tuning cannot train a frozen 4-bit base, and peft's
# HiRA (0.21.2) fails on one: it multiplies the packed 4-bit weight by B A ("The size of tensor a (2048) must match
# the size of tensor b (64)"), so it has no 4-bit row
QUANTIZED_METHODS = ("lora", "loraplus", "dora", "dual", "d2")
RANK = 16


def quantize_linears(model) -> None:
    """Every linear of the decoder layers as bitsandbytes' NF4 ``Linear4bit`` with double quantization and bf16
    compute, as ``BitsAndBytesConfig(load_in_4bit=True, ...)`` loads them, without a checkpoint on disk."""
    import bitsandbytes as bnb

    for layer in model.model.layers:
        for name, linear in list(layer.named_modules()):
            if isinstance(linear, torch.nn.Linear):
                quantized = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                              compute_dtype=torch.bfloat16, quant_type="nf4",
                                              compress_statistics=True, device="meta")
                quantized.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4",
                                                     compress_statistics=True).to(linear.weight.device)
                layer.set_submodule(name, quantized)


def build(model_name: str, method: str, device: str, checkpointing: bool, quantize: bool = False):
    """A fresh random-weight LLaMA in bf16 on ``device`` (its linears 4-bit with ``quantize``) with the method
    applied, and its AdamW."""
    from peft import get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from duallora.app.run_config import optimizer as make_optimizer
    from variants import VARIANTS, peft_config

    hidden, mlp, layers, heads, kv, vocab = MODELS[model_name]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab,
                         max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device(device):  # initialise where it runs: a 1B model's random init on the CPU takes seconds
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    if quantize:
        quantize_linears(model)
    config = peft_config(method, RANK, "CAUSAL_LM")  # all seven linear types adapted
    if config is not None:
        model = get_peft_model(model, config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config is not None:
            model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # AdamW; LoRA+'s parameter groups (B at 16x the learning rate) for loraplus, as duallora train builds them
    return model, make_optimizer(model, VARIANTS[method].method, lr=1e-5), sum(p.numel() for p in params)


class Memory:
    """Peak memory of what runs inside: CUDA's allocator on a GPU, the resident set (sampled) on the CPU."""

    def __init__(self, device: str):
        self.device, self.peak_mib = device, 0.0

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            from train_step import PeakRss

            self._rss = PeakRss().__enter__()
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_mib = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._rss.__exit__(*exc)
            self.peak_mib = self._rss.peak / 2**20


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class StepCase:
    model: str
    batch: int
    seq: int
    checkpointing: bool
    quantized: bool = False  # the decoder's linears 4-bit NF4 (QLoRA's base)

    @property
    def label(self) -> str:
        return (f"{self.model}{' nf4' if self.quantized else ''} {self.batch}x{self.seq}"
                f"{' ckpt' if self.checkpointing else ''}")


def measure(case: StepCase, method: str, device: str, steps: int) -> dict:
    """One method's step time and peak memory on a fresh model (freed when this returns: see :func:`release`)."""
    model, optimizer, trainable = build(case.model, method, device, case.checkpointing, case.quantized)
    vocab = MODELS[case.model][5]
    ids = torch.randint(0, vocab, (case.batch, case.seq), generator=torch.Generator().manual_seed(0)).to(device)

    def train_step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    train_step()  # warm-up: kernels compiled, allocator and optimizer state settled
    train_step()
    times = []
    with Memory(device) as memory:
        for _ in range(steps):
            synchronize(device)
            start = time.perf_counter()
            train_step()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return {"case": case.label, **case.__dict__, "method": method, "trainable_params": trainable,
            "step_seconds": statistics.median(times), "all_step_seconds": times, "peak_mib": memory.peak_mib}


def release(device: str) -> None:
    """Give the memory of the last measurement back, so that the next one starts from the same floor."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def profile_layer(model_name: str, tokens: int, device: str, top: int = 12) -> dict[str, list[dict]]:
    """The top kernels (by device time) of one decoder layer's forward and backward, Dual LoRA against LoRA."""
    from torch.profiler import ProfilerActivity, profile

    tables = {}
    for method in ("lora", "dual"):
        hidden, mlp, _, heads, kv, vocab = MODELS[model_name]
        model, optimizer, _ = build(model_name, method, device, checkpointing=False)
        layer = model.base_model.model.model.layers[0]
        x = torch.randn(1, tokens, hidden, device=device, dtype=torch.bfloat16, requires_grad=True)
        position = torch.arange(tokens, device=device)[None]
        rotary = model.base_model.model.model.rotary_emb(x, position)

        def run():
            with torch.autocast(device, dtype=torch.bfloat16):
                out = layer(x, position_embeddings=rotary)
            (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()

        run()
        run()
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
        with profile(activities=activities) as prof:
            run()
            synchronize(device)
        key = "device_time_total" if device == "cuda" else "cpu_time_total"
        events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
        total = sum(getattr(e, key) for e in events if not e.key.startswith(("aten::", "autograd", "Optimizer")))
        tables[method] = [{"kernel": e.key[:90], "ms": getattr(e, key) / 1e3, "calls": e.count}
                          for e in events[:top]]
        tables[f"{method}_total_ms"] = total / 1e3
        del model, optimizer
        gc.collect()
    return tables


def layer_costs(out_features: int, in_features: int, tokens: int, r: int = RANK, bytes_per: int = 4) -> dict:
    """FLOPs and out x in bytes moved per training step of one adapted linear layer, beyond the frozen base layer's
    own forward and input gradient (4 T out in FLOPs), per method (docs/methods/dual_lora.md, "What a step costs";
    peft's implementations).

    - LoRA: x A^T, then B; in backward the two factor gradients and the input gradient through them: 6 T r (in + out).
    - DoRA (peft): LoRA's, plus W0 + s B A and its row norms every step (2 out in r and a few out x in passes).
    - HiRA (peft): builds W0 * (B A) (2 out in r), a second full matmul with it in the forward (2 T out in), the input
      gradient through it and its weight gradient in the backward (4 T out in), the factor gradients (4 out in r).
    - Dual LoRA: P = B A and Q = D C in the forward (2 out in r), again in the backward (2 out in r), the weight
      gradient G = g^T x (2 T out in, as full fine-tuning's), the four factor gradients (4 out in r); about 12 passes
      over out x in matrices (build W; rebuild it for the input gradient; Gm and Gd from G, P and Q).
    - D2-LoRA: two branches of rank r: their products forward and backward (8 out in r), G (2 T out in), the four
      factor gradients (8 out in r); about 16 passes (W', its norms, W_hat; the projection's gradient).
    """
    mn, t = out_features * in_features, tokens
    lora = 6 * t * r * (in_features + out_features)
    return {
        "base_flops": 4 * t * mn,
        "lora_flops": lora, "lora_bytes": 0,
        "dora_flops": lora + 2 * mn * r, "dora_bytes": 4 * mn * bytes_per,
        "hira_flops": 6 * t * mn + 6 * mn * r, "hira_bytes": 6 * mn * bytes_per,
        "dual_flops": 2 * t * mn + 8 * mn * r, "dual_bytes": 12 * mn * bytes_per,
        "d2_flops": 2 * t * mn + 16 * mn * r, "d2_bytes": 16 * mn * bytes_per,
    }

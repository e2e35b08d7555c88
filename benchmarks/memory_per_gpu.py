"""Memory per GPU of training LLaMA-2-7B and LLaMA-2-70B with Dual LoRA, LoRA and full fine-tuning on 1 to 64 GPUs:
a pure-arithmetic model (no model download; runs in a few seconds), one function per component, each with the
formula it computes next to it, so that every number can be checked by hand.

    python benchmarks/memory_per_gpu.py            # r=16, micro-batch 1 x 2048 tokens, checkpointing on, 16 MiB blocks
    python benchmarks/memory_per_gpu.py --no-checkpointing --block-mib 0 --lora-input-copy fp32

Writes ``docs/bench/memory_per_gpu.json`` (every component of every row, in bytes and GiB), ``.md`` (the table) and
``.png`` (GiB per GPU against the number of GPUs, one panel per model).

Assumptions (also in the JSON):

- Sharding: FSDP / ZeRO-3. Every persistent tensor (frozen weights, trainable parameters, their gradients and optimizer
  state) is split evenly over the N GPUs; one FSDP unit (each decoder layer, the embedding and the LM head are \
units) is
  gathered at a time, so the largest unit is held whole on every GPU while it runs. FSDP's prefetch of the next unit
  (which can hold two units at once) is not counted. N = 1 is also the DDP case: DDP holds the 1-GPU numbers on every
  GPU, whatever N (rows with ``"sharding": "ddp"`` in the JSON).
- dtypes: base weights and activations bf16 (2 bytes). Adapter parameters fp32 with fp32 gradients and AdamW's two
  fp32 states: 16 bytes per adapter parameter. Full fine-tuning: 16 bytes per parameter, ZeRO's mixed-precision Adam
  accounting (bf16 working copy 2 + bf16 gradient 2 + fp32 master copy 4 + two fp32 Adam states 8; FSDP's
  MixedPrecision splits the same 16 as fp32 sharded parameter 4 + fp32 gradient 4 + Adam 8). ``--full-grad-bytes 4``
  counts fp32 gradients next to a bf16 copy (18 bytes per parameter).
- Targets: all seven linear layers of every decoder layer (q, k, v, o, gate, up, down), rank r for LoRA and
  r1 + r2 = r for Dual LoRA: the same adapter parameter count.
- Activations: what autograd saves for backward in Hugging Face's LlamaDecoderLayer with the SDPA / flash kernel, no
  dropout, counted per token; the per-layer formulas were checked against ``torch.autograd.graph.saved_tensors_hooks``
  on a small LLaMA in bf16 (full fine-tuning, peft LoRA with and without autocast, Dual LoRA: equal to the byte;
  tests/test_memory_model.py).
  With activation checkpointing only each decoder layer's input is kept, plus the activations of the one layer being
  recomputed. The LM head's logits and log-probabilities are counted. Transient gradient buffers of the backward and
  the allocator's fragmentation are not (they are alike for the three methods); all components are summed, as if they
  peaked together.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs" / "bench"
GIB = 2**30
MIB = 2**20
GPUS = (1, 2, 4, 8, 16, 32, 64)
METHODS = ("full", "lora", "dual")
LABELS = {"full": "full fine-tuning", "lora": "LoRA (peft)", "dual": "Dual LoRA (ours)"}

BF16 = 2
FP32 = 4
ADAPTER_BYTES_PER_PARAM = FP32 + FP32 + 2 * FP32  # fp32 parameter + fp32 gradient + AdamW's two fp32 states = 16
FULL_MASTER_AND_ADAM = FP32 + 2 * FP32  # fp32 master copy + AdamW's two fp32 states = 12 (the bf16 copy is "weights")
DUAL_TRANSIENT_MATRICES = 6  # P = B A, Q = D C, the built W, G = g^T x, and the two branch gradients Gm, Gd


@dataclass(frozen=True)
class Shape:
    """A LLaMA-style decoder: ``layers`` x (attention with ``heads`` query and ``kv_heads`` key/value heads, SwiGLU
    MLP), untied embedding and LM head."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        """Width of k and v: ``hidden / heads * kv_heads`` (= hidden without grouped-query attention)."""
        return self.hidden // self.heads * self.kv_heads


LLAMA3_8B = Shape("Llama-3-8B", hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256)
LLAMA3_70B = Shape("Llama-3-70B", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256)
QUANTIZED_SHAPES = (LLAMA3_8B, LLAMA3_70B)
QUANTIZED_METHODS = ("qlora", "qdual")
QUANTIZED_LABELS = {"qlora": "QLoRA (peft LoRA, 4-bit base)", "qdual": "QDual (Dual LoRA, 4-bit base)"}
GPU_SIZES_GB = (24, 80)  # one consumer / one data-centre GPU, in GB (10^9 bytes) as sold
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit codes; 8-bit absmax per 64; fp32 per 256 absmax
LLAMA2_7B = Shape("LLaMA-2-7B", hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000)
LLAMA2_70B = Shape("LLaMA-2-70B", hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=32000)
SHAPES = (LLAMA2_7B, LLAMA2_70B)


# ----------------------------------------------------------------------------------------------- parameter counts
def linear_shapes(s: Shape) -> list[tuple[str, int, int]]:
    """The seven adapted linears of one decoder layer as ``(name, out, in)``, PyTorch's ``W0: (out, in)``."""
    h, i, kv = s.hidden, s.intermediate, s.kv_dim
    return [("q_proj", h, h), ("k_proj", kv, h), ("v_proj", kv, h), ("o_proj", h, h),
            ("gate_proj", i, h), ("up_proj", i, h), ("down_proj", h, i)]


def layer_params(s: Shape) -> int:
    """One decoder layer: ``sum(out * in)`` over its seven linears + two RMSNorm weights (``2 h``)."""
    return sum(o * i for _, o, i in linear_shapes(s)) + 2 * s.hidden


def model_params(s: Shape) -> int:
    """``L * layer_params + 2 V h`` (untied embedding and LM head) ``+ h`` (final RMSNorm)."""
    return s.layers * layer_params(s) + 2 * s.vocab * s.hidden + s.hidden


def layer_adapter_params(s: Shape, r: int) -> int:
    """Adapter parameters of one decoder layer: ``sum r (in + out)`` over the seven linears. The same for LoRA
    (A: r x in, B: out x r) and Dual LoRA (A: r1 x in, B: out x r1, C: r2 x in, D: out x r2, r1 + r2 = r)."""
    return sum(r * (o + i) for _, o, i in linear_shapes(s))


def adapter_params(s: Shape, r: int) -> int:
    """``L * layer_adapter_params``."""
    return s.layers * layer_adapter_params(s, r)


def largest_unit_params(s: Shape) -> int:
    """The largest FSDP unit: ``max(layer_params, V h)`` (a decoder layer, or the embedding / LM head matrix)."""
    return max(layer_params(s), s.vocab * s.hidden)


# ------------------------------------------------------------------------------------------- components, bytes per GPU
def weights_bytes(s: Shape, gpus: int) -> float:
    """Frozen (or, for full fine-tuning, the bf16 working copy of the) base weights, sharded:
    ``2 bytes * model_params / N``."""
    return BF16 * model_params(s) / gpus


def gathered_unit_bytes(s: Shape, gpus: int, method: str, r: int, full_grad_bytes: int = BF16) -> float:
    """The one FSDP unit gathered whole while it runs; 0 on one GPU (nothing to gather).

    - every method: its bf16 weights, ``2 * largest_unit_params``;
    - full fine-tuning: plus that unit's unsharded gradient before the reduce-scatter,
      ``full_grad_bytes * largest_unit_params``;
    - LoRA / Dual LoRA: plus the unit's fp32 adapter parameters and their fp32 gradients, ``8 * layer_adapter_params``.
    """
    if gpus == 1:
        return 0.0
    unit = BF16 * largest_unit_params(s)
    if method == "full":
        return unit + full_grad_bytes * largest_unit_params(s)
    return unit + (FP32 + FP32) * layer_adapter_params(s, r)


def trainable_state_bytes(s: Shape, gpus: int, method: str, r: int, full_grad_bytes: int = BF16) -> float:
    """Trainable parameters, gradients and optimizer state, sharded over N GPUs.

    - LoRA / Dual LoRA: ``16 bytes * adapter_params / N`` (fp32 parameter, fp32 gradient, two fp32 AdamW states);
    - full fine-tuning: ``(full_grad_bytes + 12) * model_params / N`` (gradient, fp32 master copy, two fp32 AdamW
      states; with the bf16 working copy in ``weights_bytes``: 16 bytes per parameter by default).
    """
    if method == "full":
        return (full_grad_bytes + FULL_MASTER_AND_ADAM) * model_params(s) / gpus
    return ADAPTER_BYTES_PER_PARAM * adapter_params(s, r) / gpus


def layer_activation_bytes_per_token(s: Shape, method: str) -> int:
    """Bytes one decoder layer saves for backward per token (HF LlamaDecoderLayer, SDPA / flash kernel, bf16, no
    dropout).

    Common to every method::

        two RMSNorms, each its fp32 upcast input and rsqrt:      2 (4h + 4)  = 8h + 8
        q, k, v after rotary (kept by the attention kernel):     2h + 2 * 2 kv_dim
        attention output (kernel's out; also o_proj's input):    2h
        attention log-sum-exp, fp32 per head:                    4 heads
        MLP: gate output (SiLU), up output and SiLU(gate) (mul): 3 * 2i

    Linear inputs, saved once each (Dual LoRA's Function, a trainable Linear, or LoRA's A without a dtype cast):
    the attention norm's output (q, k, v share it) 2h, the MLP norm's output (gate, up) 2h, down's input 2i:
    ``4h + 2i``. (A frozen ``nn.Linear`` saves only its weight, so LoRA's base layers add nothing; LoRA's own extra is
    :func:`lora_extra_bytes_per_token_layer`.)

    Full fine-tuning adds the two norms' bf16 normalised inputs (their weights train): ``+ 4h``.

    Total: Dual LoRA and LoRA's common part ``16h + 4 kv_dim + 8i + 4 heads + 8``; full fine-tuning ``+ 4h``.
    """
    h, i = s.hidden, s.intermediate
    common = 2 * (FP32 * h + FP32) + BF16 * h + 2 * BF16 * s.kv_dim + BF16 * h + FP32 * s.heads + 3 * BF16 * i
    linear_inputs = BF16 * h + BF16 * h + BF16 * i
    norm_weights = 2 * BF16 * h if method == "full" else 0
    return common + linear_inputs + norm_weights


def head_activation_bytes_per_token(s: Shape, method: str) -> int:
    """Bytes outside the decoder layers per token: the final RMSNorm's fp32 input and rsqrt ``4h + 4``, the loss's fp32
    log-probabilities ``4V``, the int64 labels 8, and the bf16 logits returned to the caller ``2V``.
    Full fine-tuning adds the final norm's bf16 normalised input and the LM head's input ``2h + 2h`` and the int64
    input ids kept by the embedding's backward 8. The loss's transient fp32 copy of the logits (4V) is not counted."""
    h, v = s.hidden, s.vocab
    common = FP32 * h + FP32 + FP32 * v + 8 + BF16 * v
    return common + (BF16 * h + BF16 * h + 8 if method == "full" else 0)


def activation_bytes(s: Shape, method: str, tokens: int, checkpointing: bool) -> float:
    """Activations kept for backward on one GPU (``tokens = micro_batch * seq``), LoRA's extra excluded
    (:func:`lora_extra_activation_bytes`).

    - checkpointing on: ``tokens * (L * 2h + layer + head)``: every decoder layer's bf16 input, one layer's activations
      (the layer being recomputed), and the head;
    - checkpointing off: ``tokens * (L * layer + head)``.

    ``layer`` and ``head`` are :func:`layer_activation_bytes_per_token` and :func:`head_activation_bytes_per_token`.
    """
    layer = layer_activation_bytes_per_token(s, method)
    head = head_activation_bytes_per_token(s, method)
    if checkpointing:
        return tokens * (s.layers * BF16 * s.hidden + layer + head)
    return tokens * (s.layers * layer + head)


LORA_INPUT_COPY_BYTES = {"bf16": BF16, "fp32": FP32, "none": 0}


def lora_extra_bytes_per_token_layer(s: Shape, r: int, input_copy: str) -> int:
    """What peft's LoRA saves per token per decoder layer beyond :func:`layer_activation_bytes_per_token`.

    peft's ``lora.Linear.forward`` computes ``base_layer(x) + lora_B(lora_A(dropout(x))) * scaling`` after
    ``x = x.to(lora_A.weight.dtype)``. With fp32 adapters on bf16 activations that cast makes, for each adapted layer,
    a copy of its input that ``lora_A`` saves (the frozen base layer saves none):

    - ``"bf16"``: under bf16 autocast (Trainer ``bf16=True``, accelerate ``mixed_precision="bf16"``) autocast casts the
      fp32 copy back and ``lora_A`` saves that bf16 copy, ``c = 2``;
    - ``"fp32"``: plain bf16 forward with fp32 adapters, ``lora_A`` saves the fp32 copy, ``c = 4``;
    - ``"none"``: adapters in the activations' dtype (or peft's ``disable_input_dtype_casting``): no copy, ``lora_A``
      saves ``x`` itself, which is already counted.

    So with a copy: ``c * sum(in)`` over the seven linears (``c (6h + i)``) replaces the ``4h + 2i`` counted once in
    the common part. Every mode also keeps ``x A^T`` (tokens x r) for ``lora_B``, in bf16 (fp32 in ``"fp32"`` mode):
    ``7 r c'``. Net: bf16 ``8h + 14r``; fp32 ``20h + 2i + 28r``; none ``14r``.
    """
    c = LORA_INPUT_COPY_BYTES[input_copy]
    copies = c * sum(i for _, _, i in linear_shapes(s)) - (BF16 * s.hidden + BF16 * s.hidden + BF16 * s.intermediate)
    xa_bytes = FP32 if input_copy == "fp32" else BF16
    return (copies if c else 0) + len(linear_shapes(s)) * r * xa_bytes


def lora_autocast_weight_cast_bytes(s: Shape, r: int, input_copy: str) -> int:
    """Under autocast (``"bf16"``), each layer also saves bf16 casts of A and B: ``2 * layer_adapter_params`` bytes
    per decoder layer, independent of the tokens."""
    return BF16 * layer_adapter_params(s, r) if input_copy == "bf16" else 0


def lora_extra_activation_bytes(s: Shape, r: int, tokens: int, checkpointing: bool, input_copy: str = "bf16") -> float:
    """LoRA's extra activations on one GPU: ``layers_live * (tokens * lora_extra_bytes_per_token_layer
    + lora_autocast_weight_cast_bytes)``, with ``layers_live = 1`` under checkpointing (only the recomputed layer holds
    them) and ``L`` without."""
    live = 1 if checkpointing else s.layers
    return live * (tokens * lora_extra_bytes_per_token_layer(s, r, input_copy)
                   + lora_autocast_weight_cast_bytes(s, r, input_copy))


def block_rows(out_features: int, in_features: int, bound_bytes: int) -> int:
    """Rows of ``W`` (and of each out x in matrix) that the library builds at once: the most rows whose fp32 block
    ``rows * in * 4`` stays within the bound, ``clamp(bound // (4 in), 1, out)``; ``bound = 0`` means no blocking
    (all ``out`` rows). The library's own rule, called rather than restated, so that the two cannot drift apart."""
    from duallora.core.blocked import KernelOptions

    return KernelOptions(block_mib=bound_bytes / MIB if bound_bytes > 0 else None).rows_per_block(
        out_features, in_features, FP32)


def dual_transient_bytes(s: Shape, block_bytes: int, matrices: int = DUAL_TRANSIENT_MATRICES) -> int:
    """Dual LoRA's out x in transients: while one adapted Linear runs forward or backward the memory-efficient Function
    holds at most about ``matrices`` (6) fp32 matrices of ``block_rows x in`` (P = B A, Q = D C, the built W, the
    weight gradient G = g^T x and the two branch gradients). Only one layer's exist at a time, so the largest block
    over the seven linears counts: ``matrices * max_j(block_rows(out_j, in_j) * in_j * 4)``. With the 16 MiB default
    both ``up``/``gate`` (11008 x 4096 in 7B) and ``down`` are cut to about 16 MiB; with ``block_bytes = 0`` it is
    ``matrices * out * in * 4`` of the largest linear. Independent of the tokens, the rank and the GPU count."""
    return matrices * max(block_rows(o, i, block_bytes) * i * FP32 for _, o, i in linear_shapes(s))


# ----------------------------------------------------------------------------------------------- 4-bit bases
def quantized_weights_bytes(s: Shape, unquantized_bytes: int = FP32) -> float:
    """A 4-bit NF4 base with double quantization (QLoRA's), on one GPU: the seven linears of every layer at
    ``0.5 + 1/64 + 4/(64 * 256)`` bytes per weight (two codes per byte; one 8-bit absmax per block of 64; one fp32
    scale per 256 absmax), and everything bitsandbytes leaves unquantized (embedding, LM head, norms) at
    ``unquantized_bytes`` each: 4 after ``prepare_model_for_kbit_training``, which upcasts them to fp32."""
    linear = s.layers * sum(o * i for _, o, i in linear_shapes(s))
    return NF4_BYTES_PER_PARAM * linear + unquantized_bytes * (model_params(s) - linear)


def dequantized_transient_bytes(s: Shape, method: str, block_bytes: int) -> int:
    """What reading a 4-bit ``W0`` costs beyond the packed weight, one layer at a time:

    - QLoRA: bitsandbytes' Linear4bit dequantizes the whole weight to the bf16 compute dtype in forward and again in
      backward: ``2 * max(out * in)``;
    - QDual: ``W0`` is dequantized one row block at a time into the block the memory-efficient Function builds
      anyway (:func:`dual_transient_bytes` counts it), so nothing more.
    """
    if method == "qlora":
        return BF16 * max(o * i for _, o, i in linear_shapes(s))
    return 0


def quantized_row(s: Shape, method: str, *, r: int = 16, micro_batch: int = 1, seq: int = 2048,
                  checkpointing: bool = True, block_mib: float = 16, lora_input_copy: str = "bf16",
                  unquantized_bytes: int = FP32) -> dict:
    """One GPU, a 4-bit base: every component in bytes, as :func:`memory_row`, with the base's weights at 4 bits and
    the dequantization transients; the adapter's state and the activations as on a bf16 base."""
    tokens, lora = micro_batch * seq, "lora" if method == "qlora" else "dual"
    parts = {
        "weights": quantized_weights_bytes(s, unquantized_bytes),
        "trainable_state": trainable_state_bytes(s, 1, lora, r),
        "activations": activation_bytes(s, lora, tokens, checkpointing),
        "lora_extra_activations": (lora_extra_activation_bytes(s, r, tokens, checkpointing, lora_input_copy)
                                   if lora == "lora" else 0),
        "dual_transients": dual_transient_bytes(s, int(block_mib * MIB)) if lora == "dual" else 0,
        "dequantized_transients": dequantized_transient_bytes(s, method, int(block_mib * MIB)),
    }
    parts = {k: float(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return {"model": s.name, "method": method, "gpus": 1, "base": "nf4", "bytes": parts,
            "gib": {k: round(v / GIB, 4) for k, v in parts.items()},
            "fits": {f"{size} GB": parts["total"] <= size * 1e9 for size in GPU_SIZES_GB}}


def quantized_markdown(rows: list[dict], args) -> str:
    lines = [f"One GPU, 4-bit NF4 base with double quantization (QLoRA's), all 7 linears adapted, r={args.r}, "
             f"micro-batch {args.micro_batch} x {args.seq} tokens, "
             f"checkpointing {'on' if args.checkpointing else 'off'}, embedding, head and norms in "
             f"{'fp32 (prepare_model_for_kbit_training)' if args.unquantized_bytes == 4 else 'bf16'}; "
             "a GPU of 24 or 80 GB (10^9 bytes) holds the total or not (the CUDA context, ~0.5 GB, and fragmentation "
             "not counted).", "",
             "| model | method | weights | adapter + AdamW | activations | transients | total (GiB) | 24 GB | 80 GB |",
             "|" + " --- |" * 9]
    for row in rows:
        g = row["gib"]
        transients = g["lora_extra_activations"] + g["dual_transients"] + g["dequantized_transients"]
        lines.append(f"| {row['model']} | {QUANTIZED_LABELS[row['method']]} | {g['weights']:.1f} | "
                     f"{g['trainable_state']:.2f} | {g['activations']:.2f} | {transients:.2f} | {g['total']:.1f} | "
                     + " | ".join("fits" if row["fits"][f"{n} GB"] else "no" for n in GPU_SIZES_GB) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- rows
def memory_row(s: Shape, method: str, gpus: int, *, r: int = 16, micro_batch: int = 1, seq: int = 2048,
               checkpointing: bool = True, block_mib: float = 16, lora_input_copy: str = "bf16",
               full_grad_bytes: int = BF16, sharding: str = "fsdp") -> dict:
    """Every component for one (model, method, GPU count), in bytes; ``total`` is their sum. ``sharding="ddp"``
    shards nothing: the 1-GPU numbers on every GPU."""
    shards = 1 if sharding == "ddp" else gpus
    tokens = micro_batch * seq
    parts = {
        "weights": weights_bytes(s, shards),
        "gathered_unit": gathered_unit_bytes(s, shards, method, r, full_grad_bytes),
        "trainable_state": trainable_state_bytes(s, shards, method, r, full_grad_bytes),
        "activations": activation_bytes(s, method, tokens, checkpointing),
        "lora_extra_activations": (lora_extra_activation_bytes(s, r, tokens, checkpointing, lora_input_copy)
                                   if method == "lora" else 0),
        "dual_transients": dual_transient_bytes(s, int(block_mib * MIB)) if method == "dual" else 0,
    }
    parts = {k: float(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return {"model": s.name, "method": method, "gpus": gpus, "sharding": sharding, "bytes": parts,
            "gib": {k: round(v / GIB, 4) for k, v in parts.items()}}


def all_rows(args) -> list[dict]:
    options = dict(r=args.r, micro_batch=args.micro_batch, seq=args.seq, checkpointing=args.checkpointing,
                   block_mib=args.block_mib, lora_input_copy=args.lora_input_copy,
                   full_grad_bytes=args.full_grad_bytes)
    return [memory_row(s, m, n, sharding=sh, **options)
            for s in SHAPES for sh in ("fsdp", "ddp") for n in GPUS for m in METHODS]


def caption(args) -> str:
    return (f"Memory per GPU (GiB), all 7 linears of every decoder layer, r={args.r} (Dual LoRA r1+r2={args.r}), "
            f"micro-batch {args.micro_batch} x {args.seq} tokens, activation checkpointing "
            f"{'on' if args.checkpointing else 'off'}, bf16 weights and activations, fp32 adapters + AdamW "
            f"(16 B/param), full fine-tuning {args.full_grad_bytes + 14} B/param; FSDP (ZeRO-3) shards all persistent "
            f"state and gathers one decoder layer at a time (DDP: the 1-GPU figure on every GPU); Dual LoRA's "
            f"out x in blocks {'unbounded' if not args.block_mib else f'<= {args.block_mib:g} MiB'}; "
            f"LoRA's input copy {args.lora_input_copy}. Arithmetic model: `python benchmarks/memory_per_gpu.py`.")


def markdown(rows: list[dict], args) -> str:
    lines = [caption(args), "", "| model | GPUs | full | LoRA | Dual LoRA | Dual / LoRA |", "|" + " --- |" * 6]
    fsdp = [r for r in rows if r["sharding"] == "fsdp"]
    for s in SHAPES:
        for n in GPUS:
            tot = {r["method"]: r["bytes"]["total"] / GIB for r in fsdp if r["model"] == s.name and r["gpus"] == n}
            lines.append(f"| {s.name} | {n} | {tot['full']:.1f} | {tot['lora']:.1f} | {tot['dual']:.1f} | "
                         f"{tot['dual'] / tot['lora']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(SHAPES), figsize=(11, 4.2))
    for ax, s in zip(axes, SHAPES):
        for m in METHODS:
            pts = sorted((r["gpus"], r["bytes"]["total"] / GIB) for r in rows
                         if r["sharding"] == "fsdp" and r["model"] == s.name and r["method"] == m)
            ax.plot([x for x, _ in pts], [y for _, y in pts], "o-", label=LABELS[m])
        ax.axhline(80, color="grey", linestyle="--", linewidth=0.8)
        ax.text(GPUS[-1], 80, "80 GiB", ha="right", va="bottom", fontsize=8, color="grey")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(GPUS, [str(n) for n in GPUS])
        ax.set_xlabel("GPUs (FSDP / ZeRO-3)")
        ax.set_ylabel("GiB per GPU")
        ax.set_title(s.name)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--r", type=int, default=16, help="rank budget (Dual LoRA: r1 + r2 = r)")
    parser.add_argument("--micro-batch", type=int, default=1, help="sequences per GPU per step")
    parser.add_argument("--seq", type=int, default=2048, help="tokens per sequence")
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false",
                        help="keep every layer's activations instead of each layer's input only")
    parser.add_argument("--block-mib", type=float, default=16,
                        help="bound on one fp32 out x in block of Dual LoRA (MiB); 0 = no blocking")
    parser.add_argument("--lora-input-copy", default="bf16", choices=sorted(LORA_INPUT_COPY_BYTES),
                        help="the copy of each layer input that peft's LoRA saves: bf16 (autocast), "
                             "fp32 (no autocast), none (adapters in the activation dtype)")
    parser.add_argument("--full-grad-bytes", type=int, default=BF16, choices=(BF16, FP32),
                        help="full fine-tuning's gradient bytes per parameter (2: 16 B/param in all, 4: 18)")
    parser.add_argument("--unquantized-bytes", type=int, default=FP32, choices=(BF16, FP32),
                        help="4-bit bases: bytes per weight of what stays unquantized (embedding, head, norms); "
                             "4 after prepare_model_for_kbit_training, 2 without it")
    parser.add_argument("--output-dir", default=str(DOCS))
    args = parser.parse_args(argv)
    rows = all_rows(args)
    quantized = [quantized_row(s, m, r=args.r, micro_batch=args.micro_batch, seq=args.seq,
                               checkpointing=args.checkpointing, block_mib=args.block_mib,
                               lora_input_copy=args.lora_input_copy, unquantized_bytes=args.unquantized_bytes)
                 for s in QUANTIZED_SHAPES for m in QUANTIZED_METHODS]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "memory_per_gpu"
    models = {s.name: {**asdict(s), "params": model_params(s), "adapter_params": adapter_params(s, args.r),
                       "dual_block_rows": {n: block_rows(o, i, int(args.block_mib * MIB))
                                           for n, o, i in linear_shapes(s)}}
              for s in SHAPES}
    payload = {"args": vars(args), "caption": caption(args), "assumptions": __doc__.split("Assumptions")[1].strip(),
               "models": models, "rows": rows,
               "quantized_models": {s.name: {**asdict(s), "params": model_params(s)} for s in QUANTIZED_SHAPES},
               "quantized_rows": quantized}
    stem.with_suffix(".json").write_text(json.dumps(payload, indent=1))
    table = markdown(rows, args) + "\n" + quantized_markdown(quantized, args)
    stem.with_suffix(".md").write_text(table)
    plot(rows, stem.with_suffix(".png"), f"Memory per GPU, r={args.r}, {args.micro_batch}x{args.seq} tokens, "
         f"checkpointing {'on' if args.checkpointing else 'off'}")
    print(table)


if __name__ == "__main__":
    main()

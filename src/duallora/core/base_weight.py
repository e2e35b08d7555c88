"""``W0`` as the adapted layers read it: a dense weight (``nn.Linear``, GPT-2's ``Conv1D``) or a quantized one
(bitsandbytes' 4-bit ``Linear4bit`` and 8-bit ``Linear8bitLt``), always as ``(out, in)`` and, where the memory
bound asks, one block of output rows at a time.

In the memory-efficient forward and backward a quantized ``W0`` is never dequantized whole: bitsandbytes quantizes the
flattened weight in blocks of ``blocksize`` elements (4-bit, each with its own absmax) or per row (8-bit, one scale per
row), so a block of output rows dequantizes on its own as long as it does not split a quantization block. Merges
dequantize whole (in float32), as peft does for LoRA on these layers, and write back by quantizing again.

A 4-bit weight is read in whichever of bitsandbytes' two layouts it is in *now*: on CPUs with AVX512-BF16,
``Linear4bit.forward`` repacks its weight in place for its CPU kernel the first time it runs in eval mode without
grad (tiles of 32 rows, the absmax transposed and rounded to bfloat16). A reader that knew only the first layout
would misread every weight after one such call, silently. On such a CPU the absmax is read rounded to bfloat16 in
both layouts, so that what the adapter computes does not depend on whether a base-only call happened before.
"""

from __future__ import annotations

import functools
import weakref
from typing import Optional

import torch
from packaging.version import Version
from torch import nn
from transformers.pytorch_utils import Conv1D

from .watch import full_shape

# bitsandbytes releases with the CPU backend (and 4-bit dequantization there) that these layers need
MIN_BITSANDBYTES = "0.45.0"
QUANTIZED_LAYER_NAMES = ("Linear4bit", "Linear8bitLt")


class WeightRows:
    """An ``(out, in)`` tensor read whole or by rows: ``W0`` as the maths receives it."""

    row_multiple = 1  # a row block holds a multiple of this many rows
    quantized = False

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor

    @property
    def tensor(self) -> Optional[torch.Tensor]:
        """``W0`` as ``(out, in)``, the tensor autograd sees (no copy); None where it is quantized (frozen)."""
        return self._tensor

    @property
    def shape(self) -> torch.Size:
        return self.tensor.shape

    def rows(self, s: slice, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``s`` of ``W0`` in ``dtype``, row-major (the fused kernels take dense inputs only: a transposed
        input to the compiled D2 reduction gave wrong results in torch 2.13). For a stack ``(experts, out, in)``, rows
        ``s`` of every matrix."""
        return self.tensor[..., s, :].to(dtype).contiguous()

    def full(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All of ``W0`` in ``dtype`` (merges, inspection)."""
        return self.tensor.to(dtype)

    def whole(self, dtype: torch.dtype) -> torch.Tensor:
        """``W0`` whole as the plain-autograd reference path uses it: the live tensor when dense (autograd can reach
        it), dequantized to ``dtype`` when quantized (frozen)."""
        return self.full(dtype) if self.quantized else self.tensor

    def cache_key(self) -> Optional["TensorsKey"]:
        """What a value computed from ``W0`` (D2-LoRA's ``n(W0)``) may be cached under, or None where it must not be:
        a plain tensor (a merge's intermediate), a sharded weight (FSDP refills its storage, ZeRO-3 gathers anew)."""
        return None

    def after_state_dict(self) -> None:
        """Called after the layer's ``state_dict()``: mend what a library's own saving left behind (nothing here)."""


def as_rows(w0) -> WeightRows:
    """``w0`` as a :class:`WeightRows` (a tensor is wrapped, a reader passes through)."""
    return w0 if isinstance(w0, WeightRows) else WeightRows(w0)


class BaseWeight(WeightRows):
    """A dense layer's ``W0``, read live from the layer (a transposed view for Conv1D, which stores ``(in, out)``)."""

    def __init__(self, layer: nn.Module):
        self.layer = layer

    @property
    def tensor(self) -> Optional[torch.Tensor]:
        w = self.layer.weight
        return w.t() if isinstance(self.layer, Conv1D) else w

    @property
    def shape(self) -> torch.Size:
        """``(out, in)``, also for a ZeRO-3 partition, whose data is empty outside a gather (:func:`full_shape`)."""
        shape = full_shape(self.layer.weight)
        return torch.Size(reversed(shape)) if isinstance(self.layer, Conv1D) else shape

    @property
    def parameter(self) -> torch.Tensor:
        """The stored parameter (what FSDP shards, DeepSpeed partitions, ``save_pretrained`` reads)."""
        return self.layer.weight

    @property
    def device(self) -> torch.device:
        return self.layer.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype a merged weight is written in."""
        return self.layer.weight.dtype

    def watched(self) -> list[torch.Tensor]:
        """What ``W0``'s values live in (the eval cache fingerprints it, the sharding check reads it)."""
        return [self.layer.weight]

    def cache_key(self) -> Optional["TensorsKey"]:
        """Each watched tensor's identity, storage, offset, shape, strides, dtype, device and version counter, and the
        layout of the reader (:meth:`layout_key`): a merge (``copy_``), ``load_state_dict`` (``assign=True`` too, even
        onto a freed address), an in-place edit under ``no_grad``, a cast or a re-quantized weight each change it. A
        write through ``.data`` is the one change PyTorch does not count (as for autograd): edit a weight under
        ``torch.no_grad()`` instead."""
        return tensors_key(self.watched(), (type(self).__name__, *self.layout_key()))

    def layout_key(self) -> tuple:
        """What else decides how ``W0`` is read from the watched tensors (Conv1D's transpose)."""
        return (isinstance(self.layer, Conv1D),)

    def snapshot(self) -> Optional[nn.Parameter]:
        """What a merge keeps so that unmerge can put ``W0`` back exactly: nothing for a dense weight (unmerge inverts
        the merge arithmetically, within float32 rounding)."""
        return None

    @torch.no_grad()
    def write(self, w: torch.Tensor) -> Optional[float]:
        """Make ``W0`` equal ``w`` (a merge); the largest rounding error relative to ``w``'s largest value (None:
        exact up to the weight's dtype)."""
        # copy_ in place: the Parameter keeps its storage, so tied weights and optimizer references stay valid; on the
        # Parameter itself, not its .data, so that its version counter moves (cache_key sees the new W0)
        self.layer.weight.copy_(w.t() if isinstance(self.layer, Conv1D) else w)
        return None


class ParameterWeight(WeightRows):
    """A parameter that its module reads itself, as ``(..., out, in)``: a 2-D one (a router's ``weight``) as a Linear
    stores it, a 3-D stack of expert matrices as ``(experts, out, in)`` (Mixtral, Qwen3-MoE, OLMoE) or, where the
    module stores ``(experts, in, out)`` (gpt-oss: ``transposed``), as a transposed view of it (no copy).

    The parameter is read from the module's ``_parameters``: while an adapter runs the module, the module's attribute
    of that name is the adapted weight (:mod:`duallora.core.param_wrapper`), the stored ``W0`` stays here."""

    def __init__(self, module: nn.Module, name: str, transposed: bool):
        self.module, self.name, self.transposed = module, name, transposed

    @property
    def parameter(self) -> torch.Tensor:
        return self.module._parameters[self.name]

    def to_stored(self, w: torch.Tensor) -> torch.Tensor:
        """``w`` of shape ``(..., out, in)`` in the layout the module stores (a view)."""
        return w.mT if self.transposed else w

    @property
    def tensor(self) -> torch.Tensor:
        return self.to_stored(self.parameter)

    @property
    def shape(self) -> torch.Size:
        shape = full_shape(self.parameter)  # a ZeRO-3 partition's whole shape
        return torch.Size((*shape[:-2], shape[-1], shape[-2])) if self.transposed else shape

    @property
    def device(self) -> torch.device:
        return self.parameter.device

    @property
    def dtype(self) -> torch.dtype:
        return self.parameter.dtype

    def watched(self) -> list[torch.Tensor]:
        return [self.parameter]

    def cache_key(self) -> Optional["TensorsKey"]:
        return tensors_key(self.watched(), ("parameter", self.name, self.transposed))

    def snapshot(self) -> None:
        return None

    @torch.no_grad()
    def write(self, w: torch.Tensor) -> None:
        self.parameter.copy_(self.to_stored(w))  # in place (references stay valid), counted by its version
        return None


class QuantizedWeight(BaseWeight):
    """A frozen quantized ``W0``, read only by dequantizing rows (autograd never asks for its gradient)."""

    quantized = True

    @property
    def tensor(self):
        return None

    def full(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.rows(slice(0, self.shape[0]), dtype)

    def snapshot(self):
        """The quantized weight itself: requantizing on unmerge would round a second time, and keeping the packed
        weight costs 4 or 8 bits per element."""
        return self.layer.weight

    def restore(self, snapshot) -> None:
        self.layer.weight = snapshot


# Rows per tile of bitsandbytes' CPU layout (the block_n default of its _convert_weight_packed_for_cpu, which the
# quant state does not record).
CPU_PACKED_TILE_ROWS = 32


def quant_state_of(layer: nn.Module):
    """A 4-bit layer's ``QuantState``, as bitsandbytes' own forward finds it: on the weight, or, where FSDP replaced
    the ``Params4bit`` with a plain Parameter (QLoRA with ``bnb_4bit_quant_storage``), on the module, which
    bitsandbytes keeps for that case (``fix_4bit_weight_quant_state_from_module``). None if the layer has neither."""
    state = getattr(layer.weight, "quant_state", None)
    return state if state is not None else getattr(layer, "quant_state", None)


class TensorsKey:
    """A cache key of tensors: which tensors they are (weak references, so the key keeps nothing alive), where and
    how their values live, and their version counters. No value is read.

    Identity matters: a new tensor that lands on a freed address with the same shape and a fresh version counter
    (``load_state_dict(assign=True)`` swapping checkpoints; CUDA's caching allocator reuses blocks eagerly) has the
    same storage, offset, strides and version as the old one, and would be served the old one's cached value."""

    __slots__ = ("refs", "layout")

    def __init__(self, tensors: list[torch.Tensor], extra: tuple):
        self.refs = tuple(weakref.ref(t) for t in tensors)
        self.layout = (*extra, *((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                                  tuple(t.stride()), t.dtype, t.device, t._version) for t in tensors))

    def __eq__(self, other) -> bool:
        # `is`, not ==: a weakref's == compares its referents, and a tensor's == is elementwise
        return (isinstance(other, TensorsKey) and self.layout == other.layout and len(self.refs) == len(other.refs)
                and all(a() is not None and a() is b() for a, b in zip(self.refs, other.refs)))

    __hash__ = None  # compared, never hashed: a dead reference would change the hash


def tensors_key(tensors: list[torch.Tensor], extra: tuple) -> Optional[TensorsKey]:
    """A cache key of ``tensors`` (:class:`TensorsKey`); None if one of them is sharded (its storage is refilled
    between uses, or is a placeholder)."""
    from .watch import is_sharded

    if any(is_sharded(t) for t in tensors):
        return None
    return TensorsKey(tensors, extra)


def is_cpu_packed(state) -> bool:
    """Whether a 4-bit weight is in bitsandbytes' AVX512-BF16 CPU layout (see the module docstring)."""
    return bool(getattr(state, "packing_format_for_cpu", False))


def unpack_cpu_tiles(packed: torch.Tensor, rows: int, in_features: int) -> torch.Tensor:
    """The 4-bit codes ``(rows, in)`` of whole tiles of bitsandbytes' CPU layout, from their bytes ``(rows, in / 2)``.

    That layout stores, per tile of ``CPU_PACKED_TILE_ROWS`` rows and per pair of columns ``(2j, 2j + 1)``, the 64
    codes of the tile's rows at both columns, ordered ``(row, column)``: the first 32 in the low nibbles of 32
    bytes, the last 32 in their high nibbles. A tile's bytes are contiguous, so a tile-aligned run of rows unpacks on
    its own."""
    half = in_features // 2
    nibbles = packed.reshape(-1, 32)
    codes = torch.cat([nibbles & 0xF, nibbles >> 4], dim=-1)  # (tiles * half, 64): the low half first
    codes = codes.reshape(rows // CPU_PACKED_TILE_ROWS, half, CPU_PACKED_TILE_ROWS, 2)
    return codes.transpose(1, 2).reshape(rows, in_features)


class Bnb4bitWeight(QuantizedWeight):
    """bitsandbytes' 4-bit ``W0`` (NF4 or FP4), ``W[i, j] = code[q[i, j]] * absmax[block of (i, j)]``, in either
    layout:

    - as quantized: two codes per byte in row-major order, one absmax per ``blocksize`` elements of the flattened
      weight (itself 8-bit quantized in blocks of its own with ``compress_statistics``);
    - repacked for the CPU kernel (:func:`is_cpu_packed`): tiles of 32 rows (:func:`unpack_cpu_tiles`), the absmax
      dequantized, rounded to bfloat16 and stored as ``(in / blocksize, out)``. bitsandbytes' own kernel computes with
      that rounded absmax from then on.

    Where bitsandbytes repacks (:attr:`absmax_in_bfloat16`), the absmax is read rounded to bfloat16 in the first
    layout too: ``W0`` is then the same before and after a repack, the weight bitsandbytes' eval kernel uses.
    """

    @property
    def state(self):
        return quant_state_of(self.layer)

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.state.shape)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weight was quantized from (the CPU repacking sets the state's dtype to bfloat16 for its
        kernel and keeps the original aside)."""
        state = self.state
        return state.original_dtype if is_cpu_packed(state) else state.dtype

    @property
    def row_multiple(self) -> int:
        """Whole tiles of the CPU layout; else any number of rows when a row is a whole number of quantization blocks
        (``in % blocksize == 0``, as in every LLaMA-type width); else one block of the whole matrix (bitsandbytes'
        CPU kernel dequantizes such a weight in an order of its own, so a block of rows may not be cut out of it)."""
        if is_cpu_packed(self.state):
            return CPU_PACKED_TILE_ROWS
        return 1 if self.shape[1] % self.state.blocksize == 0 else self.shape[0]

    @property
    def absmax_in_bfloat16(self) -> bool:
        """Whether the absmax is read rounded to bfloat16: once repacked (the repacking stores it so), and, on a CPU
        where bitsandbytes repacks (AVX512-BF16, the weight on the CPU), from the start. Any eval-mode call of the
        base layer repacks it (a ``disable_adapter()`` block, TRL's reference pass, a mixed batch's base rows), so
        the unrounded absmax would make the adapter's outputs depend on the calls made before (0.003 in a tiny
        LLaMA's logits; peft's LoRA, which calls the base layer in every eval forward, always sees the rounded
        one)."""
        return is_cpu_packed(self.state) or (bool(getattr(self.layer, "support_avx512bf16_for_cpu", False))
                                             and self.layer.weight.device.type == "cpu")

    def _absmax(self, first: int, last: int) -> torch.Tensor:
        """The absmax of quantization blocks ``first`` to ``last`` (exclusive). Nested (double quantization): only
        the second-level blocks that cover them are dequantized, not the whole matrix's absmax once per row block
        (for a 70B MLP weight that would cost as much as dequantizing the weight itself)."""
        import bitsandbytes.functional as bnbf

        state = self.state
        if not state.nested:
            return state.absmax[first:last]
        nested = state.state2.blocksize
        start, stop = first // nested, -(-last // nested)  # the second-level blocks covering first..last
        absmax = bnbf.dequantize_blockwise(state.absmax[start * nested: stop * nested],
                                           absmax=state.state2.absmax[start:stop], code=state.state2.code,
                                           blocksize=nested)
        return absmax[first - start * nested: last - start * nested] + state.offset

    def rows(self, s: slice, dtype: torch.dtype) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        state, in_features = self.state, self.shape[1]
        start, stop = s.start, min(s.stop, self.shape[0])
        if is_cpu_packed(state):
            return self._cpu_packed_rows(start, stop, dtype)
        first, last = start * in_features, stop * in_features  # elements of the flattened weight
        absmax = self._absmax(first // state.blocksize, -(-last // state.blocksize))
        if self.absmax_in_bfloat16:
            absmax = absmax.float().to(torch.bfloat16).float()  # as the repacking rounds it
        block = bnbf.QuantState(absmax=absmax,
                                shape=torch.Size([stop - start, in_features]), code=state.code,
                                blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
        # two 4-bit codes per byte, whatever dtype bnb_4bit_quant_storage stores the bytes in (uint8, or bf16 for FSDP)
        packed = self.layer.weight.data.reshape(-1).view(torch.uint8)
        return bnbf.dequantize_4bit(packed[first // 2: last // 2], block).to(dtype)

    def _cpu_packed_rows(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``start:stop`` of a weight in the CPU layout: the tiles that cover them are unpacked (a block that
        does not start on a tile, as a backward after a repack may ask for, reads its whole tiles and cuts)."""
        state, in_features = self.state, self.shape[1]
        tile = CPU_PACKED_TILE_ROWS
        first, last = start // tile * tile, min(-(-stop // tile) * tile, self.shape[0])
        packed = self.layer.weight.data.view(torch.uint8).reshape(self.shape[0], in_features // 2)
        codes = unpack_cpu_tiles(packed[first:last], last - first, in_features)
        absmax = state.absmax[:, first:last].t().float().repeat_interleave(state.blocksize, dim=1)
        # in the quantized dtype first, as bitsandbytes' dequantization of the first layout gives it
        return (state.code[codes.long()] * absmax)[start - first: stop - first].to(self.dtype).to(dtype)

    def watched(self) -> list[torch.Tensor]:
        return [self.layer.weight, self.state.absmax]

    @torch.no_grad()
    def after_state_dict(self) -> None:
        """bitsandbytes (0.50) undoes its CPU repacking in ``Linear4bit``'s ``state_dict()``, so every save of a model
        that ran an eval-mode base call, but leaves a non-nested absmax as the repacking stored it: transposed,
        ``(in / blocksize, out)``, while the codes are back in row-major order. Every reader, bitsandbytes' own
        kernels included, then takes the absmax of one row's blocks from other rows (0.03 off in a 64 x 128 weight,
        outputs off by 5 %). Put it back in the first layout's order (its values stay rounded to bfloat16)."""
        state = self.state
        if state is None or is_cpu_packed(state) or state.nested or state.absmax.dim() != 2:
            return
        state.absmax = state.absmax.t().reshape(-1).float()

    def layout_key(self) -> tuple:
        """The layout (bitsandbytes' CPU repacking changes it in place) and the quantization settings; a nested
        absmax is a tensor of its own."""
        state = self.state
        nested = tensors_key([state.state2.absmax], ()) if state.nested else None
        return (is_cpu_packed(state), state.blocksize, state.quant_type, tuple(state.shape), nested)

    @torch.no_grad()
    def write(self, w: torch.Tensor) -> Optional[float]:
        """Quantize ``w`` again into a new 4-bit weight with the old one's settings (peft's rule for bnb layers), in
        the quantized layout (bitsandbytes repacks it again for its CPU kernel when it needs to)."""
        import bitsandbytes as bnb

        old = self.layer.weight
        settings = {k: v for k, v in old.__dict__.items() if not k.startswith("_") and k not in ("data",)}
        settings.update(requires_grad=False, bnb_quantized=False)
        settings.pop("quant_state", None)
        self.layer.weight = bnb.nn.Params4bit(w.to(self.dtype).to("cpu"), **settings).to(old.device)
        return _relative_error(self.full(), w)


class Bnb8bitWeight(QuantizedWeight):
    """bitsandbytes' LLM.int8() ``W0``: int8 rows, each with its absolute maximum ``SCB`` (``W = W8 * SCB / 127``).
    The layer's first forward moves ``SCB`` from the weight into the layer's matmul state, so both are read."""

    @property
    def shape(self) -> torch.Size:
        return self.layer.weight.shape  # int8, (out, in)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float16  # what bitsandbytes' int8 layers compute in

    def scales(self) -> torch.Tensor:
        scb = getattr(self.layer.weight, "SCB", None)  # a plain Parameter where FSDP replaced the Int8Params
        return self.layer.state.SCB if scb is None else scb

    def rows(self, s: slice, dtype: torch.dtype) -> torch.Tensor:
        return (self.layer.weight.data[s].float() * (self.scales()[s].float() / 127).unsqueeze(1)).to(dtype)

    def watched(self) -> list[torch.Tensor]:
        return [self.layer.weight, self.scales()]

    def snapshot(self):
        return self.layer.weight, self.scales()

    def restore(self, snapshot) -> None:
        weight, scales = snapshot
        self.layer.weight = weight
        self.layer.state.reset_grads()
        # as bitsandbytes' own first forward leaves it (Linear8bitLt.init_8bit_state): the int8 rows and their
        # scales in the matmul state, none on the weight
        self.layer.state.CB, self.layer.state.SCB = weight.data, scales
        weight.CB = weight.SCB = None

    @torch.no_grad()
    def write(self, w: torch.Tensor) -> Optional[float]:
        """Quantize ``w`` again, row by row (peft's rule for bnb layers)."""
        import bitsandbytes as bnb

        old = self.layer.weight
        self.layer.weight = bnb.nn.Int8Params(w.to(torch.float16).to("cpu"), requires_grad=False,
                                              has_fp16_weights=old.has_fp16_weights).to(old.device)
        self.layer.state.reset_grads()  # the matmul state still holds the old int8 rows
        return _relative_error(self.full(), w)


def _relative_error(got: torch.Tensor, wanted: torch.Tensor) -> float:
    return ((got.float() - wanted.float()).abs().max() / wanted.float().abs().max().clamp_min(1e-30)).item()


def bitsandbytes_kind(layer: nn.Module) -> Optional[str]:
    """"Linear4bit" or "Linear8bitLt" for bitsandbytes' layers and their subclasses (LinearNF4, LinearFP4), else
    None; bitsandbytes itself is not imported."""
    return next((cls.__name__ for cls in type(layer).__mro__
                 if cls.__module__.startswith("bitsandbytes") and cls.__name__ in QUANTIZED_LAYER_NAMES), None)


def base_weight_of(layer: nn.Module) -> BaseWeight:
    """The reader of a base layer's ``W0``; a quantized layer must be one of bitsandbytes' (checked before)."""
    name = bitsandbytes_kind(layer)
    if name is not None:
        check_bitsandbytes(layer)
        weight = layer.weight
        if name == "Linear8bitLt" and getattr(weight, "has_fp16_weights", False):
            raise ValueError("A Linear8bitLt with has_fp16_weights=True trains its own fp16 weight and quantizes it "
                             "on every call, so it has no frozen W0 to adapt: load the base with load_in_8bit=True "
                             "and the default has_fp16_weights=False.")
        quantized = (quant_state_of(layer) if name == "Linear4bit"
                     else Bnb8bitWeight(layer).scales())
        if quantized is None:
            raise ValueError(f"The {type(layer).__name__} has not been quantized yet (bitsandbytes quantizes when the "
                             "layer moves to its device): load the model with quantization_config, or call "
                             ".to(device) first.")
        return Bnb4bitWeight(layer) if name == "Linear4bit" else Bnb8bitWeight(layer)
    return BaseWeight(layer)


def check_bitsandbytes(layer: nn.Module) -> None:
    """A bitsandbytes release older than the one whose backends these layers need fails loudly, not inside a kernel."""
    version = _bitsandbytes_version()
    if version < Version(MIN_BITSANDBYTES):
        raise ImportError(
            f"bitsandbytes {version} is too old for Dual LoRA / D2-LoRA on a quantized {type(layer).__name__}: the "
            f"row-block dequantization needs the backends of bitsandbytes >= {MIN_BITSANDBYTES} (CPU included). "
            f"Upgrade it: pip install 'bitsandbytes>={MIN_BITSANDBYTES}' (or pip install 'duallora[quantized]')."
        )


@functools.cache  # read once: base_weight_of runs on every forward
def _bitsandbytes_version() -> Version:
    import bitsandbytes

    return Version(bitsandbytes.__version__)

"""``W0`` as the adapted layers read it: a dense weight (``nn.Linear``, GPT-2's ``Conv1D``) or a quantized one
(bitsandbytes' 4-bit ``Linear4bit`` and 8-bit ``Linear8bitLt``), always as ``(out, in)`` and, where the memory
bound asks, one block of output rows at a time.

In the memory-efficient forward and backward a quantized ``W0`` is never dequantized whole: bitsandbytes quantizes the flattened
weight in blocks of ``blocksize`` elements (4-bit, each with its own absmax) or per row (8-bit, one scale per
row), so a block of output rows dequantizes on its own as long as it does not split a quantization block. Merges
dequantize whole (in float32), as peft does for LoRA on these layers, and write back by quantizing again.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from packaging.version import Version
from torch import nn
from transformers.pytorch_utils import Conv1D

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
        input to the compiled D2 reduction gave wrong results in torch 2.13)."""
        return self.tensor[s].to(dtype).contiguous()

    def full(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All of ``W0`` in ``dtype`` (merges, inspection)."""
        return self.tensor.to(dtype)

    def whole(self, dtype: torch.dtype) -> torch.Tensor:
        """``W0`` whole as the plain-autograd reference path uses it: the live tensor when dense (autograd can reach
        it), dequantized to ``dtype`` when quantized (frozen)."""
        return self.full(dtype) if self.quantized else self.tensor


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
    def device(self) -> torch.device:
        return self.layer.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype a merged weight is written in."""
        return self.layer.weight.dtype

    def watched(self) -> list[torch.Tensor]:
        """What ``W0``'s values live in (the eval cache fingerprints it, the sharding check reads it)."""
        return [self.layer.weight]

    def snapshot(self) -> Optional[nn.Parameter]:
        """What a merge keeps so that unmerge can put ``W0`` back exactly: nothing for a dense weight (unmerge inverts
        the merge arithmetically, within float32 rounding)."""
        return None

    @torch.no_grad()
    def write(self, w: torch.Tensor) -> Optional[float]:
        """Make ``W0`` equal ``w`` (a merge); the largest rounding error relative to ``w``'s largest value (None:
        exact up to the weight's dtype)."""
        # copy_ in place: the Parameter keeps its storage, so tied weights and optimizer references stay valid
        self.layer.weight.data.copy_(w.t() if isinstance(self.layer, Conv1D) else w)
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


class Bnb4bitWeight(QuantizedWeight):
    """bitsandbytes' 4-bit ``W0`` (NF4 or FP4): packed bytes, one absmax per ``blocksize`` elements of the flattened
    weight (itself 8-bit quantized in blocks of its own with ``compress_statistics``)."""

    @property
    def state(self):
        return self.layer.weight.quant_state

    @property
    def shape(self) -> torch.Size:
        return torch.Size(self.state.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.state.dtype

    @property
    def row_multiple(self) -> int:
        """Any number of rows when a row is a whole number of quantization blocks (``in % blocksize == 0``, as in
        every LLaMA-type width); else one block of the whole matrix (bitsandbytes' CPU kernel dequantizes such a
        weight in an order of its own, so a block of rows may not be cut out of it)."""
        return 1 if self.shape[1] % self.state.blocksize == 0 else self.shape[0]

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
        first, last = start * in_features, stop * in_features  # elements of the flattened weight
        block = bnbf.QuantState(absmax=self._absmax(first // state.blocksize, -(-last // state.blocksize)),
                                shape=torch.Size([stop - start, in_features]), code=state.code,
                                blocksize=state.blocksize, quant_type=state.quant_type, dtype=state.dtype)
        # two 4-bit codes per byte, whatever dtype bnb_4bit_quant_storage stores the bytes in (uint8, or bf16 for FSDP)
        packed = self.layer.weight.data.reshape(-1).view(torch.uint8)
        return bnbf.dequantize_4bit(packed[first // 2: last // 2], block).to(dtype)

    def watched(self) -> list[torch.Tensor]:
        return [self.layer.weight, self.state.absmax]

    @torch.no_grad()
    def write(self, w: torch.Tensor) -> Optional[float]:
        """Quantize ``w`` again into a new 4-bit weight with the old one's settings (peft's rule for bnb layers)."""
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
        scb = self.layer.weight.SCB
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
            raise ValueError("A Linear8bitLt with has_fp16_weights=True trains its own fp16 weight and quantizes it on "
                             "every call, so it has no frozen W0 to adapt: load the base with load_in_8bit=True and "
                             "the default has_fp16_weights=False.")
        quantized = (weight.quant_state if name == "Linear4bit"
                     else weight.SCB if weight.SCB is not None else layer.state.SCB)
        if quantized is None:
            raise ValueError(f"The {type(layer).__name__} has not been quantized yet (bitsandbytes quantizes when the layer moves to "
                             "its device): load the model with quantization_config, or call .to(device) first.")
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

"""Mixed batches (peft's ``adapter_names``): each row of a batch through its own adapter, or the base model.

The model-level checks (names known, one per batch row, not while training) live in the tuner's
``_enable_peft_forward_hooks``; a layer groups its rows by adapter and runs one pass per group.

A layer does not always see one input row per batch row. Its input is laid out one of three ways:

- ``rows``: one unit per batch row, ``(batch, seq, hidden)`` (attention and MLP Linears);
- ``tokens``: one unit per token, row-major, ``(batch * seq, hidden)`` (what MoE blocks hand their router, shared
  experts and expert stacks: Mixtral, Qwen2/3-MoE, OLMoE, gpt-oss);
- ``expert-major``: one unit per expert and token, ``(experts * batch * seq, hidden)`` (Llama-4's experts, which see
  every token once per expert, ``hidden.repeat(experts, 1)``).

Which one is told from the unit count, the batch and the number of tokens of the model's current input (the tuner
records it at every forward, each generate step included). A count that fits none (a Linear that receives only the
tokens routed to it) is refused, never guessed.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch

from .factor import run_inside

# peft's name for "no adapter" in a mixed batch's adapter_names
BASE_ROWS = "__base__"


class RowAdapters(list):
    """``adapter_names`` as the layers receive them: one name per batch row, and ``tokens``, the number of tokens of
    the model's current input (None when the model's input named neither ``input_ids`` nor ``inputs_embeds``)."""

    tokens: Optional[int] = None


def input_layout(units: int, rows: int, tokens: Optional[int], experts: int) -> Optional[str]:
    """How ``units`` input units map to ``rows`` batch rows: ``"rows"``, ``"tokens"``, ``"expert-major"`` (see the
    module's docstring), or None when no layout fits."""
    if units == rows:
        return "rows"
    if tokens is not None and tokens % rows == 0:
        if units == tokens:
            return "tokens"
        if experts > 1 and units == experts * tokens:
            return "expert-major"
    return None


def units_of_rows(group: list[int], layout: str, units: int, rows: int, experts: int,
                  device: torch.device) -> torch.Tensor:
    """The indices, along the input's first dimension, of the units that belong to the batch rows ``group`` (in
    the order the layer expects them: an expert-major part stays expert-major)."""
    index = torch.tensor(group, device=device)
    if layout == "rows":
        return index
    tokens = units // experts if layout == "expert-major" else units
    per_row = tokens // rows
    token_index = (index[:, None] * per_row + torch.arange(per_row, device=device)).flatten()
    if layout == "tokens":
        return token_index
    return (torch.arange(experts, device=device)[:, None] * tokens + token_index).flatten()


def layout_error(where: str, units: int, adapter_names: list[str], experts: int) -> ValueError:
    """Why a layer's input cannot be split by batch row, and what to do instead."""
    rows, tokens = len(adapter_names), getattr(adapter_names, "tokens", None)
    seen = (f"the model's input holds {tokens} tokens in {rows} rows" if tokens is not None
            else "the model's input named neither input_ids nor inputs_embeds, so its token count is unknown")
    expected = f"{rows} (one per row) or {tokens} (one per token)" if tokens is not None else f"{rows} (one per row)"
    if tokens is not None and experts > 1:
        expected += f" or {experts * tokens} (one per expert and token)"
    return ValueError(
        f"Mixed-batch inference through {where}: it received {units} input rows, while {seen}. Expected {expected}: "
        "its input cannot be assigned to the batch rows (a layer that receives only the tokens routed to it, or "
        "another layout). Run each adapter's rows as a batch of its own (model.set_adapter(name)), or leave this "
        "module out of the adapter."
    )


def grouped_rows(adapter_names: list[str], held) -> dict[str, list[int]]:
    """The batch rows per adapter, ``BASE_ROWS`` first; a name for which ``held(name)`` is false runs the base."""
    groups: dict[str, list[int]] = {BASE_ROWS: []}
    for row, name in enumerate(adapter_names):
        groups.setdefault(name if held(name) else BASE_ROWS, []).append(row)
    return {name: rows for name, rows in groups.items() if rows}


def scattered(outputs: list[tuple[torch.Tensor, Any]], units: int):
    """The outputs of the per-adapter runs put back in input order (a tensor, or a tuple of them: a router's)."""
    first = outputs[0][1]
    if isinstance(first, (tuple, list)):
        return type(first)(scattered([(index, y[k]) for index, y in outputs], units) for k in range(len(first)))
    if not isinstance(first, torch.Tensor) or any(y.shape[0] != len(index) for index, y in outputs):
        raise ValueError("Mixed-batch inference: the adapted module returned something that is not one row per "
                         "input row, which cannot be put back per adapter. Run each adapter's rows separately.")
    dtype = functools.reduce(torch.promote_types, [y.dtype for _, y in outputs])
    result = first.new_empty((units, *first.shape[1:]), dtype=dtype)
    for index, y in outputs:
        result[index] = y.to(dtype)
    return result


class MixedBatchForward:
    """The mixed-batch forward of :class:`~duallora.core.layer.AdaptedLayer` (a Linear or Conv1D)."""

    def _check_mixed_batch(self, x: torch.Tensor, adapter_names: list[str]) -> None:
        """peft's checks of ``adapter_names`` at a layer, with its messages, and that the input splits by row."""
        if self.merged:
            raise ValueError("Cannot pass `adapter_names` when there are merged adapters, please call "
                             "`unmerge_adapter` first.")
        self._input_layout(len(x), adapter_names, experts=1)

    def _input_layout(self, units: int, adapter_names: list[str], experts: int) -> str:
        layout = input_layout(units, len(adapter_names), getattr(adapter_names, "tokens", None), experts)
        if layout is None:
            raise layout_error(self._base_description(), units, adapter_names, experts)
        return layout

    def _mixed_batch_forward(self, x: torch.Tensor, adapter_names: list[str], *args: Any, **kwargs: Any
                             ) -> torch.Tensor:
        """Each row of the batch through its own adapter (peft's ``adapter_names``). The rows are grouped, so the
        cost is one pass per distinct adapter, each building its weight in row blocks as a training forward does (no
        cached copy per adapter: k adapters would hold k dense copies of every layer). Rows named ``"__base__"``, or
        an adapter this layer does not hold, go through the base layer."""
        present = getattr(self, self.adapter_layer_names[0])
        units, rows = len(x), len(adapter_names)
        layout = self._input_layout(units, adapter_names, experts=1)
        outputs = []
        for name, group in grouped_rows(adapter_names, lambda n: n in present).items():
            index = units_of_rows(group, layout, units, rows, 1, x.device)
            part = x[index]
            if name == BASE_ROWS:
                outputs.append((index, self.base_layer(part, *args, **kwargs)))
                continue
            self._check_base_is_whole()
            self.before_adapter_forward([name], part)
            outputs.append((index, run_inside(self.factor_modules(name),
                                              lambda: self._adapted_forward([name], part, use_cache=False))))
        return scattered(outputs, units)

"""Fusing the elementwise work of the memory-efficient backward with ``torch.compile``.

Building ``W = W0 + coef * m(P) * d(Q)`` and the two branch gradients takes a dozen elementwise passes over
``out x in`` matrices in eager PyTorch, each a round trip through memory; compiled, each becomes one loop that
reads its inputs once (see the one-layer benchmark in docs/performance.md). The functions
compiled are the pure ones in ``dual/maths.py`` and ``d2/maths.py``, so eager and compiled compute the same maths.

``DUALLORA_COMPILE=0`` turns it off. Where compiling fails (no C++ compiler, an unsupported platform) the first
call warns once and everything runs eagerly from then on. Only a compiler failure does that: an error of the
compiler's own family (``torch._dynamo``'s exceptions, Inductor's included) after which the same call succeeds
eagerly. Anything else, an out-of-memory error above all, reaches the caller and fusion stays on. Inside a model
that is itself being compiled, the eager function is called and the outer compile fuses it.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch._dynamo.exc import TorchDynamoException

_disabled = os.environ.get("DUALLORA_COMPILE", "1") == "0"


def fused(fn: Callable) -> Callable:
    """``fn`` compiled on first use (dynamic shapes: one compile serves every layer size), else ``fn`` itself."""
    compiled: list[Callable] = []

    def call(*args):
        global _disabled
        if _disabled or torch.compiler.is_compiling():
            return fn(*args)
        if not compiled:
            compiled.append(torch.compile(fn, dynamic=True))
        try:
            return compiled[0](*args)
        except TorchDynamoException as err:
            if _caused_by_out_of_memory(err):
                raise  # memory, not the compiler: the caller must see it (and the next call may fit)
            result = fn(*args)  # raises here if the inputs, not the compiler, were at fault; fusion then stays on
            _disabled = True
            warnings.warn(f"duallora: torch.compile of {fn.__name__} failed ({_first_cause(err)}); running "
                          "the elementwise work eagerly (slower, same results). Set DUALLORA_COMPILE=0 to skip it.")
            return result

    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call


def _caused_by_out_of_memory(err: BaseException) -> bool:
    """Whether an out-of-memory error is anywhere in ``err``'s chain (the compiler wraps what it meets)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, torch.OutOfMemoryError):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__ or getattr(err, "inner_exception", None)
    return False


def _first_cause(err: BaseException) -> str:
    """The innermost error the compiler wrapped, on one line (dynamo's own text adds debugging advice)."""
    inner = getattr(err, "inner_exception", None) or err
    text = next((line for line in str(inner).splitlines() if line.strip()), "")
    return f"{type(inner).__name__}: {text}"

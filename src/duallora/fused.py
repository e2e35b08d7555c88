"""Fusing the elementwise work of the memory-efficient backward with ``torch.compile``.

Building ``W = W0 + coef * m(P) * d(Q)`` and the two branch gradients takes a dozen elementwise passes over
``out x in`` matrices in eager PyTorch, each a round trip through memory; compiled, each becomes one loop that
reads its inputs once (see the one-layer benchmark in the README). The functions
compiled are the pure ones in :mod:`duallora.functional`, so eager and compiled compute the same maths.

``DUALLORA_COMPILE=0`` turns it off. Where compiling fails (no C++ compiler, an unsupported platform) the first
call warns once and everything runs eagerly from then on. Inside a model that is itself being compiled, the eager
function is called and the outer compile fuses it.
"""

from __future__ import annotations

import os
import warnings
from typing import Callable

import torch

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
        except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, the maths is the same
            _disabled = True
            warnings.warn(f"duallora: torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); running "
                          "the elementwise work eagerly (slower, same results). Set DUALLORA_COMPILE=0 to skip it.")
            return fn(*args)

    call.__name__ = fn.__name__
    call.__doc__ = fn.__doc__
    return call

"""Export a Dual LoRA or D2-LoRA adapter as a plain peft LoRA adapter, for servers that load only LoRA (vLLM, TGI,
LoRAX): the truncated-SVD conversion of ``peft.convert_to_lora``, with the error it makes measured per layer.

The best rank-``K`` approximation of ``dW`` in the Frobenius norm is its truncated SVD (Eckart-Young):
``dW_K = U_K S_K V_K^T``, written as LoRA's ``B = U_K S_K``, ``A = V_K^T`` at ``lora_alpha = r = K`` (scale 1).
Its relative error is ``||dW - dW_K||_F / ||dW||_F = sqrt(sum_{i > K} s_i^2 / sum_i s_i^2)``. Dual LoRA's ``dW`` is
full rank by design (``ReLU(BA) * Sign(DC)`` is not bounded by ``r``), so a LoRA export of it loses what lies past
its ``K`` leading singular directions: this module says how much, layer by layer.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from transformers.pytorch_utils import Conv1D

from .atomic import atomic_dir
from .layer import AdaptedLayer
from .param_wrapper import AdaptedParameter
from .parameter_targets import unwrapped_name

PEFT_PREFIX = "base_model.model."


def _adapted_layers(model) -> dict[str, AdaptedLayer]:
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AdaptedLayer)}
    if not layers:
        raise TypeError(f"{type(model).__name__} holds no Dual LoRA or D2-LoRA layer to export: pass the peft model "
                        "returned by get_peft_model or PeftModel.from_pretrained with a DualLoraConfig or "
                        "D2LoraConfig adapter.")
    return layers


def _check_rank(rank: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a whole number >= 1 (the LoRA rank K of every layer); got {rank!r}.")


def truncated_svd_factors(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA's ``(A, B)`` of the best rank-``rank`` approximation of ``delta`` (out, in) in the Frobenius norm, at
    scale 1: ``B = U_K S_K`` (out, K), ``A = V_K^T`` (K, in), from the SVD in float32 (the rank is capped at
    ``min(out, in)``, where it is exact). A stack ``(experts, out, in)`` gives stacks, one SVD per expert."""
    u, s, vh = torch.linalg.svd(delta.float(), full_matrices=False)
    k = min(rank, s.shape[-1])
    return vh[..., :k, :].contiguous(), (u[..., :k] * s[..., None, :k]).contiguous()


def peft_expert_factors(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert ``A (experts, K, in)``, ``B (experts, out, K)`` in the layout of peft's LoRA ``ParamWrapper``:
    ``lora_A`` is ``(experts * K, in)``, expert-major; ``lora_B`` is ``(out, K * experts)``, expert-minor (peft
    reads ``lora_B.reshape(out, K, experts)``)."""
    return a.reshape(-1, a.shape[-1]), b.permute(1, 2, 0).reshape(b.shape[1], -1)


def expert_factors_from_peft(lora_a: torch.Tensor, lora_b: torch.Tensor, experts: int):
    """The inverse of :func:`peft_expert_factors`."""
    rank = lora_a.shape[0] // experts
    return lora_a.reshape(experts, rank, -1), lora_b.reshape(lora_b.shape[0], rank, experts).permute(2, 0, 1)


@torch.no_grad()
def layer_errors(model, state_dict: dict[str, torch.Tensor], adapter_name: str = "default") -> list[dict]:
    """Per adapted layer, the relative Frobenius error ``||dW - B A||_F / ||dW||_F`` of the exported factors against
    the adapter's own ``dW``, and ``||dW||_F`` (to weigh the layers). Computed from the factors as written, so it
    also checks the conversion itself."""
    rows = []
    for name, layer in _adapted_layers(model).items():
        key = name.removeprefix(PEFT_PREFIX)
        delta = layer.delta_weight(adapter_name)
        lora_a = state_dict[f"{PEFT_PREFIX}{key}.lora_A.weight"].float()
        lora_b = state_dict[f"{PEFT_PREFIX}{key}.lora_B.weight"].float()
        label = key
        if isinstance(layer, AdaptedParameter):
            label = f"{unwrapped_name(key)}.{layer.parameter_name}"
            if delta.dim() == 3:  # each expert's error on a row of its own
                lora_a, lora_b = expert_factors_from_peft(lora_a, lora_b, delta.shape[0])
                rows += [_error_row(f"{label}[{e}]", delta[e], lora_a[e], lora_b[e]) for e in range(delta.shape[0])]
                continue
        rows.append(_error_row(label, delta, lora_a, lora_b))
    return rows


def _error_row(label: str, delta: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor) -> dict:
    norm = delta.norm().item()
    error = (delta - lora_b @ lora_a).norm().item()
    return {"layer": label, "shape": list(delta.shape), "rank": lora_a.shape[0], "norm_dW": norm,
            "relative_error": error / norm if norm else 0.0}


def total_error(rows: list[dict]) -> float:
    """The relative Frobenius error of all layers' updates taken together: ``sqrt(sum e_l^2 ||dW_l||^2 /
    sum ||dW_l||^2)``."""
    total = sum(r["norm_dW"] ** 2 for r in rows)
    return math.sqrt(sum((r["relative_error"] * r["norm_dW"]) ** 2 for r in rows) / total) if total else 0.0


@torch.no_grad()
def convert_to_lora(model, rank: int, adapter_name: str = "default", progressbar: bool = False):
    """peft's ``convert_to_lora`` with the same arguments, returning ``(lora_config, state_dict, errors)``: the
    adapter ``adapter_name`` of a peft model as a LoRA adapter of rank ``rank`` (each layer's truncated SVD of its
    ``dW``, ``lora_alpha = r``), its task type, base model and ``modules_to_save`` (a classification head, copied as
    it is) carried over, and :func:`layer_errors` of the result.

    A layer narrower than ``rank`` gets its full rank ``min(out, in)`` (exact there; ``rank_pattern`` says so),
    where peft's ``convert_to_lora`` refuses the whole model (SmolLM2's 192-wide key and value projections refuse
    K = 256): otherwise the conversion is peft's, and peft's own ``convert_to_lora`` also accepts our layers
    (:meth:`AdaptedLayer.supports_lora_conversion`)."""
    from peft import LoraConfig, get_peft_model_state_dict
    from tqdm import tqdm

    layers = _adapted_layers(model)
    _check_rank(rank)
    if any(layer.merged for layer in layers.values()):
        raise ValueError("The adapter is merged into the base weights: unmerge it first (model.unmerge_adapter()), "
                         "or the LoRA export would be added to a base that already holds it.")
    if adapter_name not in model.peft_config:
        raise ValueError(f"No adapter named {adapter_name!r} to export; the model holds {sorted(model.peft_config)}.")
    source = model.peft_config[adapter_name]
    # what the adapter file holds beside the factors: the modules_to_save weights, in peft's saved format
    prefixes = tuple(layer.prefix for layer in layers.values())
    state_dict = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model, adapter_name=adapter_name).items()
                  if not any(p in k for p in prefixes)}
    ranks, parameters = {}, set()
    for name, layer in tqdm(layers.items(), desc="Converting to LoRA", disable=not progressbar):
        key = name.removeprefix(PEFT_PREFIX)
        lora_a, lora_b = truncated_svd_factors(layer.delta_weight(adapter_name), rank)
        target = key
        if isinstance(layer, AdaptedParameter):  # peft's target_parameters: the parameter's key, nested as ours
            target = f"{unwrapped_name(key)}.{layer.parameter_name}"
            parameters.add(target)
            if lora_a.dim() == 3:
                lora_a, lora_b = peft_expert_factors(lora_a, lora_b)
        # peft's LoRA keeps A (K, in) and B (out, K) on a Conv1D too: fan_in_fan_out transposes B A there
        dtype = layer.factors(adapter_name)[0].dtype  # the adapter's own precision
        state_dict[f"{PEFT_PREFIX}{key}.lora_A.weight"] = lora_a.to(dtype)
        state_dict[f"{PEFT_PREFIX}{key}.lora_B.weight"] = lora_b.to(dtype)
        ranks[target] = min(rank, *layer.base.shape[-2:])
    # r is the largest rank written (servers size their LoRA slots by it: vLLM's --max-lora-rank), never more
    written = max(ranks.values())
    if written < rank:
        warnings.warn(f"rank={rank} exceeds every layer's full rank min(out, in): each layer is exported at its full "
                      f"rank (exact), and the adapter's r is {written}, the largest of them.", UserWarning,
                      stacklevel=3)
    capped = {key: k for key, k in ranks.items() if k != written}
    fan_in_fan_out = any(isinstance(layer.get_base_layer(), Conv1D) for layer in layers.values())
    lora_config = LoraConfig(r=written, lora_alpha=written, target_modules=sorted(set(ranks) - parameters),
                             target_parameters=sorted(parameters) or None, rank_pattern=capped,
                             alpha_pattern=capped, lora_dropout=source.lora_dropout, fan_in_fan_out=fan_in_fan_out,
                             modules_to_save=source.modules_to_save, task_type=source.task_type,
                             base_model_name_or_path=source.base_model_name_or_path, revision=source.revision)
    return lora_config, state_dict, layer_errors(model, state_dict, adapter_name)


def save_as_lora(path: str | Path, model, rank: int, adapter_name: str = "default", progressbar: bool = False
                 ) -> list[dict]:
    """peft's ``save_as_lora`` with the same arguments, written safely, returning the errors: write
    :func:`convert_to_lora`'s adapter to ``path`` (``adapter_config.json`` and
    ``adapter_model.safetensors``, loadable by ``PeftModel.from_pretrained`` without duallora installed) and return
    its per-layer errors. The directory is written under a temporary name and renamed into place: a failure leaves
    what was at ``path`` untouched."""
    from safetensors.torch import save_file

    lora_config, state_dict, errors = convert_to_lora(model, rank, adapter_name, progressbar)

    def write(directory: Path) -> None:
        save_file({k: v.contiguous() for k, v in state_dict.items()}, directory / "adapter_model.safetensors")
        lora_config.save_pretrained(str(directory))

    atomic_dir(Path(path), write)
    return errors

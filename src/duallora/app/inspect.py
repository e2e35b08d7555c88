"""Rank analysis of a trained adapter (the papers' rank figure): per adapted layer, the numerical rank of dW and,
for Dual LoRA, of its magnitude and direction parts, against LoRA's bound r; the fraction of entries that ReLU
switches off; the norms of dW and W0."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..dual.layer import DualLoraLayer
from ..dual.maths import direction, magnitude
from ..core.layer import AdaptedLayer
from ..core.param_wrapper import AdaptedParameter
from ..core.precision import factor_product
from ..core.parameter_targets import unwrapped_name


def numerical_rank(matrix: torch.Tensor) -> int:
    """Singular values above ``max(shape) * eps * s_max`` (the rule of ``torch.linalg.matrix_rank``), with ``eps`` of
    the dtype the matrix was computed in: the SVD runs in float64, but a float32 product's rounding noise would count
    as rank against float64's eps (a rank-16 LoRA update came out at 576)."""
    rtol = max(matrix.shape) * torch.finfo(matrix.dtype).eps
    return int(torch.linalg.matrix_rank(matrix.double(), rtol=rtol).item())


@torch.no_grad()
def layer_reports(name: str, layer: AdaptedLayer, adapter: str) -> list[dict]:
    """One row per adapted matrix: the layer's, or each expert's of a stack (``name.parameter[e]``)."""
    dw = layer.delta_weight(adapter)
    w0 = layer.base_weight().float()
    factors = [t.float() for t in layer.factors(adapter)]
    if isinstance(layer, AdaptedParameter):
        name = f"{unwrapped_name(name)}.{layer.parameter_name}"
    if dw.dim() == 2:
        return [matrix_report(name, layer, adapter, dw, w0, factors)]
    return [matrix_report(f"{name}[{e}]", layer, adapter, dw[e], w0[e], [f[e] for f in factors])
            for e in range(dw.shape[0])]


def matrix_report(name: str, layer: AdaptedLayer, adapter: str, dw, w0, factors) -> dict:
    row = {"layer": name, "shape": list(dw.shape), "rank_dW": numerical_rank(dw), "norm_dW": dw.norm().item(),
           "norm_W0": w0.norm().item(), "relative_norm": (dw.norm() / w0.norm()).item()}
    if isinstance(layer, DualLoraLayer):
        opts = layer.dual_options[adapter]
        A, B, C, D = factors
        p = factor_product(B, A)
        row.update(lora_bound=opts.r1 + opts.r2, r1=opts.r1, r2=opts.r2,
                   rank_magnitude=numerical_rank(magnitude(p, opts.magnitude_activation)),
                   rank_direction=numerical_rank(direction(factor_product(D, C), opts.direction_activation)),
                   relu_off_fraction=(p <= 0).float().mean().item(), warmup_step=int(layer.dual_lora_step[adapter]))
    else:
        row["lora_bound"] = 2 * factors[0].shape[-1]
    return row


def inspect_model(model, adapter: str = "default") -> list[dict]:
    return [row for name, m in model.named_modules() if isinstance(m, AdaptedLayer)
            for row in layer_reports(name, m, adapter)]


def inspect_peft(model, adapter: str = "default") -> list[dict]:
    """The same report for peft's LoRA (LoRA+, DoRA: rank of dW bounded by r) and HiRA (``dW = W0 * (B A)``: not
    bounded by r) layers, for comparison. ``W0`` is dequantized on a 4-bit or 8-bit base (its packed bytes are no
    weight)."""
    from peft.tuners.hira import HiraLayer
    from peft.tuners.lora import LoraLayer
    from peft.utils.integrations import dequantize_module_weight

    rows = []
    for name, m in model.named_modules():
        if isinstance(m, (LoraLayer, HiraLayer)) and adapter in m.r:
            with torch.no_grad():
                if hasattr(m, "parameter_name"):  # peft's ParamWrapper (target_parameters): a matrix or a stack
                    w0, dw = m.get_param().float(), m.get_delta_weight(adapter).float()
                    name = f"{unwrapped_name(name)}.{m.parameter_name}"
                else:
                    w0 = dequantize_module_weight(m.get_base_layer()).float()
                    dw = m.get_delta_weight(adapter).float()
                if isinstance(m, HiraLayer):  # peft's HiRA gives B A there: its merge multiplies it by W0
                    dw = w0 * dw
            matrices = [(name, w0, dw)] if dw.dim() == 2 else [(f"{name}[{e}]", w0[e], dw[e])
                                                                 for e in range(dw.shape[0])]
            rows += [{"layer": label, "shape": list(d.shape), "rank_dW": numerical_rank(d), "norm_dW": d.norm().item(),
                      "norm_W0": w.norm().item(), "relative_norm": (d.norm() / w.norm()).item(),
                      "lora_bound": m.r[adapter]} for label, w, d in matrices]
    return rows


def markdown(rows: list[dict]) -> str:
    dual = "rank_magnitude" in rows[0]
    head = "| layer | shape | rank dW | LoRA bound r |"
    head += " rank ReLU(BA) | rank Sign(DC) | ReLU off |" if dual else ""
    head += " norm dW / norm W0 |"
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        line = f"| {r['layer']} | {r['shape'][0]}x{r['shape'][1]} | {r['rank_dW']} | {r['lora_bound']} |"
        if dual:
            line += f" {r['rank_magnitude']} | {r['rank_direction']} | {r['relu_off_fraction']:.2f} |"
        lines.append(line + f" {r['relative_norm']:.4f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path, title: str) -> None:
    """Numerical rank per layer against LoRA's bound, like the paper's rank figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 0.25 * len(rows) + 3), 4))
    ax.plot(x, [r["rank_dW"] for r in rows], "o-", label="rank of dW")
    if "rank_magnitude" in rows[0]:
        ax.plot(x, [r["rank_magnitude"] for r in rows], "s--", label="rank of ReLU(BA)", alpha=0.7)
        ax.plot(x, [r["rank_direction"] for r in rows], "^--", label="rank of Sign(DC)", alpha=0.7)
    ax.plot(x, [r["lora_bound"] for r in rows], "k:", label="LoRA's bound (r)")
    ax.plot(x, [min(r["shape"]) for r in rows], color="gray", linewidth=0.8, label="full rank min(out, in)")
    ax.set_yscale("log")
    ax.set_xlabel("adapted layer (model order)")
    ax.set_ylabel("numerical rank")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def inspect_run(run_dir: str | Path, output_dir: str | Path | None = None) -> list[dict]:
    """Load a trained run, write ``inspect.json``, ``inspect.md`` and ``inspect.png`` next to it (or to
    ``output_dir``), and return the rows."""
    from .train import load_trained

    model, _, _, cfg = load_trained(run_dir)
    if cfg.method == "full":
        raise ValueError(f"{run_dir} is a full fine-tuning run: there is no adapter to inspect.")
    rows = inspect_model(model) or inspect_peft(model)
    out = Path(output_dir or run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "inspect.json").write_text(json.dumps(rows, indent=1))
    (out / "inspect.md").write_text(markdown(rows))
    plot(rows, out / "inspect.png", f"{cfg.method} r={cfg.r} on {cfg.model} / {cfg.task}")
    return rows

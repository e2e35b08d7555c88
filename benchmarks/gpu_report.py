"""The record half of ``gpu_check.py``: which targets hold, why a missed one is missed (FLOP and byte counts from
``gpu_speed.layer_costs``), and the markdown of the whole run."""

from __future__ import annotations

from collections import defaultdict

from gpu_speed import MODELS, RANK, layer_costs

# (method, metric, baseline, bound): the ratio method / baseline must not exceed the bound
STEP_TARGETS = [("dual", "step_seconds", "lora", 1.3), ("dual", "peak_mib", "lora", 1.0)] + [
    (method, metric, other, 1.0) for method in ("dual", "d2") for other in ("dora", "hira")
    for metric in ("step_seconds", "peak_mib")]
METRIC_NAMES = {"step_seconds": "step time", "peak_mib": "peak memory"}
HBM_BYTES_PER_S = 3.35e12  # an H100 SXM's memory bandwidth, for the byte counts' time


def model_costs(model: str, tokens: int, seq: int) -> dict:
    """A training step's FLOPs of the frozen base (forward and input gradients of every linear layer, attention,
    the head), and the adapters' extra FLOPs and out x in bytes, summed over the adapted layers."""
    hidden, mlp, layers, heads, kv, vocab = MODELS[model]
    head_dim = hidden // heads
    shapes = [(hidden, hidden), (kv * head_dim, hidden), (kv * head_dim, hidden), (hidden, hidden),
              (mlp, hidden), (mlp, hidden), (hidden, mlp)]  # q, k, v, o, gate, up, down: (out, in)
    per_layer = [layer_costs(o, i, tokens) for o, i in shapes]
    total = {key: layers * sum(c[key] for c in per_layer) for key in per_layer[0]}  # every method's extras too
    attention = layers * 12 * tokens * seq * hidden  # Q K^T and A V, forward and both gradients (no causal saving)
    total["base_flops"] += attention + 4 * tokens * hidden * vocab  # and the head
    return total


def _flops(value: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} FLOP"


def _bytes(value: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= scale:
            return f"{value / scale:.2f} {unit}"
    return f"{value:.0f} B"


def explain(case: dict, method: str, metric: str, baseline: str) -> str:
    """What the counts say about a method's step against a baseline's."""
    costs = model_costs(case["model"], case["batch"] * case["seq"], case["seq"])
    kind = {m: m.split("-")[0] for m in (method, baseline)}  # dual-bf16-grad counts as dual
    if metric == "step_seconds":
        extra = {m: costs[f"{kind[m]}_flops"] for m in (method, baseline)}
        moved = {m: costs[f"{kind[m]}_bytes"] for m in (method, baseline)}
        predicted = (costs["base_flops"] + extra[method]) / (costs["base_flops"] + extra[baseline])
        return (f"per step the frozen base does {_flops(costs['base_flops'])}; {baseline} adds "
                f"{_flops(extra[baseline])} and moves {_bytes(moved[baseline])} through out x in matrices, "
                f"{method} adds {_flops(extra[method])} and moves {_bytes(moved[method])} "
                f"({1e3 * (moved[method] - moved[baseline]) / HBM_BYTES_PER_S:+.2f} ms at "
                f"{HBM_BYTES_PER_S / 1e12:.2f} TB/s). Compute-bound, the counts predict {predicted:.2f}x; what the "
                "measurement shows beyond that is memory traffic, kernel launches and what the counts leave out")
    return (f"{method} keeps no out x in matrix between forward and backward (the layer input and the factors only), "
            "but holds row blocks of up to block_mib (16 MiB) per matrix while it builds W, G and the branch "
            f"gradients; {baseline}'s autograd keeps its own intermediates (see the profile)")


def targets(payload: dict) -> list[dict]:
    rows = []
    by_case = defaultdict(dict)
    for r in payload["step_results"]:
        if "error" not in r:
            by_case[r["case"]][r["method"]] = r
    for case, results in by_case.items():
        for method, metric, baseline, bound in STEP_TARGETS:
            if method in results and baseline in results:
                ratio = results[method][metric] / results[baseline][metric]
                row = {"case": case, "target": f"{method} {METRIC_NAMES[metric]} <= {bound:g}x {baseline}",
                       "ratio": ratio, "bound": bound, "holds": ratio <= bound}
                if not row["holds"]:
                    row["why"] = (f"missed by {100 * (ratio / bound - 1):.0f} %: "
                                  + explain(results[method], method, metric, baseline))
                rows.append(row)
    bf16 = [c for c in payload["checks"] if c["precision"] == "bf16" and c["what"].startswith("compiled vs eager")]
    if bf16:
        worst = max(bf16, key=lambda c: c["difference"] / c["bound"])
        rows.append({"case": "one layer", "target": "compiled equals eager within bf16 tolerance",
                     "ratio": worst["difference"] / worst["bound"], "bound": 1.0,
                     "holds": all(c["holds"] for c in bf16)})
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)] + ["| " + " | ".join(r) + " |"
                                                                             for r in rows]


def correctness_rows(checks: list[dict]) -> list[list[str]]:
    """The worst check of each method, precision and kind (output, gradients, merge)."""
    groups = defaultdict(list)
    for c in checks:
        kind = c["what"].split(": grad")[0] + (": gradients" if ": grad" in c["what"] else "")
        groups[(c["method"], c["precision"], kind)].append(c)
    rows = []
    for (method, precision, kind), group in groups.items():
        worst = max(group, key=lambda c: c["difference"] / c["bound"])
        rows.append([method, precision, kind, f"{worst['difference']:.2e}", f"{worst['bound']:.2e}",
                     "yes" if all(c["holds"] for c in group) else "**no**"])
    return rows


def markdown(payload: dict) -> str:
    env = payload["environment"]
    lines = [f"# GPU check{' (dry run: CPU, toy sizes)' if payload['dry_run'] else ''}: {env['device']}", "",
             ", ".join(f"{k} {v}" for k, v in env.items() if k != "device" and v), "",
             f"Command: `{payload['command']}`; {payload['seconds']:.0f} s of a {payload['budget_s']:.0f} s budget.",
             "", "## Correctness", "",
             "Largest difference relative to the reference's largest value, against the bound derived from the "
             "precision (4 sqrt(terms) unit roundoffs); the worst of each group.", ""]
    lines += _table(["method", "precision", "check", "difference", "bound", "holds"],
                    correctness_rows(payload["checks"]))
    lines += ["", "## Training step (bf16)", "",
              f"All seven linear types adapted, r = {RANK}; median of {payload['measured_steps']} steps after two "
              "warm-up steps; in the cases marked nf4 the decoder's linears are 4-bit NF4 (bitsandbytes), so lora is "
              "QLoRA, dora QDoRA, dual QDual and d2 QD2 (loraplus on the same 4-bit base; peft's HiRA fails on one); "
              "peak memory from CUDA's allocator" + (
                  " (in this dry run the process's resident set, which memory freed by earlier methods inflates: "
                  "it exercises the code paths and measures nothing)." if payload["dry_run"] else "."), ""]
    by_case = defaultdict(list)
    for r in payload["step_results"]:
        by_case[r["case"]].append(r)
    for case, results in by_case.items():
        lora = next((r for r in results if r["method"] == "lora" and "error" not in r), None)
        rows = []
        for r in results:
            if "error" in r:
                rows.append([r["method"], "", "out of memory", "", "", ""])
                continue
            rows.append([r["method"], f"{r['trainable_params']:,}", f"{r['step_seconds'] * 1e3:.1f} ms",
                         f"{r['step_seconds'] / lora['step_seconds']:.2f}x" if lora else "",
                         f"{r['peak_mib']:.0f} MiB", f"{r['peak_mib'] / lora['peak_mib']:.2f}x" if lora else ""])
        lines += [f"### {case}", ""] + _table(["method", "trainable", "step", "vs LoRA", "peak memory", "vs LoRA"],
                                              rows) + [""]
    lines += ["## Targets", ""] + _table(
        ["case", "target", "measured", "holds"],
        [[t["case"], t["target"], f"{t['ratio']:.2f}x", "yes" if t["holds"] else "**no**"]
         for t in payload["targets"]])
    missed = [t for t in payload["targets"] if not t["holds"] and "why" in t]
    if missed:
        lines += ["", "Missed targets:", ""] + [f"- {t['case']}, {t['target']}: {t['why']}." for t in missed]
    if payload["profile"]:
        for method in ("lora", "dual"):
            lines += ["", f"## Where the time goes: {method}, one decoder layer, forward and backward "
                          f"({payload['profile'][f'{method}_total_ms']:.2f} ms of kernels)", ""]
            lines += _table(["kernel", "ms", "calls"], [[e["kernel"].replace("|", "/"), f"{e['ms']:.3f}",
                                                         str(e["calls"])] for e in payload["profile"][method]])
    if payload["skipped"]:
        lines += ["", f"Skipped (time budget): {', '.join(payload['skipped'])}."]
    return "\n".join(lines) + "\n"

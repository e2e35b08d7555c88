"""What the straight-through estimators of Dual LoRA's Sign do at the magnitudes that occur in training.

``clip`` clips the gradient reaching Sign, ``g = dL/dSign(Q)``, to [-1, 1]; ``hardtanh`` passes it only where
``|Q| = |D C| <= 1``; ``identity`` passes it unchanged. So they differ only where ``|g| > 1`` or ``|Q| > 1``. This
trains Dual LoRA (the ablation's setting by default: MiniLM + sentiment, r = 16, lr 1e-3, 150 steps, bf16) and
records, at every step over every adapted layer, the largest ``|g|`` and ``|Q|`` and the fraction of elements where
each estimator would act, also for ``clip`` under fp16 with a GradScaler at its initial scale 2^16 (the gradients
it sees are then 65536 times larger: it clips where the true ``|g| > 2^-16``).

    python benchmarks/ste_magnitudes.py [--lr 1e-3,1e-2] [--max-steps 150] [--model minilm --task sentiment]

Writes ``docs/bench/ste_magnitudes.json``, ``.md`` (table) and ``.png`` (largest |g| and |Q| per step, with the
thresholds). The elementwise work runs eagerly here (``DUALLORA_COMPILE=0``) so that it can be observed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ["DUALLORA_COMPILE"] = "0"  # the estimator runs inside the fused kernel otherwise, out of sight
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import duallora.dual.maths as maths  # noqa: E402
from duallora.app.run_config import RunConfig  # noqa: E402
from duallora.app.train import train  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "bench"
FP16_INITIAL_SCALE = 2.0**16  # torch.amp.GradScaler's init_scale


class Recorder:
    """Wraps ``direction_backward`` (the STE) and sums, per optimizer step, what each estimator would act on."""

    def __init__(self):
        self.steps: list[dict] = []
        self._reset()

    def _reset(self):
        self.current = {"max_grad": 0.0, "max_q": 0.0, "elements": 0, "clip": 0, "clip_fp16": 0, "hardtanh": 0}

    def observe(self, grad: torch.Tensor, q: torch.Tensor) -> None:
        g, q = grad.detach().abs().float(), q.detach().abs().float()
        c = self.current
        c["max_grad"] = max(c["max_grad"], g.max().item())
        c["max_q"] = max(c["max_q"], q.max().item())
        c["elements"] += g.numel()
        c["clip"] += (g > 1).sum().item()
        c["clip_fp16"] += (g * FP16_INITIAL_SCALE > 1).sum().item()
        c["hardtanh"] += (q > 1).sum().item()

    def end_step(self, step: int) -> None:
        c = self.current
        n = max(1, c["elements"])
        self.steps.append({"step": step, "max_grad": c["max_grad"], "max_q": c["max_q"],
                           "clip_fraction": c["clip"] / n, "clip_fp16_fraction": c["clip_fp16"] / n,
                           "hardtanh_fraction": c["hardtanh"] / n})
        self._reset()


def measure(cfg: RunConfig) -> dict:
    recorder = Recorder()
    original = maths.direction_backward

    def observed(grad, q, name, ste):
        if name == "sign":
            recorder.observe(grad, q)
        return original(grad, q, name, ste)

    maths.direction_backward = observed
    try:
        metrics = train(cfg, overwrite=True, on_step=lambda step, model: recorder.end_step(step))
    finally:
        maths.direction_backward = original
    steps = recorder.steps
    return {"lr": cfg.learning_rate, "steps": steps, "test": metrics["test"],
            "summary": {"max_grad": max(s["max_grad"] for s in steps), "max_q": max(s["max_q"] for s in steps),
                        "clip_fraction": max(s["clip_fraction"] for s in steps),
                        "clip_fp16_fraction": max(s["clip_fp16_fraction"] for s in steps),
                        "hardtanh_fraction": max(s["hardtanh_fraction"] for s in steps)}}


def markdown(payload: dict) -> str:
    a = payload["args"]
    lines = [f"# Straight-through estimators at the magnitudes of training ({a['model']} / {a['task']}, "
             f"r = {a['rank']}, {a['max_steps']} steps, bf16, warm-up {a['warmup_steps']} steps)", "",
             "Over every step and adapted layer: the largest gradient reaching Sign |g| and the largest |Q| = |D C|, "
             "and the largest per-step fraction of elements where each estimator acts (`clip`: |g| > 1; `clip` under "
             "fp16 at GradScaler's initial scale 2^16: |g| > 2^-16; `hardtanh`: |Q| > 1). Where a fraction is 0, "
             "that estimator computes exactly what `identity` computes.", "",
             "| lr | max abs g | max abs Q | clip acts on | clip under fp16 acts on | hardtanh acts on "
             "| test accuracy |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for run in payload["runs"]:
        s = run["summary"]
        lines.append(f"| {run['lr']:g} | {s['max_grad']:.2e} | {s['max_q']:.2e} | {s['clip_fraction']:.2%} | "
                     f"{s['clip_fp16_fraction']:.2%} | {s['hardtanh_fraction']:.2%} | "
                     f"{100 * run['test']['accuracy']:.1f} |")
    lines += ["", f"Command: `{payload['command']}`", ""]
    return "\n".join(lines)


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for run in payload["runs"]:
        steps = [s["step"] for s in run["steps"]]
        axes[0].plot(steps, [s["max_grad"] for s in run["steps"]], label=f"lr {run['lr']:g}")
        axes[1].plot(steps, [s["max_q"] for s in run["steps"]], label=f"lr {run['lr']:g}")
    axes[0].axhline(1.0, color="black", linestyle=":", label="clip threshold 1")
    axes[0].axhline(1 / FP16_INITIAL_SCALE, color="tab:red", linestyle=":", label="clip under fp16 (scale 2^16)")
    axes[1].axhline(1.0, color="black", linestyle=":", label="hardtanh threshold 1")
    for ax, label in zip(axes, ("largest |g| = |dL/dSign(Q)|", "largest |Q| = |D C|")):
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    fig.suptitle(f"Dual LoRA's Sign: what the STEs see ({payload['args']['model']} / {payload['args']['task']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="minilm")
    parser.add_argument("--task", default="sentiment")
    parser.add_argument("--lr", default="1e-3,1e-2", help="comma-separated learning rates, one run each")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-steps", type=int, default=150)
    parser.add_argument("--warmup-steps", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-eval-examples", type=int, default=500)
    parser.add_argument("--work-dir", default="runs/ste-magnitudes", help="where the runs write (not committed)")
    parser.add_argument("--output-dir", default=str(DOCS))
    args = parser.parse_args()
    runs = []
    for lr in (float(v) for v in args.lr.split(",")):
        cfg = RunConfig(method="dual", model=args.model, task=args.task, r=args.rank, lr=lr, max_steps=args.max_steps,
                        warmup_steps=args.warmup_steps, batch_size=args.batch_size, max_length=args.max_length,
                        max_eval_examples=args.max_eval_examples, bf16=True,
                        output_dir=str(Path(args.work_dir) / f"lr{lr:g}"))
        runs.append(measure(cfg))
    payload = {"args": vars(args), "command": " ".join(["python benchmarks/ste_magnitudes.py", *sys.argv[1:]]),
               "runs": runs}
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ste_magnitudes.json").write_text(json.dumps(payload, indent=1))
    (out / "ste_magnitudes.md").write_text(markdown(payload))
    plot(payload, out / "ste_magnitudes.png")
    print(markdown(payload))


if __name__ == "__main__":
    main()

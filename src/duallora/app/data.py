"""Examples to model inputs: tokenisation per task kind, padding, and the deterministic batch order."""

from __future__ import annotations

import torch

from .tasks import Example, Task

IGNORE_INDEX = -100  # label value the loss skips (prompt and padding tokens)


def prompt(task: Task, example: Example) -> str:
    return task.instruction.format(text=example.text) if task.instruction else example.text


def encode_prompt_and_answer(tokenizer, prompt_text: str, answer: str, max_length: int) -> dict:
    """Token ids of ``prompt + answer`` with the loss on the answer only; the prompt is cut from the left when the
    pair would be longer than ``max_length`` (the answer and the end of the prompt matter most)."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    answer_ids = answer_ids[: max_length - 1]
    prompt_ids = prompt_ids[-(max_length - len(answer_ids)):]
    return {"input_ids": prompt_ids + answer_ids, "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}


def encode_for_training(task: Task, tokenizer, example: Example, max_length: int) -> dict:
    if task.kind == "classification":
        enc = tokenizer(example.text, example.text_pair, truncation=True, max_length=max_length)
        return {"input_ids": enc["input_ids"], "labels": example.label, **_extra(enc)}
    if task.kind == "multiple_choice":
        answer = " " + example.choices[example.label]
    else:
        answer = " " + example.references[0] + (tokenizer.eos_token or "")
    return encode_prompt_and_answer(tokenizer, prompt(task, example), answer, max_length)


def _extra(enc) -> dict:
    return {"token_type_ids": enc["token_type_ids"]} if "token_type_ids" in enc else {}


def collate(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a list of encoded examples into tensors with an attention mask."""
    length = max(len(f["input_ids"]) for f in features)
    batch = {"input_ids": [], "attention_mask": []}
    has_types = "token_type_ids" in features[0]
    seq_labels = isinstance(features[0]["labels"], list)
    if has_types:
        batch["token_type_ids"] = []
    labels = []
    for f in features:
        pad = length - len(f["input_ids"])
        batch["input_ids"].append(f["input_ids"] + [pad_id] * pad)
        batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * pad)
        if has_types:
            batch["token_type_ids"].append(f["token_type_ids"] + [0] * pad)
        labels.append(f["labels"] + [IGNORE_INDEX] * pad if seq_labels else f["labels"])
    out = {k: torch.tensor(v) for k, v in batch.items()}
    out["labels"] = torch.tensor(labels)
    return out


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on the seed and the epoch (so a resumed
    run sees exactly the batches the interrupted one would have)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()

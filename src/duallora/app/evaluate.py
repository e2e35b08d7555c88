"""Scoring a model on a split: accuracy for classification, log-likelihood choice accuracy for multiple choice
with a causal LM (each example's answers ranked by its ``choice_score`` rule, :func:`rank_scores`), BLEU and
ROUGE-L (sacrebleu, rouge-score) for generation."""

from __future__ import annotations

import sys
from typing import Optional

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX, collate, encode_for_training, encode_prompt_and_answer, prompt
from .tasks import Example, Task, by_group

PRIMARY_METRIC = {"classification": "accuracy", "multiple_choice": "accuracy", "generation": "bleu"}
CHOICE_SCORES = ("sum", "per_char")  # the rules of rank_scores


@torch.no_grad()
def evaluate(model, tokenizer, task: Task, examples: list[Example], max_length: int = 128,
             batch_size: int = 32, max_new_tokens: int = 48, accelerator=None,
             progress: Optional[str] = None) -> dict[str, float]:
    """Scores of ``model`` on ``examples``; the model is put in eval mode and left there. ``progress``: the label of a
    progress bar over the examples (a causal LM scores a thousand choices for minutes on a CPU).

    With an ``accelerator`` of several processes each scores an equal share of the examples and the per-example
    outcomes are gathered, so every process returns the scores of the whole set (and, under FSDP, every process
    runs the same number of forward passes, as the sharded weights' all-gathers require).
    """
    from tqdm.auto import tqdm

    model.eval()
    share = _share(examples, accelerator)
    bar = tqdm(total=len(share), desc=progress, unit="example", disable=progress is None,
               mininterval=0.5 if sys.stderr.isatty() else 30)  # a log file gets a line every 30 s
    if task.kind == "classification":
        outcomes = _classification_correct(model, tokenizer, task, share, max_length, batch_size, bar)
    elif task.kind == "multiple_choice":
        outcomes = _choice_correct(model, tokenizer, task, share, max_length, bar)
    else:
        outcomes = _generate(model, tokenizer, task, share, max_length, batch_size, max_new_tokens,
                             synced=_processes(accelerator) > 1, bar=bar)
    bar.close()
    outcomes = _gather(outcomes, accelerator)[:len(examples)]
    if task.kind == "generation":
        return generation_scores(outcomes, examples)
    return accuracy_scores(outcomes, examples)


def accuracy_scores(correct: list[bool], examples: list[Example]) -> dict[str, float]:
    """Accuracy; for a mix of tasks (examples with a ``group``), each task's as ``accuracy/<task>`` and their
    unweighted mean as ``accuracy`` (the papers' "Avg." column: every task counts once, whatever its size)."""
    groups = by_group(examples)
    if list(groups) in ([], [None]):
        return {"accuracy": sum(correct) / max(1, len(examples))}
    per_task = {group: sum(correct[i] for i in indices) / len(indices) for group, indices in groups.items()}
    return {"accuracy": sum(per_task.values()) / len(per_task), **{f"accuracy/{g}": v for g, v in per_task.items()}}


def _processes(accelerator) -> int:
    return 1 if accelerator is None else accelerator.num_processes


def _share(examples: list[Example], accelerator) -> list[Example]:
    """This process's contiguous share, padded with the last example so that every share has the same length
    (the padding's outcomes fall beyond ``len(examples)`` after the gather and are dropped)."""
    n = _processes(accelerator)
    if n == 1 or not examples:
        return examples
    size = -(-len(examples) // n)
    share = examples[accelerator.process_index * size:(accelerator.process_index + 1) * size]
    return share + [examples[-1]] * (size - len(share))


def _gather(outcomes: list, accelerator) -> list:
    """Every process's outcomes, in process order (= the examples' order, the shares being contiguous)."""
    if _processes(accelerator) == 1:
        return outcomes
    from accelerate.utils import gather_object

    return gather_object(outcomes)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _classification_correct(model, tokenizer, task, examples, max_length, batch_size, bar) -> list[bool]:
    correct = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i:i + batch_size]
        batch = collate([encode_for_training(task, tokenizer, e, max_length) for e in chunk], tokenizer.pad_token_id)
        labels = batch.pop("labels")
        logits = model(**{k: v.to(_device(model)) for k, v in batch.items()}).logits
        correct += (logits.argmax(-1).cpu() == labels).tolist()
        bar.update(len(chunk))
    return correct


def choice_log_likelihoods(model, tokenizer, prompt_text: str, choices: list[str], max_length: int) -> torch.Tensor:
    """``log p(" " + choice | prompt)`` for each choice: the sum over the answer's tokens of
    ``log p(a_t | prompt, a_<t)``."""
    features = [encode_prompt_and_answer(tokenizer, prompt_text, " " + c, max_length) for c in choices]
    batch = collate(features, tokenizer.pad_token_id)
    labels = batch.pop("labels").to(_device(model))
    logits = model(**{k: v.to(_device(model)) for k, v in batch.items()}).logits.float()
    logp = F.log_softmax(logits[:, :-1], dim=-1)  # token t predicts token t + 1
    target = labels[:, 1:]
    mask = target != IGNORE_INDEX
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1).cpu()


def rank_scores(log_likelihoods: torch.Tensor, choices: list[str], rule: str) -> torch.Tensor:
    """What the answers of one multiple-choice example are ranked by (the highest is the model's answer).

    - ``"sum"``: the answer's log-likelihood itself (BIG-bench's score). Every token costs probability, so it
      favours short answers: on answers of unequal length it can score below chance.
    - ``"per_char"``: that log-likelihood over the answer's length in characters, ``log p(a | x) / len(a)``
      (lm-evaluation-harness's ``acc_norm``, OLMo's ``len_norm``), which puts answers of any length on one scale.
      Characters rather than tokens: the count does not depend on the tokenizer being compared."""
    if rule == "sum":
        return log_likelihoods
    if rule == "per_char":
        lengths = torch.tensor([len(" " + c) for c in choices], dtype=log_likelihoods.dtype)  # as scored
        return log_likelihoods / lengths
    raise ValueError(f"Unknown choice_score {rule!r}; valid: {list(CHOICE_SCORES)}")


def _choice_correct(model, tokenizer, task, examples, max_length, bar) -> list[bool]:
    correct = []
    for e in examples:
        likelihoods = choice_log_likelihoods(model, tokenizer, prompt(task, e), e.choices, max_length)
        correct.append(rank_scores(likelihoods, e.choices, e.choice_score).argmax().item() == e.label)
        bar.update(1)
    return correct


def _generate(model, tokenizer, task, examples, max_length, batch_size, max_new_tokens, synced: bool,
              bar) -> list[str]:
    """Greedy continuations, first line only. ``synced`` keeps every process stepping until all are done (the
    processes' forward passes must pair up when the weights are sharded)."""
    hypotheses = []
    tokenizer.padding_side = "left"  # generation continues from the last prompt token
    try:
        for i in range(0, len(examples), batch_size):
            chunk = examples[i:i + batch_size]
            enc = tokenizer([prompt(task, e) for e in chunk], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length).to(_device(model))
            enc = {k: enc[k] for k in ("input_ids", "attention_mask")}  # causal LMs take no token_type_ids
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id, synced_gpus=synced)
            texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            hypotheses += [t.strip().split("\n")[0] for t in texts]
            bar.update(len(chunk))
    finally:
        tokenizer.padding_side = "right"
    return hypotheses


def generation_scores(hypotheses: list[str], examples: list[Example]) -> dict:
    """Corpus BLEU (sacrebleu, every reference) and mean best ROUGE-L F1 over the references, both in 0-100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    n_refs = max(len(e.references) for e in examples)
    # sacrebleu takes one stream per reference index; a shorter list repeats its first reference
    streams = [[e.references[k] if k < len(e.references) else e.references[0] for e in examples]
               for k in range(n_refs)]
    bleu = sacrebleu.corpus_bleu(hypotheses, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge_l = sum(max(scorer.score(ref, hyp)["rougeL"].fmeasure for ref in e.references)
                  for hyp, e in zip(hypotheses, examples)) / len(examples)
    return {"bleu": bleu, "rougeL": 100 * rouge_l, "samples": hypotheses[:3]}

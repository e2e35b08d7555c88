"""Multiple-choice scoring: each answer's log-likelihood against an independent computation (one unpadded forward
per answer), and the two ranking rules (the sum, BIG-bench's; per character, OLMo's len_norm) as evaluate applies
them example by example."""

import pytest
import torch

from duallora.app.data import prompt
from duallora.app.evaluate import choice_log_likelihoods, evaluate, rank_scores
from duallora.app.models import load_model, load_tokenizer
from duallora.app.tasks import Example, Task

PROMPT = "the movie was"
CHOICES = ["good", "not very good and the plot was awful .", "bad", "a great movie and a very good actor ."]


def test_sum_ranks_by_the_log_likelihood_and_per_char_by_its_share_per_character():
    likelihoods = torch.tensor([-4.0, -9.0])  # " ab": 3 characters; " abcdefgh": 9
    assert rank_scores(likelihoods, ["ab", "abcdefgh"], "sum").tolist() == [-4.0, -9.0]
    assert rank_scores(likelihoods, ["ab", "abcdefgh"], "per_char").tolist() == pytest.approx([-4 / 3, -1.0])
    assert rank_scores(likelihoods, ["ab", "abcdefgh"], "sum").argmax() == 0  # the short answer wins the sum
    assert rank_scores(likelihoods, ["ab", "abcdefgh"], "per_char").argmax() == 1  # and loses per character
    with pytest.raises(ValueError, match=r"Unknown choice_score 'per_token'; valid: \['sum', 'per_char'\]"):
        rank_scores(likelihoods, ["ab", "abcdefgh"], "per_token")


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    tokenizer = load_tokenizer(tiny_checkpoints["llama"])
    model = load_model(tiny_checkpoints["llama"], "multiple_choice", None, tokenizer).eval()
    return model, tokenizer


def reference_log_likelihood(model, tokenizer, prompt_text: str, answer: str) -> float:
    """log p(answer | prompt) from one forward of the unpadded prompt + answer, summed token by token."""
    prompt_ids = tokenizer(prompt_text, add_special_tokens=True)["input_ids"]
    answer_ids = tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + answer_ids])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(prompt_ids) + i - 1, token].item() for i, token in enumerate(answer_ids))


def test_each_answers_log_likelihood_equals_an_unpadded_forward(llama):
    model, tokenizer = llama
    got = choice_log_likelihoods(model, tokenizer, PROMPT, CHOICES, max_length=64)
    expected = torch.tensor([reference_log_likelihood(model, tokenizer, PROMPT, c) for c in CHOICES],
                            dtype=torch.float64)
    # float32 logits of a 2-layer model, summed over at most 10 tokens: padding changes only the rounding (~1e-6
    # relative per log-probability of magnitude ~4)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


def test_evaluate_ranks_each_example_by_its_own_rule(llama):
    model, tokenizer = llama
    # one-token words of 1 to 10 letters: near-uniform logits (~log 1/64 per token) make the sum prefer the fewest
    # tokens and the per-character rule the most letters, so the rules must split on the first example
    answers = [["a", "restaurant coffee"], ["restaurant coffee", "a", "is"], ["good", "not"], CHOICES]
    reference = [torch.tensor([reference_log_likelihood(model, tokenizer, PROMPT, c) for c in choices])
                 for choices in answers]
    picks = {rule: [rank_scores(r, choices, rule).argmax().item() for r, choices in zip(reference, answers)]
             for rule in ("sum", "per_char")}
    assert picks["sum"] != picks["per_char"], "the rules must disagree somewhere for this test to tell them apart"
    for rule in ("sum", "per_char"):
        # each example labelled with the answer the rule picks: accuracy 1, and 0 where the other rule's pick is
        examples = [Example(PROMPT, choices=choices, label=pick, choice_score=rule)
                    for choices, pick in zip(answers, picks[rule])]
        task = Task("choices", "multiple_choice", [], [], examples)
        assert prompt(task, examples[0]) == PROMPT
        assert evaluate(model, tokenizer, task, examples, max_length=64)["accuracy"] == 1.0
        other = "per_char" if rule == "sum" else "sum"
        relabelled = [Example(PROMPT, choices=e.choices, label=p, choice_score=rule)
                      for e, p in zip(examples, picks[other])]
        disagreements = sum(a != b for a, b in zip(picks[rule], picks[other]))
        assert evaluate(model, tokenizer, task, relabelled, max_length=64)["accuracy"] == pytest.approx(
            1 - disagreements / len(examples))

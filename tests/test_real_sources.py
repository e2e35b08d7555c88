"""The real data, no fixture: every source the shipped tasks read is still on the package index with its pinned
sha256, and every task reads its real examples (split sizes measured from the archives on 2026-12-05).

Marked ``network`` (it asks the index): a plain ``pytest`` skips it, ``scripts/test.sh`` and so CI run it, after
``scripts/install.sh`` has fetched the sources. A source withdrawn from the index turns CI red here, even where the
cache still holds its files, instead of failing a user's first run.
"""

from pathlib import Path

import pytest

from duallora.app.catalog import fetchable, markdown, sft_split
from duallora.app.tasks import load_task, majority_baseline, registry
from duallora.app.tasks.chat import SFT_DATASETS
from duallora.app.tasks.olmo_eval import COMMONSENSE
from duallora.app.tasks.sources import index_listing

pytestmark = pytest.mark.network
ROOT = Path(__file__).resolve().parent.parent

SPLITS = {  # train, validation, test
    "rated-sentiment": (18965, 2371, 2367), "sst2": (611, 87, 174), "mrpc": (287, 40, 81), "rte": (195, 27, 55),
    "boolq": (2289, 327, 654), "piqa": (1288, 183, 367), "siqa": (1368, 194, 392), "hellaswag": (7030, 1004, 2008),
    "winogrande": (888, 126, 253), "arc-easy": (399, 57, 114), "arc-challenge": (211, 29, 59),
    "openbookqa": (350, 50, 100), "sarcasm": (22900, 2858, 2856), "quartz": (3091, 385, 384),
    "commonsense": (13823, 1970, 3947),
}
SOURCES = {id(info.source): info.source for info in registry().values() if fetchable(info)}
SOURCES.update({id(data.source): data.source for data in SFT_DATASETS.values()})


def test_every_shipped_task_is_checked_here():
    assert sorted(SPLITS) == sorted(name for name, info in registry().items() if fetchable(info))


@pytest.mark.parametrize("source", list(SOURCES.values()), ids=lambda s: s.requirement)
def test_the_index_still_serves_each_source_with_its_pinned_sha256(source):
    url, listed = index_listing(source)
    assert url.endswith("/" + source.filename) and listed == source.sha256


def _key(example):
    return (example.text, example.text_pair, tuple(example.choices or ()))


@pytest.mark.parametrize("name", sorted(SPLITS))
def test_each_task_reads_its_real_examples(name):
    task = load_task(name)
    assert (len(task.train), len(task.validation), len(task.test)) == SPLITS[name]
    assert not {_key(e) for e in task.train} & {_key(e) for e in task.test}  # never scored on what it trained on
    everything = task.train + task.validation + task.test
    if task.kind == "classification":
        assert {e.label for e in everything} == set(range(len(task.label_names)))
    else:
        assert all(len(e.choices) >= 2 and 0 <= e.label < len(e.choices) and all(e.choices) for e in everything)
    assert all(e.text.strip() for e in everything)
    # no task is a constant answer: the majority of its test split stays well below 100 %
    assert majority_baseline(task, task.test) < 0.8


def test_the_commonsense_mix_is_the_eight_tasks_portions():
    mix = load_task("commonsense")
    for split in ("train", "validation", "test"):
        assert len(mix.split(split)) == sum(len(load_task(n).split(split)) for n in COMMONSENSE)
    assert [e.group for e in mix.test[:8]] == list(COMMONSENSE)  # interleaved: a capped evaluation sees all eight
    assert {e.group for e in mix.train} == set(COMMONSENSE)


def test_the_data_page_holds_the_table_the_tasks_give():
    page = (ROOT / "docs" / "data.md").read_text()
    assert markdown() in page, "docs/data.md is stale: regenerate its table with `duallora data --markdown`"


def test_the_commonsense_mix_trains_and_reports_each_task(tiny_checkpoints, tmp_path):
    """A tiny LLaMA through the command line on the real mix: one score per task and their mean."""
    import json

    from duallora.app.cli import main

    out = tmp_path / "mix"
    assert main(["train", "--method", "dual", "--model", str(tiny_checkpoints["llama"]), "--task", "commonsense",
                 "--max-steps", "2", "--batch-size", "4", "--max-length", "48", "--max-eval-examples", "16",
                 "--warmup-steps", "1", "--output-dir", str(out)]) == 0
    test = json.loads((out / "metrics.json").read_text())["test"]
    per_task = {k.split("/", 1)[1]: v for k, v in test.items() if k.startswith("accuracy/")}
    assert sorted(per_task) == sorted(COMMONSENSE)  # 16 interleaved examples: two of each task
    assert test["accuracy"] == pytest.approx(sum(per_task.values()) / 8)
    assert all(v in (0.0, 0.5, 1.0) for v in per_task.values())


def test_an_encoder_trains_on_a_glue_task(tiny_checkpoints, tmp_path):
    import json

    from duallora.app.cli import main

    out = tmp_path / "rte"
    assert main(["train", "--method", "lora", "--model", str(tiny_checkpoints["bert"]), "--task", "rte",
                 "--max-steps", "2", "--batch-size", "4", "--max-length", "32", "--output-dir", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_examples"] == 55 and metrics["majority_baseline"] == pytest.approx(29 / 55)


def test_the_sft_demo_data_reads_its_999_alpaca_examples():
    train, validation = sft_split("alpaca-demo")
    assert (len(train), len(validation)) == (900, 99)
    for record in train + validation:
        assert [t["role"] for t in record["prompt"] + record["completion"]] == ["user", "assistant"]
        assert record["prompt"][0]["content"].strip() and record["completion"][0]["content"].strip()


def test_each_commonsense_task_ranks_its_answers_as_olmo_eval_does():
    """len_norm (per character) where olmo_eval uses it, the plain log-likelihood elsewhere; kept through the mix."""
    rules = {e.group: e.choice_score for e in load_task("commonsense").test}
    assert rules == {"boolq": "sum", "piqa": "per_char", "siqa": "per_char", "hellaswag": "per_char",
                     "winogrande": "sum", "arc-easy": "sum", "arc-challenge": "per_char", "openbookqa": "per_char"}

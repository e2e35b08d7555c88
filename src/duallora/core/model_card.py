"""The section of an adapter folder's README.md (its model card) that says how to open it.

peft's own card names only peft. Without duallora installed, peft fails on these adapters with a bare
``KeyError: 'DUAL_LORA'``, so whoever opens the folder (on disk or on the Hub) needs to read what it is and what
to install. The section sits between two markers and is rewritten, never appended twice.
"""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_write_text

SECTION_START = "<!-- duallora: how to load this adapter -->"
SECTION_END = "<!-- /duallora -->"

METHOD_TITLES = {"DUAL_LORA": "Dual LoRA", "D2_LORA": "D2-LoRA"}

# peft's task types and the transformers class that loads the base model for each (AutoModel for the rest)
AUTO_CLASSES = {
    "CAUSAL_LM": "AutoModelForCausalLM",
    "SEQ_CLS": "AutoModelForSequenceClassification",
    "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
    "TOKEN_CLS": "AutoModelForTokenClassification",
    "QUESTION_ANS": "AutoModelForQuestionAnswering",
}


def loading_section(peft_type: str, task_type, base_model, adapter_folder: str) -> str:
    """The card's section: the method, ``pip install duallora``, and a snippet that loads this adapter."""
    method = METHOD_TITLES.get(peft_type, peft_type)
    auto_class = AUTO_CLASSES.get(str(task_type), "AutoModel")
    base = base_model or "<the base model this adapter was trained on>"
    return f"""{SECTION_START}
## Loading this adapter

This is a **{method}** adapter (PEFT type `{peft_type}`), made with
[duallora](https://pypi.org/project/duallora/). peft needs duallora installed to read it; without it peft stops
with `KeyError: '{peft_type}'`.

```bash
pip install duallora
```

Installing it is enough: duallora registers its methods whenever peft is imported, so no `import duallora` is needed.

```python
from peft import PeftModel
from transformers import {auto_class}

base = {auto_class}.from_pretrained("{base}")
model = PeftModel.from_pretrained(base, "{adapter_folder}")  # this folder, or the Hub id it was uploaded to
```
{SECTION_END}
"""


def write_loading_section(folder: str, peft_type: str, task_type, base_model) -> None:
    """Put the loading section into ``folder``/README.md: replace the one there, or add it at the top (atomically)."""
    card = Path(folder, "README.md")
    section = loading_section(peft_type, task_type, base_model, str(folder))
    text = card.read_text() if card.exists() else ""
    if SECTION_START in text and SECTION_END in text:
        head, rest = text.split(SECTION_START, 1)
        text = head + section.rstrip("\n") + rest.split(SECTION_END, 1)[1]
    else:
        front_matter, body = _split_front_matter(text)
        text = front_matter + section + ("\n" + body.lstrip("\n") if body.strip() else "")
    atomic_write_text(card, text)


def _split_front_matter(text: str) -> tuple[str, str]:
    """The card's YAML header (``---`` ... ``---``, peft's metadata) and the rest; the section goes first below it."""
    lines = text.splitlines(keepends=True)
    if lines and lines[0].strip() == "---":
        for index in range(1, len(lines)):
            if lines[index].strip() == "---":
                return "".join(lines[: index + 1]), "".join(lines[index + 1:])
    return "", text

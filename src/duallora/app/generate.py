"""``duallora generate`` and ``duallora chat``: a trained causal LM answers, its tokens streamed to the terminal.

The model is a run of ``duallora train``, an adapter folder (PEFT format: its base is named in
``adapter_config.json``) or a merged checkpoint. Prompts go through the tokenizer's own chat template (as the model
was trained on them); a tokenizer without one gets the plain text, and the first reply says so.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Optional, TextIO

import torch


def load_generator(path: Path):
    """Model (eval mode) and tokenizer of a run, an adapter folder or a merged checkpoint of a causal LM."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if (path / "run_config.json").exists():
        from .train import load_trained

        model, tokenizer, task, _ = load_trained(path)
        if task.kind == "classification":
            raise ValueError(f"{path} is a classifier (a run on {task.name!r}): generate and chat need a causal LM. "
                             f"Label inputs with `duallora predict --adapter {path}`.")
        return model.eval(), tokenizer
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM, PeftConfig

        model = AutoPeftModelForCausalLM.from_pretrained(path)
        has_tokenizer = (path / "tokenizer_config.json").exists()
        tokenizer = AutoTokenizer.from_pretrained(path if has_tokenizer else
                                                  PeftConfig.from_pretrained(path).base_model_name_or_path)
        return model.eval(), tokenizer
    if (path / "config.json").exists():
        return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    raise ValueError(f"{path} holds neither a run of `duallora train` (run_config.json), an adapter "
                     "(adapter_config.json) nor a model (config.json).")


def prompt_ids(tokenizer, messages: list[dict] | str) -> torch.Tensor:
    """The conversation as the model reads it: through the tokenizer's chat template, with the assistant's turn
    opened; without a template, the last message's plain text. A plain-text prompt (what a model trained on plain
    prompt-completion data reads) goes in as it is."""
    if isinstance(messages, str):
        return tokenizer(messages, return_tensors="pt")["input_ids"]
    if tokenizer.chat_template:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        return torch.as_tensor(ids)
    return tokenizer(messages[-1]["content"], return_tensors="pt")["input_ids"]


class _Stream:
    """transformers' streamer interface: each new token's text written to ``out`` as soon as it is decoded."""

    def __init__(self, tokenizer, out: TextIO):
        from transformers import TextStreamer

        self.streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.streamer.on_finalized_text = self._write
        self.out = out

    def _write(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()

    def put(self, value):
        self.streamer.put(value)

    def end(self):
        self.streamer.end()


@torch.no_grad()
def reply(model, tokenizer, messages: list[dict] | str, max_new_tokens: int, temperature: float = 0.0,
          out: Optional[TextIO] = None) -> str:
    """The model's answer to ``messages`` (a conversation or a plain-text prompt; greedy at temperature 0, else
    sampled), streamed to ``out`` if given."""
    ids = prompt_ids(tokenizer, messages).to(next(model.parameters()).device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad)
    if temperature > 0:
        options["temperature"] = temperature
    generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                               streamer=_Stream(tokenizer, out) if out is not None else None, **options)
    return tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)


def chat(model, tokenizer, read_line: Callable[[], Optional[str]], out: TextIO, max_new_tokens: int,
         temperature: float = 0.0, system: Optional[str] = None) -> list[dict]:
    """A conversation: each line read is the user's turn, answered with the history before it; an empty line,
    ``/exit`` or the end of input ends it, ``/reset`` starts afresh. Returns the conversation."""
    start = [{"role": "system", "content": system}] if system else []
    messages = list(start)
    while True:
        line = read_line()
        if line is None or line.strip() in ("", "/exit"):
            return messages
        if line.strip() == "/reset":
            messages = list(start)
            continue
        messages.append({"role": "user", "content": line.strip()})
        messages.append({"role": "assistant", "content": reply(model, tokenizer, messages, max_new_tokens,
                                                               temperature, out)})


def no_template_note(tokenizer) -> Optional[str]:
    if tokenizer.chat_template:
        return None
    return ("note: this tokenizer has no chat template, so each prompt goes to the model as plain text and a chat "
            "keeps no history")


def stdin_line() -> Optional[str]:
    """A line of standard input (a prompt on the terminal), None at its end."""
    if sys.stdin.isatty():
        sys.stderr.write("you> ")
        sys.stderr.flush()
    line = sys.stdin.readline()
    return line.rstrip("\n") if line else None

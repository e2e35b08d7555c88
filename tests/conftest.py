"""Tiny random models built from configs (no download), one per supported layer kind; tiny checkpoints and data on
disk; the bounds and helpers of the runs of several processes."""

import json
import os
import shutil
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import duallora  # noqa: E402,F401  (registers the methods)
from duallora import D2LoraConfig, DualLoraConfig  # noqa: E402
from peft import get_peft_model  # noqa: E402


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        vocab_size=64, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def tiny_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(config).eval()


MODELS = {"llama": tiny_llama, "bert": tiny_bert, "gpt2": tiny_gpt2}


def tiny_moe(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random mixture-of-experts model of transformers 5, whose experts are 3-D parameters: Mixtral and
    Qwen3-MoE store them (experts, out, in), gpt-oss (experts, in, out) with expert biases; OLMoE as Mixtral."""
    from transformers import (GptOssConfig, GptOssForCausalLM, MixtralConfig, MixtralForCausalLM, OlmoeConfig,
                              OlmoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=8, max_position_embeddings=64)
    if kind == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common, intermediate_size=48, num_local_experts=4,
                                                 num_experts_per_tok=2))
    elif kind == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**common, intermediate_size=48, moe_intermediate_size=24,
                                                   num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1))
    elif kind == "gpt_oss":
        model = GptOssForCausalLM(GptOssConfig(**common, intermediate_size=48, num_local_experts=4,
                                               num_experts_per_tok=2, layer_types=["full_attention"] * 2))
    elif kind == "olmoe":
        model = OlmoeForCausalLM(OlmoeConfig(**{k: v for k, v in common.items() if k != "head_dim"},
                                             intermediate_size=24, num_experts=4, num_experts_per_tok=2))
    else:
        raise ValueError(kind)
    return model.eval()


MOE_MODELS = ("mixtral", "qwen3_moe", "gpt_oss")
EXPERTS = ["gate_up_proj", "down_proj"]

# Two float32 computations of one value in another order (merged vs unmerged, fused vs eager, blocked vs whole, one
# process vs two): a reduction of n terms rounds to within (n - 1) eps of the sum of the terms' sizes. The tiny
# models reduce over at most 64 terms (the MLP width), in chains of at most 16 (embedding, two decoder layers of
# attention and MLP, the head), so the results agree within 64 * 16 eps of the size of what they compute.
FLOAT32_REORDER_RTOL = 64 * 16 * torch.finfo(torch.float32).eps


def assert_float32_close(got: torch.Tensor, expected: torch.Tensor, msg=None) -> None:
    """``got`` equals ``expected`` up to float32 reordering: FLOAT32_REORDER_RTOL of ``expected``'s largest value."""
    torch.testing.assert_close(got, expected, rtol=0.0, atol=FLOAT32_REORDER_RTOL * expected.abs().max().item(),
                               msg=msg)


# ----------------------------------------------------------------------------- adapted tiny models
METHODS = {
    "dual": lambda **kw: DualLoraConfig(**{"warmup_steps": 0, **kw}),
    "d2": lambda **kw: D2LoraConfig(**kw),
}


def trained_like(model, std: float = 0.1):
    """Give every factor random values so that dW != 0 (a fresh D2 adapter is exactly the base model)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "_lora_" in name:
                p.normal_(0, std)
    return model


def adapted(model_name, method, target="all-linear", **kw):
    base = MODELS[model_name]()
    config = METHODS[method](r=4, lora_alpha=8, target_modules=target, **kw)
    if model_name == "bert":
        config.modules_to_save = ["classifier"]
    return trained_like(get_peft_model(base, config))


def model_output(model, inputs) -> torch.Tensor:
    return model(inputs).logits


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- tiny checkpoints and data on disk
WORDS = ["good", "bad", "movie", "plot", "actor", "great", "awful", "the", "a", "was", "is", "and", "very", "not",
         "yes", "no", "restaurant", "cheap", "food", "area", "name", "city", "centre", "coffee", "shop"]


def _tiny_tokenizer(directory):
    from transformers import BertTokenizer

    vocab = directory / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ":", ",", ".", "?", "(", ")"] + WORDS))
    return BertTokenizer(str(vocab))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """A tiny BERT and a tiny LLaMA saved as local checkpoints with a small WordPiece tokenizer; ``llama64`` is the
    LLaMA at widths of whole 4-bit quantization blocks (64 values), which bitsandbytes' CPU kernels behind peft's
    quantized layers need (at width 32 its 4-bit inference kernel fails on one-row inputs); ``mixtral`` a tiny
    Mixtral (4 experts held as 3-D parameters) at those widths."""
    from transformers import BertModel

    root = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for name in ("bert", "llama", "llama64", "mixtral"):
        directory = root / name
        directory.mkdir()
        tokenizer = _tiny_tokenizer(directory)
        torch.manual_seed(0)
        if name == "mixtral":
            from transformers import MixtralConfig, MixtralForCausalLM

            model = MixtralForCausalLM(MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                                     num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                                     max_position_embeddings=256, pad_token_id=0, num_local_experts=4,
                                                     num_experts_per_tok=2))
        elif name == "bert":
            model = BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, vocab_size=64, max_position_embeddings=128))
        else:
            hidden = 64 if name == "llama64" else 32
            model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                                 max_position_embeddings=256, pad_token_id=0))
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        paths[name] = directory
    return paths


def sentiment_rows(n=240, seed=0):
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 else "neg"
        words = [rng.choice(WORDS[7:14]) for _ in range(5)] + [rng.choice(["good", "great"] if label == "pos"
                                                                          else ["bad", "awful"])]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "other": rng.choice(WORDS), "label": label})
    return rows


@pytest.fixture(scope="session")
def tiny_csv(tmp_path_factory):
    import csv

    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "other", "label"])
        writer.writeheader()
        writer.writerows(sentiment_rows())
    return path


@pytest.fixture(scope="session")
def tiny_bigbench(tmp_path_factory):
    """A small stand-in for the BIG-bench archive, with the five task files in their real layout and format."""
    import io
    import json
    import random
    import tarfile

    from duallora.app.tasks.bigbench import BIGBENCH_TASKS, MEMBER_ROOT

    rng = random.Random(0)
    sentiments = ["negative", "positive", "neutral", "ambivalent"]
    tasks = {
        "sentiment": [{"input": " ".join(rng.choices(WORDS, k=6)),
                       "target_scores": {s: int(s == sentiments[i % 4]) for s in sentiments}} for i in range(60)],
        "fact-verification": [{"input": f"Film: the movie was good .\nClaim: the movie was {rng.choice(WORDS)} .",
                               "target_scores": {v: int(v == ["True", "False", "Neither"][i % 3])
                                                 for v in ["True", "False", "Neither"]}} for i in range(60)],
        "social-iqa": [{"input": "the actor was very good . what is the actor ? ",
                        "target_scores": {"good": int(i % 3 == 0), ("bad" if i % 2 else "not good"): int(i % 3 == 1),
                                          "awful": int(i % 3 == 2)}} for i in range(60)],
        "strategyqa": [{"input": f"is the {rng.choice(WORDS)} good ?",
                        "target_scores": {"Yes": i % 2, "No": 1 - i % 2}, "target": "yes ."} for i in range(60)],
        "e2e-nlg": [{"input": f"name: {rng.choice(WORDS)} , area: city centre",
                     "target": f"a {rng.choice(WORDS)} coffee shop in the city centre ."} for _ in range(80)],
    }
    path = tmp_path_factory.mktemp("bigbench") / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, examples in tasks.items():
            data = json.dumps({"name": name, "examples": examples}).encode()
            info = tarfile.TarInfo("bigbench-1.0.0/" + MEMBER_ROOT + BIGBENCH_TASKS[name] + "/task.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def bigbench_env(tiny_bigbench, tmp_path, monkeypatch):
    """Point the task loader at the tiny archive and a fresh cache."""
    monkeypatch.setenv("DUALLORA_BIGBENCH_ARCHIVE", str(tiny_bigbench))
    monkeypatch.setenv("DUALLORA_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ----------------------------------------------------------------------------- runs of several processes
# AdamW's update of an element is lr * m_hat / (sqrt(v_hat) + eps). By Cauchy-Schwarz, |m| / sqrt(v) <= (1 - b1) /
# sqrt((1 - b2) (1 - b1^2 / b2)) = 7.3 for b1 = 0.9, b2 = 0.999, whatever the gradients, and the bias corrections
# multiply that by sqrt(1 - b2^t) / (1 - b1^t) <= 1. Where a gradient is a near-cancellation its sign is rounding's,
# so two runs whose gradients differ by rounding can drift apart by up to 2 x 7.3 x lr per step: weights after AdamW
# are held to that; losses and gradients, which such an element barely moves, to the reorder bound.
ADAMW_UPDATE_BOUND = 0.1 / (0.001 * (1 - 0.81 / 0.999)) ** 0.5


@pytest.fixture(scope="session")
def bert_without_dropout(tiny_checkpoints, tmp_path_factory) -> Path:
    """The tiny BERT with dropout off: one process on 2b examples and two on b each draw different dropout masks,
    so only a dropout-free model can give the same adapter."""
    directory = tmp_path_factory.mktemp("bert-no-dropout")
    shutil.copytree(tiny_checkpoints["bert"], directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def run_flags(model_dir, tiny_csv, out, batch_size, method="dual", max_steps=6):
    """`duallora train` flags of the multi-process comparisons: the tiny classifier on the tiny CSV, AdamW at 5e-3,
    an evaluation and a checkpoint every 3 steps."""
    return ["--method", method, "--model", str(model_dir), "--task", str(tiny_csv),
            "--text-column", "text", "--label-column", "label", "--output-dir", str(out), "--max-length", "16",
            "--batch-size", str(batch_size), "--lr", "5e-3", "--max-steps", str(max_steps), "--eval-every", "3",
            "--save-every", "3", "--max-eval-examples", "23", "--warmup-steps", "2", "--rank", "4"]


def max_difference(a: Path, b: Path) -> float:
    """The largest difference between the adapters saved in two run directories."""
    from safetensors.torch import load_file

    wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def adamw_bound(lr: float, steps: int) -> float:
    """How far two AdamW runs from the same weights can drift apart when their gradients differ by rounding."""
    return 2 * ADAMW_UPDATE_BOUND * lr * steps


def assert_same_losses(a: list[float], b: list[float]) -> None:
    torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=FLOAT32_REORDER_RTOL, atol=0.0)


def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Every scalar in the TensorBoard event files under ``folder``, by tag: ``[(step, value), ...]``. The files are
    TFRecords (a little-endian u64 length, its crc, the bytes, their crc) of ``Event`` protos, read with
    tensorboardX's own proto definitions, so what is checked is what TensorBoard would show."""
    import struct

    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).rglob("events.out.tfevents.*")):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars

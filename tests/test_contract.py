"""The differential contract against peft's LoRA: every operation, in every state, for LoRA, Dual LoRA and D2-LoRA.

The rule, for each (operation, state):

- the operation runs on LoRA first, on a model in that state, and is classed: it *works* (no error and its own
  check holds: e.g. the merged outputs equal the unmerged ones), it is *refused* (it raises), or it is *silently
  wrong* (no error, its check fails);
- where LoRA works, both methods must work and pass the same check (against their own maths: a dense model holding
  ``W0 + dW`` from each method's ``get_delta_weight``);
- where LoRA refuses or is silently wrong, each method must refuse with a clear error (a ValueError, TypeError or
  RuntimeError naming the problem, not a KeyError from deep inside) or, where it was made to work, pass the check;
  such a pair is listed in EXTENSIONS with the reason, so that a change either way shows.

To grow it: a new state is a function ``(method, seed, where) -> Case`` in STATES; a new operation is a function
``(case, method, where) -> [(label, got, expected), ...]`` in OPERATIONS (raise for a refusal). Every new entry
joins every row and column; a pair that makes no sense for any method goes into NOT_APPLICABLE with the reason.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from conftest import FLOAT32_REORDER_RTOL, tiny_bert, tiny_llama, tiny_moe
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

import duallora
from duallora import D2LoraConfig, DualLoraConfig

METHODS = ("lora", "dual", "d2")
IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
CLEAR_ERRORS = (ValueError, TypeError, RuntimeError)
# a 4-bit base: the adapters read W0 dequantized, bitsandbytes' kernel computes the base rows with rounded weights
# (bfloat16 absmax on AVX512-BF16 CPUs, 2^-8 relative): the outputs agree within a few such roundings of their size
QUANTIZED_RTOL = 2.0**-6


def config(method: str, **kw):
    """One adapter, no dropout (the references are deterministic), Dual LoRA's warm-up off (dW as the factors say)."""
    kw = dict(r=4, lora_alpha=8, lora_dropout=0.0, **kw)
    if method == "lora":
        return LoraConfig(**kw)
    return DualLoraConfig(warmup_steps=0, **kw) if method == "dual" else D2LoraConfig(**kw)


def trained(model: nn.Module, seed: int) -> nn.Module:
    """Every trainable tensor (factors, a modules_to_save copy) at random values of a training run's scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# ----------------------------------------------------------------------------- the reference
def adapted_modules(model) -> list[tuple[str, BaseTunerLayer]]:
    return [(name, m) for name, m in model.named_modules()
            if isinstance(m, BaseTunerLayer) and not isinstance(m, AuxiliaryTrainingWrapper)]


def dense_reference(model: PeftModel) -> nn.Module:
    """The base model holding ``W0 + dW`` of the active adapter in every adapted place, as plain dense tensors (a 4-bit
    Linear becomes an ``nn.Linear`` of its dequantized weight), and the active modules_to_save copy."""
    from peft.utils.integrations import dequantize_bnb_weight

    twin = copy.deepcopy(model)
    updates = []
    for name, layer in adapted_modules(twin):
        held = getattr(layer, layer.adapter_layer_names[0])
        active = [a for a in layer.active_adapters if a in held]
        assert len(active) == 1 and not layer.merged, (name, active)  # the states keep one active, unmerged
        base = layer.get_base_layer()
        param = getattr(layer, "parameter_name", "weight")
        w0 = base._parameters[param] if param != "weight" else base.weight
        if type(base).__name__ == "Linear4bit":
            w0 = dequantize_bnb_weight(base.weight, state=base.weight.quant_state)
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        updates.append((key, param, (w0.detach().float() + layer.get_delta_weight(active[0]).float()).detach()))
    dense = twin.unload()
    for key, param, weight in updates:
        module = dense.get_submodule(key)
        if type(module).__name__ == "Linear4bit":
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            if module.bias is not None:
                linear.bias.data.copy_(module.bias.data.float())
            module = linear
            dense.set_submodule(key, linear)
        setattr(module, param, nn.Parameter(weight, requires_grad=False))
    return dense.eval()


def logits(model, ids=IDS, **kw) -> torch.Tensor:
    return model(input_ids=ids, **kw).logits.detach().float()


# ----------------------------------------------------------------------------- states
@dataclass
class Case:
    model: PeftModel
    reference: nn.Module  # W0 + dW, dense
    base: nn.Module  # the untouched base model
    rebuild_base: Callable[[], nn.Module]  # a fresh base (for loading)
    base_dir: Path
    quantized: bool = False
    auto_class: type = AutoModelForCausalLM
    heads: tuple = ()  # modules_to_save
    notes: list = field(default_factory=list)

    @property
    def rtol(self) -> float:
        return QUANTIZED_RTOL if self.quantized else FLOAT32_REORDER_RTOL


def _saved(where: Path, name: str, build: Callable[[], nn.Module]) -> Path:
    path = where / f"base-{name}"
    if not path.exists():
        build().save_pretrained(path)
    return path


def llama_case(method: str, seed: int, where: Path, **kw) -> Case:
    path = _saved(where, "llama", tiny_llama)

    def load():
        return AutoModelForCausalLM.from_pretrained(path).eval()

    model = trained(get_peft_model(load(), config(method, target_modules="all-linear", **kw)), seed)
    return Case(model, dense_reference(model), load(), load, path)


def fresh(method, seed, where):
    path = _saved(where, "llama", tiny_llama)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path).eval(),
                           config(method, target_modules="all-linear"))

    def load():
        return AutoModelForCausalLM.from_pretrained(path).eval()

    return Case(model, dense_reference(model), load(), load, path)


def merged(method, seed, where):
    case = llama_case(method, seed, where)
    case.model.merge_adapter()
    return case


def several_adapters(method, seed, where):
    case = llama_case(method, seed, where)
    case.model.add_adapter("other", config(method, target_modules="all-linear"))
    trained(case.model, seed + 100)  # both adapters' factors (the active one's again: the reference is rebuilt)
    case.model.set_adapter("default")
    case.reference = dense_reference(case.model)
    return case


def eval_cache_filled(method, seed, where):
    case = llama_case(method, seed, where)
    with torch.no_grad():
        case.model.eval()(input_ids=IDS)
    return case


def after_inference_mode(method, seed, where):
    case = llama_case(method, seed, where)
    with torch.inference_mode():
        case.model.eval()(input_ids=IDS)
    return case


def with_modules_to_save(method, seed, where):
    path = _saved(where, "bert", tiny_bert)

    def load():
        return AutoModelForSequenceClassification.from_pretrained(path).eval()

    model = trained(get_peft_model(load(), config(method, target_modules=["query", "value"],
                                                  modules_to_save=["classifier"])), seed)
    return Case(model, dense_reference(model), load(), load, path, auto_class=AutoModelForSequenceClassification,
                heads=("classifier",))


def quantized_after_base_call(method, seed, where):
    pytest.importorskip("bitsandbytes")
    path = _saved(where, "llama64", lambda: tiny_llama_64())

    def load():
        return AutoModelForCausalLM.from_pretrained(
            path, quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")).eval()

    model = trained(get_peft_model(load(), config(method, target_modules="all-linear")), seed)
    reference = dense_reference(model)
    with torch.no_grad(), model.disable_adapter():  # the base-only call (repacks on an AVX512-BF16 CPU)
        model.eval()(input_ids=IDS)
    return Case(model, reference, load(), load, path, quantized=True)


def tiny_llama_64() -> nn.Module:
    """conftest's tiny LLaMA at widths of whole 4-bit quantization blocks (64)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                        max_position_embeddings=64)).eval()


def expert_stacks(method, seed, where):
    path = _saved(where, "mixtral", lambda: tiny_moe("mixtral"))

    def load():
        return AutoModelForCausalLM.from_pretrained(path).eval()

    model = trained(get_peft_model(load(), config(method, target_modules=["q_proj"],
                                                  target_parameters=["gate_up_proj", "down_proj"])), seed)
    return Case(model, dense_reference(model), load(), load, path)


STATES = {
    "fresh": fresh,
    "trained": llama_case,
    "merged": merged,
    "several adapters": several_adapters,
    "eval cache filled": eval_cache_filled,
    "after inference_mode": after_inference_mode,
    "modules_to_save": with_modules_to_save,
    "4-bit after a base-only call": quantized_after_base_call,
    "expert stacks": expert_stacks,
}


# ----------------------------------------------------------------------------- operations
def merged_now(case) -> bool:
    return any(m.merged for _, m in adapted_modules(case.model))


def forward_train(case, method, where):
    case.model.train()
    with torch.no_grad():
        return [("train-mode logits", logits(case.model), logits(case.reference))]


def forward_eval(case, method, where):
    return [("eval logits", logits(case.model.eval()), logits(case.reference))]


def forward_no_grad(case, method, where):
    with torch.no_grad():
        return [("no_grad logits", logits(case.model.eval()), logits(case.reference))]


def forward_inference_mode(case, method, where):
    with torch.inference_mode():
        got = logits(case.model.eval())
    return [("inference_mode logits", got.clone(), logits(case.reference))]


def input_gradient_frozen(case, method, where):
    """A frozen adapter, the gradient w.r.t. the input embeddings (saliency, adversarial inputs)."""
    def gradient(model):
        model.eval().requires_grad_(False)
        embeds = model.get_input_embeddings()(IDS).detach().float().requires_grad_()
        model(inputs_embeds=embeds).logits.float().square().sum().backward()
        return embeds.grad

    return [("input gradient", gradient(case.model), gradient(case.reference))]


def merge(case, method, where):
    case.model.merge_adapter()
    return [("merged logits", logits(case.model.eval()), logits(case.reference), merge_rtol(case))]


def unmerge(case, method, where):
    if not merged_now(case):
        case.model.merge_adapter()
    case.model.unmerge_adapter()
    return [("unmerged logits", logits(case.model.eval()), logits(case.reference))]


def merge_and_unload(case, method, where):
    dense = case.model.merge_and_unload()
    return [("merge_and_unload logits", logits(dense.eval()), logits(case.reference), merge_rtol(case)),
            ("no adapter left", adapted_modules(dense) == [], True)]


def unload(case, method, where):
    """The wrappers removed, nothing merged: the base model (a merge made before stays in the weights, as peft
    documents)."""
    if merged_now(case):
        rtol = merge_rtol(case)
        return [("unload logits, merged before", logits(case.model.unload().eval()), logits(case.reference), rtol)]
    return [("unload logits", logits(case.model.unload().eval()), logits(unloaded(case)))]


def save_and_load(case, method, where):
    case.model.save_pretrained(where / "adapter")
    loaded = PeftModel.from_pretrained(case.rebuild_base(), where / "adapter")
    return [("loaded logits", logits(loaded.eval()), logits(case.reference))]


def auto_model_on_the_adapter_folder(case, method, where):
    case.model.peft_config["default"].base_model_name_or_path = str(case.base_dir)
    case.model.save_pretrained(where / "adapter")
    kw = ({"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")}
          if case.quantized else {})
    loaded = case.auto_class.from_pretrained(where / "adapter", **kw)
    return [("AutoModel logits", logits(loaded.eval()), logits(case.reference))]


LOAD = "from transformers import AutoModelForCausalLM\nfrom peft import PeftModel"
IMPORT_ORDERS = {  # the first import of each script; none imports duallora
    "transformers first": "import transformers\n" + LOAD,
    "trl first": "import trl\n" + LOAD,
    "peft first": "from peft import PeftModel\n" + LOAD,
}
FRESH_PROCESS = """
import sys, torch
{imports}
base_dir, adapter_dir, ids_file, out_file = sys.argv[1:5]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()
with torch.no_grad():
    torch.save(model(input_ids=torch.load(ids_file)).logits, out_file)
"""


def fresh_processes(case, method, where):
    """The adapter opened in new processes, one per import order a script is written in; none imports duallora
    (its import hook registers it with peft)."""
    case.model.save_pretrained(where / "adapter")
    torch.save(IDS, where / "ids.pt")
    runs = {}
    for order, imports in IMPORT_ORDERS.items():
        out = where / f"{order.replace(' ', '-')}.pt"
        command = [sys.executable, "-c", FRESH_PROCESS.format(imports=imports), str(case.base_dir),
                   str(where / "adapter"), str(where / "ids.pt"), str(out)]
        runs[order] = (subprocess.Popen(command, stderr=subprocess.PIPE, text=True), out)
    results = []
    for order, (process, out) in runs.items():
        _, stderr = process.communicate(timeout=300)
        if process.returncode:
            raise RuntimeError(f"{order}: {stderr.strip().splitlines()[-1] if stderr.strip() else 'failed'}")
        results.append((f"{order} logits", torch.load(out).float(), logits(case.reference)))
    return results


def add_weighted_adapter(case, method, where):
    case.model.add_weighted_adapter(["default"], [1.0], "combined", combination_type="cat")
    case.model.set_adapter("combined")
    return [("one adapter x 1.0", logits(case.model.eval()), logits(case.reference))]


def hotswap_adapter(case, method, where):
    """The trained adapter swapped into a model in the same state holding other values."""
    from peft.utils.hotswap import hotswap_adapter as lora_hotswap

    case.model.save_pretrained(where / "adapter")
    other = STATES[case.notes[0]](method, 1, where)
    if method == "lora":
        lora_hotswap(other.model, str(where / "adapter"), adapter_name="default")
    else:
        duallora.hotswap_adapter(other.model, str(where / "adapter"))
    return [("swapped logits", logits(other.model.eval()), logits(case.reference))]


def mixed_batch(case, method, where):
    names = ["default", "__base__"]
    with torch.no_grad():
        got = logits(case.model.eval(), adapter_names=names)
    return [("adapter row", got[0], logits(case.reference)[0]), ("base row", got[1], logits(case.base)[1])]


def disable_adapter(case, method, where):
    case.model.eval()
    with case.model.disable_adapter():
        inside = logits(case.model)
    return [("disabled", inside, logits(case.base)), ("enabled again", logits(case.model), logits(case.reference))]


def set_and_delete_adapter(case, method, where):
    case.model.add_adapter("extra", copy.deepcopy(case.model.peft_config["default"]))
    case.model.set_adapter("extra")
    case.model.set_adapter("default")
    case.model.delete_adapter("extra")
    return [("after set and delete", logits(case.model.eval()), logits(case.reference)),
            ("deleted", "extra" in case.model.peft_config, False)]


def state_dict_round_trip(case, method, where):
    """The adapter's state dict into a model in the same state holding other values."""
    state = get_peft_model_state_dict(case.model)
    other = STATES[case.notes[0]](method, 1, where)
    set_peft_model_state_dict(other.model, state)
    return [("loaded state dict", logits(other.model.eval()), logits(case.reference))]


def requires_grad(case, method, where):
    trainable = {n for n, p in case.model.named_parameters() if p.requires_grad}
    adapter_only = all(("lora_" in n or "modules_to_save" in n) for n in trainable)
    return [("only adapter tensors train", adapter_only and bool(trainable), True)]


OPERATIONS = {
    "forward (train)": forward_train,
    "forward (eval)": forward_eval,
    "forward (no_grad)": forward_no_grad,
    "forward (inference_mode)": forward_inference_mode,
    "input gradient, frozen adapter": input_gradient_frozen,
    "merge": merge,
    "unmerge": unmerge,
    "merge_and_unload": merge_and_unload,
    "unload": unload,
    "save, PeftModel.from_pretrained": save_and_load,
    "AutoModel on the adapter folder": auto_model_on_the_adapter_folder,
    "fresh process, each import order": fresh_processes,
    "add_weighted_adapter": add_weighted_adapter,
    "hotswap_adapter": hotswap_adapter,
    "mixed batch": mixed_batch,
    "disable_adapter": disable_adapter,
    "set_adapter, delete_adapter": set_and_delete_adapter,
    "get/set_peft_model_state_dict": state_dict_round_trip,
    "requires_grad": requires_grad,
}


def merge_rtol(case) -> float:
    """The tolerance of a merge's outputs against the dense reference: on a 4-bit base a merge quantizes ``W0 + dW``
    again (peft's rule for bitsandbytes layers, LoRA's and ours), which moves the outputs by what that rounding costs;
    measured here on the reference itself (quantized again with the base's settings), twice over for the two sides,
    plus the base reading's tolerance."""
    if not case.quantized:
        return case.rtol
    import bitsandbytes.functional as bnbf

    twin = copy.deepcopy(case.reference)
    quantized = {n for n, m in case.base.named_modules() if type(m).__name__ == "Linear4bit"}
    with torch.no_grad():
        for name, module in twin.named_modules():
            if name in quantized:
                packed, state = bnbf.quantize_4bit(module.weight.data, quant_type="nf4")
                module.weight.copy_(bnbf.dequantize_4bit(packed, state))
    expected = logits(case.reference)
    rounding = ((logits(twin) - expected).abs().max() / expected.abs().max()).item()
    return 2 * rounding + case.rtol


def unloaded(case) -> nn.Module:
    """What ``unload()`` gives back, as peft defines it: the base weights, and the trained copy of each
    modules_to_save module."""
    plain = copy.deepcopy(case.base)
    for name in case.heads:
        plain.set_submodule(name, copy.deepcopy(case.reference.get_submodule(name)))
    return plain


# pairs that make no sense for any method, with the reason
NOT_APPLICABLE = {
    ("fresh process, each import order", state): "the import order does not depend on the state; run on 'trained'"
    for state in STATES if state != "trained"
} | {
    ("mixed batch", "modules_to_save"): "a classifier head: covered by tests/test_mixed_batch.py",
}
# where LoRA refuses or is silently wrong and ours works, by design (each fixed or built on purpose)
EXTENSIONS = {
    ("mixed batch", "expert stacks"): "LoRA refuses mixed batches on target_parameters; ours splits the tokens by row",
    ("add_weighted_adapter", "modules_to_save"): "LoRA gives the new adapter the untrained head; ours copies it",
    ("add_weighted_adapter", "expert stacks"): "LoRA refuses target_parameters; ours combines expert stacks exactly",
    ("hotswap_adapter", "modules_to_save"): "LoRA's hotswap fails on the head's keys (KeyError); ours swaps it too",
    # on a CPU with AVX512-BF16 the base-only call repacks the 4-bit weights for bitsandbytes' CPU kernel (elsewhere
    # LoRA works in these rows, and the entries are not used)
    ("input gradient, frozen adapter", "4-bit after a base-only call"):
        "LoRA's input gradient goes through bitsandbytes' backward, which reads a repacked weight as if it were not",
    **{(operation, "4-bit after a base-only call"): "LoRA's merge dequantizes a repacked weight as if it were not"
       for operation in ("merge", "unmerge", "merge_and_unload")},
    ("hotswap_adapter", "4-bit after a base-only call"):
        "bitsandbytes' state_dict() (the save) leaves a repacked weight's absmax transposed; ours mends it",
    ("get/set_peft_model_state_dict", "4-bit after a base-only call"):
        "bitsandbytes' state_dict() leaves a repacked weight's absmax transposed; ours mends it",
}


@dataclass
class Outcome:
    kind: str  # "works", "refused", "silently wrong"
    detail: str
    error: Optional[BaseException] = None


def run(operation: str, state: str, method: str, where: Path) -> Outcome:
    where.mkdir(parents=True, exist_ok=True)
    case = STATES[state](method, 0, where)
    case.notes.append(state)
    try:
        results = OPERATIONS[operation](case, method, where)
    except Exception as error:  # noqa: BLE001 (classified: the rule compares it with LoRA's)
        return Outcome("refused", f"{type(error).__name__}: {str(error)[:300]}", error)
    wrong = [label for label, got, expected, *rtol in results if not agrees(got, expected, *(rtol or [case.rtol]))]
    return Outcome("silently wrong" if wrong else "works", ", ".join(wrong))


def agrees(got, expected, rtol: float) -> bool:
    if isinstance(expected, torch.Tensor):
        if got.shape != expected.shape:
            return False
        return bool(((got - expected).abs().max() <= rtol * expected.abs().max()).item())
    return got == expected


PAIRS = [(operation, state) for operation in OPERATIONS for state in STATES
         if (operation, state) not in NOT_APPLICABLE]


@pytest.mark.parametrize(("operation", "state"), PAIRS, ids=[f"{o} | {s}" for o, s in PAIRS])
def test_the_methods_keep_loras_contract(operation, state, tmp_path):
    lora = run(operation, state, "lora", tmp_path / "lora")
    for method in ("dual", "d2"):
        ours = run(operation, state, method, tmp_path / method)
        where = f"{operation} in state {state!r}, {method} (LoRA: {lora.kind} {lora.detail})"
        if ours.kind == "refused":
            assert isinstance(ours.error, CLEAR_ERRORS), f"{where}: crashed instead of refusing: {ours.detail}"
            assert lora.kind != "works", f"{where}: refused what LoRA does: {ours.detail}"
            assert (operation, state) not in EXTENSIONS, f"{where}: refused, though listed as an extension"
        elif ours.kind == "silently wrong":
            pytest.fail(f"{where}: silently wrong: {ours.detail}")
        elif lora.kind != "works":
            assert (operation, state) in EXTENSIONS, f"{where}: works where LoRA does not: list it in EXTENSIONS"

"""Adapters load in a process that never wrote ``import duallora`` (duallora_autoload), the switch that turns that
off, what it costs at start-up, the model card that says how to load an adapter, and bitsandbytes' one quieted
message."""

import logging
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from conftest import METHODS, tiny_llama, trained_like
from peft import get_peft_model

import duallora_autoload
from duallora.core.model_card import SECTION_START

# Each path a user opens an adapter by. The script never imports duallora; it checks that duallora came in with peft.
LOAD_WITHOUT_IMPORT = """
import sys
import torch
assert "duallora" not in sys.modules
from transformers import AutoModelForCausalLM
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel
base_dir, adapter_dir, expected_file = sys.argv[1:4]
ids, expected = torch.load(expected_file)
assert "duallora" in sys.modules, "importing peft did not register duallora"
print("config", type(PeftConfig.from_pretrained(adapter_dir)).__name__)

def check(path, model):
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, expected), path
    print("loaded by", path)

base = AutoModelForCausalLM.from_pretrained(base_dir)
check("PeftModel.from_pretrained", PeftModel.from_pretrained(base, adapter_dir))
check("AutoPeftModelForCausalLM", AutoPeftModelForCausalLM.from_pretrained(adapter_dir))
check("AutoModelForCausalLM(adapter folder)", AutoModelForCausalLM.from_pretrained(adapter_dir))
base = AutoModelForCausalLM.from_pretrained(base_dir)
base.load_adapter(adapter_dir)
check("load_adapter", base)
"""

LOADING_PATHS = ("PeftModel.from_pretrained", "AutoPeftModelForCausalLM", "AutoModelForCausalLM(adapter folder)",
                 "load_adapter")


def fresh_python(code: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter of this venv, started from a folder outside the repository (no conftest)."""
    environment = {key: value for key, value in os.environ.items() if key != "DUALLORA_NO_AUTOLOAD"}
    environment.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=600,
                          cwd="/", env=environment)


def saved_adapter(tmp_path: Path, method: str) -> tuple[Path, Path, Path]:
    """A tiny base saved as a checkpoint, a trained-like adapter on it, and (ids, the adapter's logits)."""
    base_dir, adapter_dir, expected_file = tmp_path / "base", tmp_path / "adapter", tmp_path / "expected.pt"
    tiny_llama().save_pretrained(base_dir)
    from transformers import AutoModelForCausalLM

    model = trained_like(get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                                        METHODS[method](r=4, target_modules="all-linear", task_type="CAUSAL_LM")))
    model.save_pretrained(adapter_dir)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.save((ids, model.eval()(ids).logits), expected_file)
    return base_dir, adapter_dir, expected_file


@pytest.mark.slow
@pytest.mark.parametrize("method", ["dual", "d2"])
def test_an_adapter_loads_exactly_by_every_path_in_a_process_that_never_imports_duallora(tmp_path, method):
    result = fresh_python(LOAD_WITHOUT_IMPORT, *map(str, saved_adapter(tmp_path, method)))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"config {'DualLoraConfig' if method == 'dual' else 'D2LoraConfig'}" in result.stdout
    for path in LOADING_PATHS:
        assert f"loaded by {path}" in result.stdout


def test_the_switch_turns_the_registration_off():
    probe = "import sys, peft; print('duallora' in sys.modules)"
    assert fresh_python(probe).stdout.split() == ["True"]
    assert fresh_python(probe, env={"DUALLORA_NO_AUTOLOAD": "1"}).stdout.split() == ["False"]


def test_start_up_loads_one_small_module_and_nothing_else():
    """What the .pth costs a Python that never uses peft: the modules it loads (timings: benchmarks/startup.py)."""
    start_up = set(fresh_python("import sys; print(' '.join(sorted(sys.modules)))").stdout.split())
    assert "duallora_autoload" in start_up and not {"torch", "peft", "transformers", "logging"} & start_up
    no_site = ("import sys; sys.path.insert(0, sys.argv[1]); before = set(sys.modules)\n"
               "import duallora_autoload\nprint(' '.join(sorted(set(sys.modules) - before)))")
    result = subprocess.run([sys.executable, "-S", "-c", no_site, str(Path(duallora_autoload.__file__).parent)],
                            capture_output=True, text=True, timeout=60)
    loaded_by_the_module = set(result.stdout.split())
    assert "duallora_autoload" in loaded_by_the_module, result.stderr
    assert loaded_by_the_module - {"duallora_autoload"} <= start_up - {"duallora_autoload"}  # what Python had anyway


def test_the_pth_that_runs_the_hook_is_installed_beside_the_packages():
    """The editable install this venv has (scripts/install.sh); the wheel's is in test_install.py."""
    pth = Path(sysconfig.get_paths()["purelib"], "duallora-autoload.pth")
    assert pth.read_text().strip() == "import duallora_autoload"


def test_a_failing_registration_warns_and_peft_still_imports():
    code = "import sys; sys.modules['duallora'] = None\nimport peft\nprint('peft', peft.__version__)"
    result = fresh_python(code)
    assert result.returncode == 0 and "peft " in result.stdout, result.stderr
    assert "duallora is installed but could not register Dual LoRA and D2-LoRA with peft" in result.stderr
    assert "DUALLORA_NO_AUTOLOAD=1" in result.stderr


# The orders users write scripts in: each looks peft up (importlib.util.find_spec, as transformers'
# is_peft_available() in every from_pretrained and `import trl` do) before peft is imported.
ORDER_SCRIPT = """
import sys
import torch
base_dir, adapter_dir, expected_file, order = sys.argv[1:5]
ids, expected = torch.load(expected_file)
if order == "find_spec first":
    import importlib.util
    assert importlib.util.find_spec("peft") is not None and "peft" not in sys.modules
if order == "trl first":
    import trl  # noqa: F401
if order == "transformers' integrations first":  # they import peft while transformers.trainer_utils initialises
    from transformers.integrations import integration_utils  # noqa: F401
from transformers import AutoModelForCausalLM
if order == "adapter folder alone":
    model = AutoModelForCausalLM.from_pretrained(adapter_dir)
else:
    base = AutoModelForCausalLM.from_pretrained(base_dir)  # looks peft up before anything imports it
    from peft import PeftModel
    model = PeftModel.from_pretrained(base, adapter_dir)
assert "duallora" in sys.modules
with torch.no_grad():
    assert torch.equal(model.eval()(ids).logits, expected)
print("loaded", order)
"""


@pytest.mark.slow
@pytest.mark.parametrize("order", ["transformers first", "find_spec first", "trl first",
                                   "transformers' integrations first", "adapter folder alone"])
def test_an_adapter_loads_in_every_import_order(tmp_path, order):
    result = fresh_python(ORDER_SCRIPT, *map(str, saved_adapter(tmp_path, "dual")), order)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {order}" in result.stdout


@pytest.mark.parametrize("value, registered", [("", True), ("0", True), ("false", True), ("No", True), ("off", True),
                                               ("1", False), ("true", False), ("YES", False), ("on", False)])
def test_the_switch_reads_the_words_people_write(value, registered):
    probe = "import sys, peft; print('duallora' in sys.modules)"
    result = fresh_python(probe, env={"DUALLORA_NO_AUTOLOAD": value})
    assert result.stdout.split() == [str(registered)] and "DUALLORA_NO_AUTOLOAD" not in result.stderr


def test_an_unknown_switch_value_is_taken_as_off_and_said():
    result = fresh_python("import sys, peft; print('duallora' in sys.modules)", env={"DUALLORA_NO_AUTOLOAD": "maybe"})
    assert result.stdout.split() == ["False"]
    said = "DUALLORA_NO_AUTOLOAD='maybe' is not 1/true/yes/on or 0/false/no/off; taken as switched off."
    assert said in result.stderr


@pytest.mark.parametrize("method", ["dual", "d2"])
def test_the_model_card_names_the_method_and_its_snippet_loads_the_adapter(tmp_path, method):
    base_dir, adapter_dir, expected_file = saved_adapter(tmp_path, method)
    card = (adapter_dir / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card  # peft's card, kept
    assert card.count(SECTION_START) == 1 and "pip install duallora" in card
    assert f"**{'Dual LoRA' if method == 'dual' else 'D2-LoRA'}** adapter" in card
    snippet = card.split("```python\n", 1)[1].split("```", 1)[0]
    assert f'"{base_dir}"' in snippet and f'"{adapter_dir}"' in snippet
    namespace = {}
    exec(snippet, namespace)
    ids, expected = torch.load(expected_file)
    with torch.no_grad():
        assert torch.equal(namespace["model"].eval()(ids).logits, expected)


def test_saving_again_rewrites_the_section_in_place(tmp_path):
    model = get_peft_model(tiny_llama(), METHODS["d2"](r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path)
    first = (tmp_path / "README.md").read_text()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == first


def test_only_the_missing_kernels_message_of_bitsandbytes_is_dropped():
    def record(cause):
        return logging.LogRecord(duallora_autoload.KERNELS_LOGGER, logging.WARNING, "ops.py", 1,
                                 "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure",
                                 (cause,), None)

    missing = ModuleNotFoundError("No module named 'kernels'", name="kernels")
    assert not duallora_autoload.keep_record(record(missing))
    assert duallora_autoload.keep_record(record(OSError("the Hub cannot be reached")))  # kernels there, failing
    assert duallora_autoload.keep_record(record(ModuleNotFoundError("No module named 'x'", name="x")))


def test_importing_peft_prints_no_bitsandbytes_kernels_message():
    """On AVX512-BF16 CPUs bitsandbytes logs it at import (elsewhere it never does, and this passes either way)."""
    code = ("import logging, peft, bitsandbytes, duallora_autoload\n"
            "print(duallora_autoload.keep_record in logging.getLogger(duallora_autoload.KERNELS_LOGGER).filters)")
    result = fresh_python(code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"] and "gemm_4bit_forward" not in result.stderr

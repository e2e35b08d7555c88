"""`pip install duallora` alone (no extras) gives a working library, and only the library."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

LIBRARY_USE = """
import torch
from peft import PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
import duallora
from duallora import D2LoraConfig, DualLoraConfig

def base():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=64)).eval()

ids = torch.randint(0, 64, (2, 9))
for config in (DualLoraConfig(r=4, target_modules="all-linear", warmup_steps=1),
               D2LoraConfig(r=4, target_modules="all-linear")):
    model = get_peft_model(base(), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    with torch.no_grad():
        expected = model(ids).logits
    model.save_pretrained("adapter")
    loaded = PeftModel.from_pretrained(base(), "adapter")
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, expected)
        merged = loaded.merge_and_unload(safe_merge=True)
        assert (merged(ids).logits - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (expected - base()(ids).logits).abs().max() > 1e-4  # it learned something
    print(type(config).__name__, "trains, saves, loads and merges")
try:
    import matplotlib  # noqa: F401
except ImportError:
    print("no matplotlib")
"""


@pytest.mark.slow
def test_the_library_alone_installs_and_works_in_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = str(venv / "bin" / "python")

    def pip(*args):
        result = subprocess.run([python, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), *args],
                                capture_output=True, text=True, timeout=1200)
        assert result.returncode == 0, result.stderr[-3000:]

    pip("torch")  # first and pinned: the CPU build on this machine's disk (constraints.txt)
    # the very build this suite runs on (here 2.13.0+cpu from the machine's wheel folder), not PyPI's CUDA build with
    # its nvidia packages: pip finds the folder through PIP_FIND_LINKS, which scripts/test.sh exports even under env -i
    fresh = subprocess.run([python, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True,
                           timeout=300)
    assert fresh.stdout.strip() == torch.__version__, (
        f"a fresh venv got torch {fresh.stdout.strip()!r}, this suite runs {torch.__version__!r}: pip did not find "
        "the machine's wheel folder (run the tests through scripts/test.sh, or set PIP_FIND_LINKS)")
    pip(str(ROOT))
    result = subprocess.run([python, "-c", LIBRARY_USE], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert result.stdout.count("trains, saves, loads and merges") == 2 and "no matplotlib" in result.stdout
    # the wheel carries the .pth that registers the methods on `import peft` (the editable one: test_autoload.py)
    autoload = subprocess.run([python, "-c", "import sys, peft; print('duallora' in sys.modules)"],
                              capture_output=True, text=True, timeout=300, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"})
    assert autoload.stdout.split() == ["True"], autoload.stderr[-3000:]
    command = subprocess.run([str(venv / "bin" / "duallora"), "train", "--help"], capture_output=True, text=True,
                             timeout=300)
    assert command.returncode == 2 and "pip install 'duallora[cli]'" in command.stderr

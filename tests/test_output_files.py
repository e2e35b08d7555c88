"""What the command line and the exports write: complete files or none, with the permissions the umask gives
(``mkdtemp`` makes directories 0700 and safetensors writes files 0600, for peft too), and an honest LoRA ``r``."""

import os
import stat

import pytest
import torch
from conftest import METHODS, tiny_llama, trained_like
from peft import get_peft_model
from safetensors.torch import save_file

import duallora
from duallora.app.run_files import publish_weights
from duallora.core.atomic import atomic_dir


@pytest.fixture(params=[0o022, 0o077, 0o002])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def modes(root):
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in [root, *root.rglob("*")]}


def test_atomic_directories_follow_the_umask(tmp_path, umask):
    def write(directory):
        save_file({"w": torch.zeros(2)}, directory / "weights.safetensors")  # written 0600 by safetensors
        (directory / "sub").mkdir()
        (directory / "sub" / "notes.txt").write_text("x")

    atomic_dir(tmp_path / "out", write)
    got = modes(tmp_path / "out")
    assert got["."] == got["sub"] == 0o777 & ~umask
    assert got["weights.safetensors"] == got["sub/notes.txt"] == 0o666 & ~umask


def test_a_run_adapter_and_a_lora_export_follow_the_umask(tmp_path, umask):
    model = trained_like(get_peft_model(tiny_llama(), METHODS["dual"](r=4, target_modules="all-linear")))
    (tmp_path / "run").mkdir()
    publish_weights(model, tmp_path / "run")
    assert modes(tmp_path / "run")["adapter_model.safetensors"] == 0o666 & ~umask
    duallora.save_as_lora(tmp_path / "lora", model, rank=4)
    exported = modes(tmp_path / "lora")
    assert exported["."] == 0o777 & ~umask and exported["adapter_model.safetensors"] == 0o666 & ~umask


def test_the_lora_export_writes_the_largest_rank_it_used_as_r(tmp_path):
    model = trained_like(get_peft_model(tiny_llama(), METHODS["d2"](r=4, target_modules="all-linear")))
    with pytest.warns(UserWarning, match=r"rank=100000 exceeds every layer's full rank.*r is 32"):
        config, _, errors = duallora.convert_to_lora(model, rank=100000)
    assert config.r == config.lora_alpha == 32 == max(e["rank"] for e in errors)  # tiny LLaMA: 32 wide at most
    assert all(config.rank_pattern.get(k, config.r) <= 32 for k in config.rank_pattern)
    config, _, _ = duallora.convert_to_lora(model, rank=8)
    assert config.r == 8 and not config.rank_pattern


def test_a_target_that_matches_nothing_is_not_called_excluded():
    from conftest import tiny_bert

    with pytest.raises(ValueError) as caught:
        get_peft_model(tiny_bert(), METHODS["dual"](target_modules=["foo_proj"], modules_to_save=["classifier"]))
    assert "matched no module" in str(caught.value) and "excluded" not in str(caught.value)

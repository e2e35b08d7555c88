"""The adapters train under transformers.Trainer unchanged, warm-up clock included."""

import pytest
import torch
from conftest import tiny_bert
from peft import PeftModel, get_peft_model
from transformers import Trainer, TrainingArguments

from duallora import D2LoraConfig, DualLoraConfig, warmup_steps_taken


class TinyDataset(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 64, (n, 8), generator=g)
        self.labels = (self.ids[:, 0] % 3)  # learnable from the first token

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


@pytest.mark.parametrize("config", [DualLoraConfig(r=4, target_modules="all-linear", warmup_steps=4,
                                                   modules_to_save=["classifier"]),
                                    D2LoraConfig(r=4, target_modules="all-linear", modules_to_save=["classifier"])])
def test_trainer_trains_saves_and_counts_warmup(config, tmp_path):
    model = get_peft_model(tiny_bert(), config)
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=6,
                             gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], logging_steps=1,
                             save_strategy="no", use_cpu=True, disable_tqdm=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = Trainer(model=model, args=args, train_dataset=TinyDataset())
    trainer.train()
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)
    if isinstance(config, DualLoraConfig):
        assert warmup_steps_taken(model) == 6  # one per optimizer step, not per micro-batch
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path / "adapter")
    ids = TinyDataset().ids[:4]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


@pytest.mark.parametrize("with_callback", [True, False])
def test_the_warmup_callback_fits_an_auto_warm_up_to_the_trainers_run(with_callback, tmp_path):
    """10 optimizer steps (20 micro-batches): the callback gives warmup_steps = ceil(10 / 10) = 1, so the run ends at
    lam_t = 1; without it the adapter ramps over 100 steps, ends at lam_t = 0.1, and the user is told at the start."""
    import warnings

    from duallora import DualLoraWarmupCallback
    from duallora.dual.warmup import UnknownRunLengthWarning

    model = get_peft_model(tiny_bert(), DualLoraConfig(r=4, target_modules="all-linear",
                                                       modules_to_save=["classifier"]))
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, num_train_epochs=5,
                             gradient_accumulation_steps=2, learning_rate=1e-2, report_to=[], save_strategy="no",
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=TinyDataset(),
                      callbacks=[DualLoraWarmupCallback()] if with_callback else None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    told = [w for w in caught if issubclass(w.category, UnknownRunLengthWarning)]
    assert trainer.state.max_steps == 10 and warmup_steps_taken(model) == 10
    assert model.peft_config["default"].warmup_steps == (1 if with_callback else "auto")
    assert len(told) == (0 if with_callback else 1)
    layer = next(m for m in model.modules() if hasattr(m, "warmup_clocks"))
    lam = (layer.warmup_coef("default") / layer.dual_options["default"].scaling).item()
    assert lam == pytest.approx(1.0 if with_callback else 0.1, rel=1e-6)

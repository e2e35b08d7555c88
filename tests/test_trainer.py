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

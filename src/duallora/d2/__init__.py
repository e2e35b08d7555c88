"""D2-LoRA: a signed two-branch update with a per-unit norm projection (arXiv 2602.14728): its config, layer,
maths and PEFT tuner."""

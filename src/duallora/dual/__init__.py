"""Dual LoRA: ``dW = lam_t * s * ReLU(B A) * Sign(D C)`` (arXiv 2512.03402): its config, layer, maths, warm-up clock
and PEFT tuner."""

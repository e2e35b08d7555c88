"""The machinery both methods share: the adapted-layer base, the row-blocked memory-efficient linear, the fused
kernels, the config base, the PEFT tuner base and registration, and what the layers watch about tensors."""

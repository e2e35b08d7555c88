"""Configuration fields and checks shared by :class:`DualLoraConfig` and :class:`D2LoraConfig`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from .model_card import write_loading_section


def check_choice(field_name: str, value: str, valid: tuple[str, ...]) -> None:
    """Raise a ValueError naming the field and the valid names when ``value`` is not one of them."""
    if value not in valid:
        raise ValueError(f"`{field_name}` must be one of {list(valid)}; got {value!r}.")


def check_range(field_name: str, value, allowed: str, ok: bool) -> None:
    """Raise a ValueError naming the field and its allowed range when ``ok`` is False."""
    if not ok:
        raise ValueError(f"`{field_name}` must be {allowed}; got {value!r}.")


WEIGHT_GRAD_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class WeightAdapterConfig(PeftConfig):
    """PEFT's usual adapter fields, as ``LoraConfig`` names them, for adapters that rewrite a layer's weight."""

    r: int = field(default=8, metadata={"help": "Total rank budget of the adapter."})
    lora_alpha: float = field(default=16, metadata={"help": "Scale numerator of the update."})
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": "Module names (exact or suffix match), a regex string, or 'all-linear' (every Linear/Conv1D but "
            "the output layer)."
        },
    )
    target_parameters: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": "Parameters to adapt that a module reads itself, not through an nn.Linear: the experts of MoE "
            "models held as 3-D parameters (one matrix per expert, each with its own factors), a router's weight. "
            "Names as LoraConfig's: a full parameter key or a suffix of it, e.g. ['mlp.experts.gate_up_proj', "
            "'mlp.experts.down_proj']. Combines with target_modules."
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Only adapt the layers with these indices."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the ModuleList that `layers_to_transform` indexes, e.g. 'layers'."}
    )
    rank_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Per-module rank overrides: {regex or name: r}."}
    )
    alpha_pattern: Optional[dict] = field(
        default_factory=dict, metadata={"help": "Per-module alpha overrides: {regex or name: lora_alpha}."}
    )
    lora_dropout: float = field(
        default=0.0,
        metadata={
            "help": "Dropout on the adapter path's input. 0 keeps the forward a single matmul with the adapted "
            "weight; > 0 computes x W0^T + dropout(x) dW^T (two matmuls)."
        },
    )
    fan_in_fan_out: bool = field(
        default=False, metadata={"help": "True for layers that store their weight as (in, out), like GPT-2's Conv1D."}
    )
    bias: Literal["none", "all"] = field(
        default="none", metadata={"help": "Which biases to train: 'none' or 'all'."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules besides the adapted layers to train and save, e.g. a classifier."}
    )
    memory_efficient: bool = field(
        default=True,
        metadata={
            "help": "Use the hand-written backward that rebuilds the out x in matrices from the factors instead of "
            "keeping them between forward and backward. False runs plain autograd (more memory; a reference)."
        },
    )

    weight_grad_dtype: Optional[str] = field(
        default=None,
        metadata={
            "help": "dtype of the one extra matmul of the memory-efficient backward, G = g^T x (the full weight "
            "gradient the factors need). None: the compute dtype (float32, or bfloat16 under autocast). "
            "'bfloat16' makes it several times faster on CPUs and GPUs with bf16 units, at bf16 precision of the "
            "factor gradients."
        },
    )

    eval_cache: bool = field(
        default=True,
        metadata={
            "help": "In eval mode, build the adapted weight once and reuse it until a value it depends on changes (an "
            "unmerged model then runs one matmul per layer, like a merged one). It holds one extra copy of every "
            "adapted weight; it is off by itself where the weights are sharded (FSDP, DeepSpeed ZeRO-3). False: "
            "rebuild the weight on every call (as in training), no extra memory."
        },
    )

    block_mib: Optional[float] = field(
        default=16.0,
        metadata={
            "help": "Upper bound in MiB on each out x in matrix the memory-efficient path holds: dW, its weight "
            "gradient and the branch gradients are built for a block of output rows at a time, the rows chosen so "
            "that one block fits (a 4096 x 11008 float32 layer: 11 blocks at 16). None: whole matrices at once."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_parameters, str):
            raise ValueError(f"`target_parameters` must be a list of parameter names, not a string "
                             f"({self.target_parameters!r}): e.g. ['mlp.experts.gate_up_proj'] (regexes are not "
                             "supported, as in LoraConfig).")
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("`layers_to_transform` cannot be used when `target_modules` is a regex string.")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("`layers_pattern` needs `layers_to_transform` to be set as well.")
        self.check_rank("r", self.r)
        check_range("lora_alpha", self.lora_alpha, "> 0", _is_number(self.lora_alpha) and self.lora_alpha > 0)
        check_range("lora_dropout", self.lora_dropout, "in [0, 1)", 0 <= self.lora_dropout < 1)
        check_choice("bias", self.bias, ("none", "all"))
        if self.weight_grad_dtype is not None:
            check_choice("weight_grad_dtype", self.weight_grad_dtype, WEIGHT_GRAD_DTYPES)
        if self.block_mib is not None:
            check_range("block_mib", self.block_mib, "> 0 (or None: no blocking)",
                        _is_number(self.block_mib) and self.block_mib > 0)
        for key, rank in (self.rank_pattern or {}).items():
            self.check_rank(f"rank_pattern[{key!r}]", rank)
        for key, alpha in (self.alpha_pattern or {}).items():
            check_range(f"alpha_pattern[{key!r}]", alpha, "> 0", _is_number(alpha) and alpha > 0)

    def check_rank(self, field_name: str, rank) -> None:
        """Ranks are positive integers; methods with more structure narrow this."""
        check_range(field_name, rank, "a positive integer (>= 1)", isinstance(rank, int) and rank >= 1)

    def save_pretrained(self, save_directory: str, **kwargs) -> None:
        """Write adapter_config.json as peft does, and the model card's section that says how to load the adapter
        (its method, ``pip install duallora``, a snippet): peft alone cannot open it."""
        super().save_pretrained(save_directory, **kwargs)
        peft_type = getattr(self.peft_type, "value", self.peft_type)
        write_loading_section(save_directory, peft_type, getattr(self.task_type, "value", self.task_type),
                              self.base_model_name_or_path)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None, **kwargs):
        """Load the config and remember the directory, so the tuner can check the weights file against the base
        model before it changes the model (a bad file then leaves the model untouched)."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        path = os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
        if os.path.isdir(path):
            config._adapter_dir = path
        return config


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""hf_lora: LoRA adapters for Hugging Face models, peft-compatible files, no peft dependency.

cfg = hf_lora.LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.05)
model = hf_lora.get_lora_model(AutoModelForCausalLM.from_pretrained("gpt2"), cfg)
"""

from .config import LoRAConfig
from .dropout import peft_dropout_masks
from .errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterStateError,
    HubAccessError,
    LoRAError,
    TargetModulesError,
)
from .extract import extract_lora
from .hub import download_adapter, push_adapter_to_hub
from .layers import LoRALayer, ModulesToSave
from .model import LoRAModel, get_lora_model
from .optim import create_loraplus_optimizer
from .serialization import adapter_state_dict, read_adapter
from .targets import TARGET_MODULES
from .tokens import TokenRowsLayer
from .weights import delta_weight, merged_weight

__version__ = "0.1.0"


def __getattr__(name: str):
    # The Trainer pulls in much of transformers and accelerate: import it only when asked for.
    if name in ("LoRATrainer", "LoRATrainerMixin"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hf_lora' has no attribute {name!r}")


__all__ = [
    "TARGET_MODULES",
    "AdapterFormatError",
    "AdapterNotFoundError",
    "AdapterStateError",
    "HubAccessError",
    "LoRAConfig",
    "LoRAError",
    "LoRALayer",
    "LoRAModel",
    "LoRATrainer",
    "LoRATrainerMixin",
    "ModulesToSave",
    "TargetModulesError",
    "TokenRowsLayer",
    "adapter_state_dict",
    "create_loraplus_optimizer",
    "delta_weight",
    "download_adapter",
    "extract_lora",
    "get_lora_model",
    "merged_weight",
    "peft_dropout_masks",
    "push_adapter_to_hub",
    "read_adapter",
]

"""hf_lora: LoRA adapters for Hugging Face models, peft-compatible files, no peft dependency.

cfg = hf_lora.LoRAConfig(r=8, lora_alpha=16, lora_dropout=0.05)
model = hf_lora.get_lora_model(AutoModelForCausalLM.from_pretrained("gpt2"), cfg)
"""

from .adapter_files import adapter_state_dict
from .config import LoRAConfig
from .dropout import (  # (a line of its own: a test greps the package for imports of peft by their text)
    peft_dropout_masks,
)
from .errors import (
    AdapterFormatError,
    AdapterNotFoundError,
    AdapterStateError,
    HubAccessError,
    HubError,
    LoRAError,
    TargetModulesError,
)
from .extract import extract_lora
from .hotswap import hotswap_adapter, prepare_for_hotswap
from .hub import download_adapter, push_adapter_to_hub
from .layers import LoRALayer, ModulesToSave
from .loading import from_pretrained, load_adapter, set_adapter_state_dict
from .model import LoRAModel, get_lora_model
from .model_card import create_or_update_model_card
from .optim import create_loraplus_optimizer
from .quantized import dequantize, prepare_model_for_kbit_training
from .reading import read_adapter
from .serialization import save_pretrained
from .status import LayerStatus, ModelStatus, get_layer_status, get_model_status, set_requires_grad
from .targets import TARGET_MODULES
from .tokens import TokenRowsLayer
from .weighted import add_weighted_adapter
from .weights import delta_weight, merged_weight

__version__ = "0.1.0"

# Adapter I/O is a layer on top of the model (as huggingface_hub's ModelHubMixin is): the model never imports
# it, and its functions, which take the model first, become LoRAModel's methods here.
LoRAModel.save_pretrained = save_pretrained
LoRAModel.load_adapter = load_adapter
LoRAModel.from_pretrained = staticmethod(from_pretrained)  # LoRAModel.from_pretrained(base_model, path, ...)
LoRAModel.push_to_hub = push_adapter_to_hub
LoRAModel.create_or_update_model_card = create_or_update_model_card
LoRAModel.dequantize = dequantize  # (over transformers' own, which would drop the LoRA layers)
LoRAModel.add_weighted_adapter = add_weighted_adapter
LoRAModel.get_layer_status = get_layer_status
LoRAModel.get_model_status = get_model_status
LoRAModel.set_requires_grad = set_requires_grad


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
    "HubError",
    "LayerStatus",
    "LoRAConfig",
    "LoRAError",
    "LoRALayer",
    "LoRAModel",
    "LoRATrainer",
    "LoRATrainerMixin",
    "ModelStatus",
    "ModulesToSave",
    "TargetModulesError",
    "TokenRowsLayer",
    "adapter_state_dict",
    "create_loraplus_optimizer",
    "delta_weight",
    "download_adapter",
    "extract_lora",
    "get_layer_status",
    "get_lora_model",
    "get_model_status",
    "hotswap_adapter",
    "merged_weight",
    "peft_dropout_masks",
    "prepare_for_hotswap",
    "prepare_model_for_kbit_training",
    "push_adapter_to_hub",
    "read_adapter",
    "set_adapter_state_dict",
    "set_requires_grad",
]

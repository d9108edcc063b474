"""Quantised base models (QLoRA): preparing one for training, and dequantising one for an exact merge.

    model = AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(load_in_4bit=True))
    model = hf_lora.prepare_model_for_kbit_training(model)    # as peft's: fp32 norms, checkpointing
    model = hf_lora.get_lora_model(model, hf_lora.LoRAConfig(r=16, target_modules="all-linear"))
    ...train, save_pretrained...
    merged = model.dequantize().merge_and_unload()             # a full-precision model, merged exactly

Merging into the quantised weights themselves (`merge_and_unload()` on the quantised model) works as in
peft, but rounds the merged weights to 4 or 8 bits again, and says how much of the update that loses.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from .kinds import kind_of
from .layers import LoRALayer, lora_layer_class
from .model import LoRAModel

QUANTIZATION_METHODS_KEPT = ("gptq", "aqlm", "eetq", "torchao", "hqq")  # whose float params peft leaves alone


def prepare_model_for_kbit_training(
    model: nn.Module,
    use_gradient_checkpointing: bool = True,
    gradient_checkpointing_kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Prepare a quantised transformers model for LoRA training, as peft's function of the same name does:
    freeze every parameter, cast the float16/bfloat16 ones (norms, embeddings, head: whatever is not
    quantised) to float32 for stable training, and with `use_gradient_checkpointing` make the inputs
    require grad (reentrant checkpointing needs it with a frozen embedding) and turn checkpointing on.
    Call it before `get_lora_model`. Returns the model (changed in place)."""
    kwargs = dict(gradient_checkpointing_kwargs or {})
    method = getattr(model, "quantization_method", None)
    method = getattr(method, "value", method)
    quantised = bool(getattr(model, "is_loaded_in_8bit", False) or getattr(model, "is_loaded_in_4bit", False))
    quantised |= method in QUANTIZATION_METHODS_KEPT or bool(getattr(model, "hqq_quantized", False))
    for param in model.parameters():
        param.requires_grad_(False)
    if method not in QUANTIZATION_METHODS_KEPT and not getattr(model, "hqq_quantized", False):
        for param in model.parameters():
            if param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
                param.data = param.data.to(torch.float32)
    if quantised and use_gradient_checkpointing:
        if kwargs.get("use_reentrant", True):  # non-reentrant checkpointing needs no grad on its inputs
            if hasattr(model, "enable_input_require_grads"):
                model.enable_input_require_grads()
            else:
                model.get_input_embeddings().register_forward_hook(
                    lambda _m, _i, out: out.requires_grad_(True)
                )
        enable = model.gradient_checkpointing_enable
        takes_kwargs = "gradient_checkpointing_kwargs" in inspect.signature(enable).parameters
        enable(**({"gradient_checkpointing_kwargs": kwargs} if takes_kwargs else {}))
    return model


def dequantize_layer(layer: LoRALayer, dtype: torch.dtype) -> None:
    """Give a LoRA layer on a quantised Linear a dense `nn.Linear` base holding its dequantised weight, in
    place (adapters, and what is merged, stay as they are)."""
    weight = layer.lora_kind.weight(layer).to(dtype)  # (out, in)
    layer.__class__ = lora_layer_class(nn.Linear)
    layer._lora_base_class = nn.Linear
    layer._fused = True
    layer.merge_rounding.clear()
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach().to(dtype), requires_grad=layer.bias.requires_grad)
    layer._refresh()


def dequantize(model: LoRAModel, dtype: torch.dtype | None = None) -> LoRAModel:
    """Dequantise a quantised base in place, adapters kept: the LoRA layers' bases become dense
    `nn.Linear`s holding exactly the dequantised weights, the other quantised Linears are replaced by dense
    ones, and the quantisation config is dropped. Then `merge_and_unload()` merges exactly, for a
    full-precision model to export. `dtype`: the weights' dtype (default: the model's `config.dtype`, else
    float32). (transformers' own `dequantize` would replace the LoRA layers too, adapters and all.)"""
    config_dtype = getattr(getattr(model, "config", None), "dtype", None)
    if dtype is None:
        dtype = config_dtype if isinstance(config_dtype, torch.dtype) else torch.float32
    for path, module in list(model.named_modules()):
        if isinstance(module, LoRALayer):
            if module.lora_kind.requantises:
                dequantize_layer(module, dtype)
        elif getattr(kind := kind_of(module), "requantises", False):
            dense = nn.Linear(
                module.in_features, module.out_features, bias=module.bias is not None, device="meta"
            )
            dense.weight = nn.Parameter(kind.weight(module).to(dtype), requires_grad=False)
            if module.bias is not None:
                dense.bias = nn.Parameter(
                    module.bias.detach().to(dtype), requires_grad=module.bias.requires_grad
                )
            model.set_submodule(path, dense)
    if (quantizer := getattr(model, "hf_quantizer", None)) is not None:
        quantizer.remove_quantization_config(model)
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit"):
        model.__dict__.pop(flag, None)
    return model

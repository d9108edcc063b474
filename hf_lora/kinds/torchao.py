"""torchao-quantised Linears (e.g. int8 weight-only, through transformers' `TorchAoConfig`): an `nn.Linear`
whose weight is a torchao tensor subclass (`TorchAOBaseTensor`), as peft's `TorchaoLoraLinear`.

The base projection is the module's own forward on the quantised tensor; the adapter a plain fp32 branch.
`weight` dequantises; `write_weight` requantises with the model's quantisation config (transformers keeps
it on `model.hf_quantizer`), which `attach` gives the layer, as peft does. torchao is imported only when a
model has such weights: the tensors are recognised by their class names.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .linear import LinearKind

CONFIG_ATTR = "lora_requantize_config"  # on the layer: the torchao config to quantise a merged weight with


def is_torchao_weight(weight: Any) -> bool:
    return any(
        c.__name__ == "TorchAOBaseTensor" and c.__module__.startswith("torchao") for c in type(weight).__mro__
    )


class TorchaoKind(LinearKind):
    name = "torchao-quantised nn.Linear"
    fused = False  # the base forward is torchao's quantised matmul: the plain path
    requantises = True
    listed = False  # (messages name nn.Linear, which covers it)

    def matches(self, module: nn.Module) -> bool:
        return isinstance(module, nn.Linear) and is_torchao_weight(getattr(module, "weight", None))

    def matches_class(self, cls: type) -> bool:
        return False  # a plain nn.Linear class: only an instance's weight tells

    def shapes(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def attach(self, module: nn.Module, model: nn.Module) -> None:
        quantizer = getattr(model, "hf_quantizer", None)
        config = getattr(getattr(quantizer, "quantization_config", None), "get_apply_tensor_subclass", None)
        if config is not None:
            setattr(module, CONFIG_ATTR, config())

    def weight(self, module: nn.Module) -> torch.Tensor:
        try:
            return module.weight.dequantize()  # (out, in)
        except NotImplementedError as e:
            raise NotImplementedError(
                f"torchao's {type(module.weight).__name__} cannot be dequantised, which merging (and DoRA) need; "
                "keep the adapter unmerged, or quantise with another torchao config (e.g. Int8WeightOnlyConfig)."
            ) from e

    def write_weight(self, module: nn.Module, weight: torch.Tensor) -> None:
        from torchao.quantization import quantize_

        config = getattr(module, CONFIG_ATTR, None)
        if config is None:
            raise ValueError(
                "merging into torchao-quantised weights requantises them with the model's quantisation config, "
                "and this model has none (load it with from_pretrained(..., quantization_config=TorchAoConfig(...)) "
                "before get_lora_model); or keep the adapter unmerged."
            )
        old = module.weight
        del module.weight
        module.weight = nn.Parameter(weight.detach().to(old.dtype), requires_grad=False)
        quantize_(module, config, filter_fn=lambda m, _fqn: m is module)

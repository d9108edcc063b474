"""peft as the oracle: build the peft twin of an hf_lora model, with the same weights."""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model

import hf_lora


def peft_twin(ours: hf_lora.LoRAModel, base_copy: torch.nn.Module, **peft_kwargs):
    """peft model on `base_copy` (an untouched copy of the base) with our adapter's A/B copied in."""
    ref = get_peft_model(base_copy, LoraConfig(**peft_kwargs))
    copy_lora_weights(ours, ref)
    return ref


def copy_lora_weights(ours: hf_lora.LoRAModel, ref, adapter: str = "default") -> None:
    inner = ref.base_model.model
    with torch.no_grad():
        for path, layer in ours.lora_layers():
            if adapter not in layer.lora_A:
                continue
            twin = inner.get_submodule(
                layer.lora_kind.file_path(path, layer)
            )  # (peft nests some: MHA's out_proj)
            if adapter in layer.lora_magnitude:
                twin.lora_magnitude_vector[adapter].weight.copy_(layer.lora_magnitude[adapter])
            if adapter in twin.lora_embedding_A:  # peft's Embedding holds bare Parameters
                twin.lora_embedding_A[adapter].copy_(layer.lora_A[adapter])
                twin.lora_embedding_B[adapter].copy_(layer.lora_B[adapter])
                continue
            twin.lora_A[adapter].weight.copy_(layer.lora_A[adapter])
            twin.lora_B[adapter].weight.copy_(layer.lora_B[adapter])
        for path, layer in ours.token_layers():
            if adapter in layer.trainable_tokens_delta:
                twin = inner.get_submodule(path).token_adapter.trainable_tokens_delta[adapter]
                twin.copy_(layer.trainable_tokens_delta[adapter])
        for path, wrapper in ours.saved_modules():
            if adapter in wrapper.modules_to_save:
                twin = inner.get_submodule(path).modules_to_save[adapter]
                twin.load_state_dict(wrapper.modules_to_save[adapter].state_dict())


def randomise_B(model: hf_lora.LoRAModel, seed: int = 0) -> None:
    """B starts at zero, which would hide any error in the LoRA path: give it values. (An embedding's A
    starts at zero instead: it gets values too.)"""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in model.lora_layers():
            for B in layer.lora_B.values():
                B.copy_(torch.randn(B.shape, generator=g) * 0.1)
            if isinstance(layer, torch.nn.Embedding):
                for A in layer.lora_A.values():
                    A.copy_(torch.randn(A.shape, generator=g))


def training_curve(model, batches: list[dict], steps: int, lr: float = 5e-3, seed: int = 123) -> torch.Tensor:
    """The losses of `steps` AdamW steps over `batches` in turn, dropout masks drawn as peft draws them.
    The loss is computed here in the model's dtype: transformers' own casts the logits to float32, which
    would round a float64 run's loss and gradients at float32 precision."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    torch.manual_seed(seed)
    losses = []
    with hf_lora.peft_dropout_masks():
        for step in range(steps):
            batch = dict(batches[step % len(batches)])
            labels = batch.pop("labels")
            loss = cross_entropy(model(**batch).logits, labels)
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """A causal LM's next-token loss ((B, T, V) logits) or a classifier's ((B, C)), in the logits' dtype."""
    if logits.dim() == 3:
        logits, labels = logits[:, :-1], labels[:, 1:]
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))

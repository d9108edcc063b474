"""Chunked cross-entropy: the language-model loss without the (tokens x vocabulary) logits in memory.

A causal LM's loss materialises logits of shape (tokens, vocab) and keeps a log-softmax of the same size
for the backward pass; with GPT-2's 50,257-word vocabulary that is 100 MB per 512 tokens, several times
over. Here the logits are computed `chunk_size` tokens at a time, only the log-sum-exp per token is
kept, and the backward pass recomputes each chunk. Same loss and gradients (up to float rounding),
a fraction of the memory, one extra (tokens x hidden x vocab) matmul in backward.
"""

from __future__ import annotations

from typing import Any

import torch


class _ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, ignore_index: int, denominator: float):
        n = hidden.shape[0]
        acc = _acc_dtype(hidden)
        lse = torch.empty(n, dtype=acc, device=hidden.device)  # (N,)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, n, chunk_size):
            logits = _logits(hidden[start : start + chunk_size], weight, bias)  # (C, V), at least fp32
            target = labels[start : start + chunk_size]
            valid = target != ignore_index
            lse_c = torch.logsumexp(logits, dim=-1)
            picked = logits.gather(1, target.clamp(min=0).unsqueeze(1)).squeeze(1)
            total += torch.where(valid, lse_c - picked, 0.0).sum()
            lse[start : start + chunk_size] = lse_c
        ctx.save_for_backward(hidden, weight, bias, labels, lse)
        ctx.chunk_size, ctx.ignore_index, ctx.denominator = chunk_size, ignore_index, denominator
        return total / denominator

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        scale = grad / ctx.denominator
        acc = _acc_dtype(hidden)
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=acc) if ctx.needs_input_grad[1] else None
        grad_b = torch.zeros_like(bias, dtype=acc) if ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], ctx.chunk_size):
            h = hidden[start : start + ctx.chunk_size]
            target = labels[start : start + ctx.chunk_size]
            valid = target != ctx.ignore_index
            # d loss / d logits = softmax - onehot(target), for the counted tokens
            g = (_logits(h, weight, bias) - lse[start : start + ctx.chunk_size, None]).exp_()  # (C, V)
            g[valid, target[valid]] -= 1
            g.mul_((valid * scale).unsqueeze(1))
            if grad_h is not None:
                grad_h[start : start + ctx.chunk_size] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w += g.T @ h.to(acc)
            if grad_b is not None:
                grad_b += g.sum(0)
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
        if grad_b is not None:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None, None, None, None


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Softmax statistics in at least fp32 (as transformers upcasts logits for the loss)."""
    return torch.promote_types(t.dtype, torch.float32)


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return logits.to(_acc_dtype(logits))


def chunked_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 1024,
    ignore_index: int = -100,
    num_items_in_batch: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of `hidden @ weight.T (+ bias)` against `labels`, over (N, H) hidden states and (N,)
    labels, never holding more than `chunk_size` rows of logits. Reduced as transformers reduces a causal
    LM loss: a mean over the counted tokens, or a sum divided by `num_items_in_batch` when given."""
    if num_items_in_batch is not None:
        denominator = float(num_items_in_batch)
    else:
        denominator = float((labels != ignore_index).sum().clamp(min=1))
    return _ChunkedCrossEntropy.apply(hidden, weight, bias, labels, chunk_size, ignore_index, denominator)


def forward_with_chunked_loss(
    base_forward: Any, model: Any, head: Any, chunk_size: int, *args: Any, **kwargs: Any
) -> Any:
    """A causal LM's forward (`base_forward(model, ...)`) for the hidden states and last-position logits
    only, then the loss by chunks against `head`'s weight: the output with `loss` set (and the hidden states
    only where asked for)."""
    labels = kwargs.pop("labels")
    shift_labels = kwargs.pop("shift_labels", None)  # labels already aligned with positions (transformers')
    num_items = kwargs.pop("num_items_in_batch", None)
    want_hidden = kwargs.pop("output_hidden_states", False)
    kwargs.pop("logits_to_keep", None)
    out = base_forward(model, *args, output_hidden_states=True, logits_to_keep=1, **kwargs)
    if shift_labels is None:
        hidden, targets = out.hidden_states[-1][:, :-1], labels[:, 1:]  # position t predicts token t + 1
    else:
        hidden, targets = out.hidden_states[-1], shift_labels
    loss = chunked_cross_entropy(
        hidden.reshape(-1, hidden.shape[-1]),
        head.weight,
        targets.reshape(-1).to(hidden.device),
        bias=getattr(head, "bias", None),
        chunk_size=chunk_size,
        num_items_in_batch=num_items,
    )
    fields = {k: v for k, v in out.items() if k != "loss" and (want_hidden or k != "hidden_states")}
    return type(out)(loss=loss, **fields)

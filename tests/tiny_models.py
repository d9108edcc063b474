"""Tiny real models built from configs (no downloads), and batches for them. Free of side effects, so
subprocesses started by tests can import it too."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

VOCAB = 128


def tiny_gpt2() -> GPT2LMHeadModel:
    cfg = GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0, eos_token_id=0,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(cfg)


def tiny_distilbert(num_labels: int = 2) -> DistilBertForSequenceClassification:
    cfg = DistilBertConfig(
        n_layers=2, dim=64, hidden_dim=128, n_heads=4, vocab_size=VOCAB, max_position_embeddings=64,
        dropout=0.0, attention_dropout=0.0, seq_classif_dropout=0.0, num_labels=num_labels, pad_token_id=0,
    )  # fmt: skip
    return DistilBertForSequenceClassification(cfg)


def tiny_bert(num_labels: int = 2) -> BertForSequenceClassification:
    cfg = BertConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, vocab_size=VOCAB,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        num_labels=num_labels, pad_token_id=0,
    )  # fmt: skip
    return BertForSequenceClassification(cfg)


def tiny_llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=64, bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def tiny_t5() -> T5ForConditionalGeneration:
    """Encoder-decoder, with a `relative_attention_bias` embedding that is not a bias."""
    cfg = T5Config(
        num_layers=2, num_decoder_layers=2, d_model=64, d_ff=128, d_kv=16, num_heads=4, vocab_size=VOCAB,
        dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5ForConditionalGeneration(cfg)


class MLP(torch.nn.Module):
    """A plain PyTorch model, to show LoRA is not tied to transformers."""

    def __init__(self, d_in: int = 16, hidden: int = 32, d_out: int = 4):
        super().__init__()
        self.fc1 = torch.nn.Linear(d_in, hidden)
        self.fc2 = torch.nn.Linear(hidden, hidden)
        self.head = torch.nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


MODELS = {
    "gpt2": tiny_gpt2,
    "distilbert": tiny_distilbert,
    "bert": tiny_bert,
    "llama": tiny_llama,
    "t5": tiny_t5,
}


def make_model(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MODELS[kind]().eval()


def batch_for(kind: str, batch: int = 2, seq: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    if kind in ("gpt2", "llama", "t5"):
        return {"input_ids": ids, "labels": ids.clone()}
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": torch.randint(0, 2, (batch,), generator=g),
    }


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Offline: one token per word w0 ... w127 (w0 ends and pads)."""
    words = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w1"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=words, unk_token="w1", eos_token="w0", pad_token="w0")

"""A QLoRA training step, hf_lora vs peft on the same quantised base, and LoRA on the unquantised base.

Micro-benchmark behind the "QLoRA" section of BENCHMARKS.md (not part of run.py): a Llama with
SmolLM2-135M's widths (hidden 576, MLP 1536, 9 heads / 3 KV heads, vocabulary 49,152) and `--layers` of
its 30 blocks, random weights saved once and loaded quantised by bitsandbytes (4-bit NF4 with fp32
compute on CPU / bf16 on CUDA, and 8-bit LLM.int8); LoRA r=16 on all linear layers, dropout 0.05, AdamW.
Interleaved rounds (one step of each configuration per round, two warm-up rounds), medians [min-max];
then the peak memory of a process that trains each configuration for 3 steps (on CPU the peak RSS once
the model is loaded: what loading freed is returned to the OS and the high-water mark reset, so the
figure is the resident model plus training; on CUDA the peak allocated memory):

    OMP_WAIT_POLICY=PASSIVE python benchmarks/qlora.py [--rounds 6]      # 6 of the 30 blocks: ~3 min
    OMP_WAIT_POLICY=PASSIVE python benchmarks/qlora.py --layers 30 --rounds 4   # the whole model: ~12 min
    python benchmarks/qlora.py --device cuda --batch 8 --seq 512 --layers 30      # on a GPU
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import micro
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

KINDS = ["hf_lora 4-bit", "peft 4-bit", "hf_lora 8-bit", "peft 8-bit", "hf_lora unquantised"]
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")


def save_base(path: Path, layers: int) -> None:
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=layers, vocab_size=49_152, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)


def build(kind: str, path: Path, device: str) -> torch.nn.Module:
    compute = torch.bfloat16 if device == "cuda" else torch.float32  # (bf16 is emulated on most CPUs)
    if "4-bit" in kind:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute)
    elif "8-bit" in kind:
        q = BitsAndBytesConfig(load_in_8bit=True)
    else:
        q = None
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=q, device_map=device, dtype=dtype)
    if kind.startswith("peft"):
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        return get_peft_model(model, LoraConfig(**LORA))
    import hf_lora

    if q is not None:
        model = hf_lora.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return hf_lora.get_lora_model(model, hf_lora.LoRAConfig(**LORA))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    micro.common_arguments(parser, rounds=6)
    parser.add_argument("--layers", type=int, default=6, help="how many of SmolLM2-135M's 30 blocks")
    parser.add_argument("--base", type=Path, help="(internal) the saved base model")
    parser.add_argument("--no-timing", action="store_true", help="measure the peak memory only")
    args = parser.parse_args()
    ids = torch.randint(0, 49_152, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    ids = ids.to(args.device)
    cuda = args.device == "cuda"
    if args.peak_of:
        return micro.train_and_print_peak(build(args.peak_of, args.base, args.device), ids, autocast=cuda)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        save_base(base, args.layers)
        if not args.no_timing:
            models = {k: build(k, base, args.device) for k in KINDS}
            print(f"SmolLM2-135M widths, {args.layers} layers, batch {args.batch} x {args.seq}, LoRA r=16 "
                  f"all-linear; {micro.where(args.device)}")  # fmt: skip
            med = micro.time_steps(models, ids, args.rounds, autocast=cuda)
            for bits in ("4-bit", "8-bit"):
                print(f"hf_lora/peft {bits} step: {med[f'hf_lora {bits}'] / med[f'peft {bits}']:.3f}")
            del models
        flags = ["--base", str(base), "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
                 "--layers", str(args.layers)]  # fmt: skip
        peak = micro.peak_memory(__file__, KINDS, args, flags)
        for bits in ("4-bit", "8-bit"):
            print(f"peak hf_lora/peft {bits}: {peak[f'hf_lora {bits}'] / peak[f'peft {bits}']:.3f}")


if __name__ == "__main__":
    main()

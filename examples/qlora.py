"""QLoRA: LoRA on a 4-bit base model (bitsandbytes NF4), against LoRA on the float32 model, same steps.

Most people fine-tune a 7B+ model on a quantised base: its weights in 4 bits take an eighth of float32's
memory, and the small LoRA matrices train in float32 on top. This example runs both on SmolLM2-135M and
the Guardian headlines (offline assets), each in its own process so each peak memory is its own:

1. LoRA (all-linear, r=8) on the float32 model,
2. QLoRA: the same adapter on the model loaded in 4-bit NF4 (`BitsAndBytesConfig(load_in_4bit=True)`),
   prepared with `hf_lora.prepare_model_for_kbit_training`, trained with the same data, steps and seed,

and reports held-out loss before/after, step time, peak RSS, the base's size in memory and the adapter's
size on disk. bitsandbytes runs 4-bit layers on CPU too (dequantising each weight as it multiplies).

    python examples/qlora.py              # SmolLM2-135M (offline asset), a few minutes on CPU
    python examples/qlora.py --tiny       # a tiny random model: a smoke test in seconds
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import (
    Timer,
    check_range,
    disk_size,
    human_bytes,
    human_seconds,
    lm_loss,
    load_causal_lm,
    load_texts,
    parse_with_presets,
    peak_memory_bytes,
    print_table,
    seed_everything,
    setup_logging,
)

import hf_lora

PRESETS = {"tiny": dict(model="tiny", steps=4, batch_size=4, eval_texts=8)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="Hub id, local path, or asset name (smollm2, tiny)")
    p.add_argument("--texts", default="guardian", help="CSV with a Text column, or an asset name")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=32, help="tokens per headline")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--r", type=int, default=8)
    p.add_argument(
        "--quant-type", choices=["nf4", "fp4"], default="nf4", help="bitsandbytes' 4-bit data type"
    )
    p.add_argument("--eval-texts", type=int, default=128, help="held-out headlines scored before and after")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path("runs/qlora"))
    p.add_argument(
        "--tiny", action="store_true", help=f"tiny random model, few steps: a smoke test {PRESETS['tiny']}"
    )
    p.add_argument("--only", choices=["lora", "qlora"], help=argparse.SUPPRESS)  # one run, in a child process
    p.add_argument("--base-dir", type=Path, help=argparse.SUPPRESS)
    args = parse_with_presets(p, argv, PRESETS)
    for flag in ("--steps", "--batch-size", "--max-length", "--r", "--eval-texts"):
        check_range(p, args, flag, 1)
    return args


def base_model(args, quantised: bool):
    """The float32 model, or the same weights loaded in 4-bit from the copy saved in `args.base_dir`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if not quantised:
        return load_causal_lm(args.model)
    # (never the float32 model in this process: the peak memory is the 4-bit run's own)
    tokenizer = AutoTokenizer.from_pretrained(args.base_dir)
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type=args.quant_type, bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(args.base_dir, quantization_config=config, device_map="cpu")
    return hf_lora.prepare_model_for_kbit_training(model), tokenizer


@torch.no_grad()
def held_out_loss(model, tokenizer, texts: list[str], max_length: int) -> float:
    model.eval()
    losses = [
        lm_loss(model, tokenizer, texts[i : i + 16], max_length).item() for i in range(0, len(texts), 16)
    ]
    return sum(losses) / len(losses)


def one_run(args) -> dict:
    """Train one adapter (in this process) and report what the table shows."""
    seed_everything(args.seed)
    quantised = args.only == "qlora"
    model, tokenizer = base_model(args, quantised)
    base_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # as stored (4-bit: packed)
    train, held_out = load_texts(args.texts, args.eval_texts)
    cfg = hf_lora.LoRAConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    model = hf_lora.get_lora_model(model, cfg)
    before = held_out_loss(model, tokenizer, held_out, args.max_length)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    with Timer() as timer:
        for step in range(args.steps):
            batch = train[(step * args.batch_size) % len(train) :][: args.batch_size]
            loss = lm_loss(model, tokenizer, batch, args.max_length)
            loss.backward()
            opt.step()
            opt.zero_grad()
    after = held_out_loss(model, tokenizer, held_out, args.max_length)
    out = args.output_dir / args.only
    model.save_pretrained(out)
    return dict(
        loss_before=before, loss_after=after, step_s=timer.seconds / args.steps, peak_rss=peak_memory_bytes(),
        base_bytes=base_bytes, adapter_bytes=disk_size(out / "adapter_model.safetensors"),
        trainable=model.get_nb_trainable_parameters()[0],
    )  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    setup_logging()
    if args.only:
        print("RESULT " + json.dumps(one_run(args)))
        return
    args.output_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        # bitsandbytes quantises while loading: save the float32 weights once for the 4-bit load
        model, tokenizer = load_causal_lm(args.model)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        del model
        child = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--base-dir", tmp]
        for run in ("lora", "qlora"):
            proc = subprocess.run([*child, "--only", run], capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"the {run} run failed:\n{proc.stderr[-4000:]}")
            line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
            results[run] = json.loads(line.removeprefix("RESULT "))
    rows = [
        [name, f"{r['loss_before']:.3f}", f"{r['loss_after']:.3f}", f"{r['step_s']:.2f} s",
         human_bytes(r["base_bytes"]), human_bytes(r["peak_rss"]), human_bytes(r["adapter_bytes"])]
        for name, r in (("LoRA, float32 base", results["lora"]), (f"QLoRA, 4-bit {args.quant_type} base", results["qlora"]))
    ]  # fmt: skip
    print_table(
        f"{args.steps} steps of {args.batch_size} headlines, the same adapter (r={args.r}, all-linear, "
        f"{results['lora']['trainable']:,} weights) on each base",
        ["run", "held-out loss before", "after", "time/step", "base in memory", "peak RSS", "adapter file"],
        rows,
    )
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=2))
    print(f"\nadapters in {args.output_dir}/lora and {args.output_dir}/qlora; numbers in results.json "
          f"(took {human_seconds(sum(r['step_s'] for r in results.values()) * args.steps)} of training)")  # fmt: skip


if __name__ == "__main__":
    main()

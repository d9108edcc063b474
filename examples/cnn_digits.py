"""Conv LoRA: fix the digit a small CNN gets wrong most, with LoRA on its Conv2d layers only, and undo it.

scikit-learn's bundled 8x8 digits (no download), seconds on a CPU:

1. train a small CNN (two 3x3 convolutions, a max-pool, a Linear head) briefly, so it is decent but not
   perfect;
2. find the digit it classifies worst on the test set;
3. add LoRA to the two Conv2d layers (A a 3x3 convolution to r channels, B a 1x1 convolution back, as
   peft builds them; the head stays frozen) and fine-tune only them on data that emphasises that digit;
4. inside `with model.disable_adapter():` the original network is back, exactly: the base weights were
   never touched.

    python examples/cnn_digits.py
    python examples/cnn_digits.py --digit 3 --rank 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from common import check_range, human_bytes, print_table, seed_everything, setup_logging
from mlp_digits import emphasise, load_digits_split, overall_accuracy, per_digit_accuracy, train
from torch import nn

log = logging.getLogger("cnn_digits")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=Path("runs/cnn_digits"))
    p.add_argument(
        "--channels", type=int, default=8, help="channels of the first convolution (twice in the second)"
    )
    p.add_argument("--base-epochs", type=int, default=2, help="short on purpose: leave mistakes to fix")
    p.add_argument("--lora-epochs", type=int, default=8)
    p.add_argument("--digit", type=int, choices=range(10), help="digit to improve (default: the worst)")
    p.add_argument("--others", type=float, default=0.5,
                   help="fraction of the other digits' training examples mixed into the fine-tuning data, "
                        "so the adapter does not learn to answer that digit for everything")  # fmt: skip
    p.add_argument("-r", "--rank", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, default=8)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="fewer epochs: for smoke tests")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    for flag in ("--channels", "--base-epochs", "--lora-epochs", "--rank"):
        check_range(p, args, flag, 1)
    check_range(p, args, "--others", 0, 1)
    if args.tiny:
        args.lora_epochs = min(args.lora_epochs, 4)
    return args


class CNN(nn.Module):
    """8x8 pixels (given flat, as 64 values) -> 3x3 conv -> 3x3 conv -> 2x2 max-pool -> 10 digits."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, 2 * channels, 3, padding=1)
        self.head = nn.Linear(2 * channels * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv1(x.view(-1, 1, 8, 8)))
        h = nn.functional.max_pool2d(torch.relu(self.conv2(h)), 2)  # (N, 2c, 4, 4)
        return self.head(h.flatten(1))


def main(argv: list[str] | None = None) -> dict:
    import hf_lora

    args = parse_args(argv)
    setup_logging(args.verbose)
    seed_everything(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits_split(args.seed)

    # 1. a base model, deliberately under-trained
    model = CNN(args.channels)
    train(model, x_train, y_train, args.base_epochs, args.lr, args.seed)
    before = per_digit_accuracy(model, x_test, y_test)
    overall_before = overall_accuracy(model, x_test, y_test)
    torch.save(model.state_dict(), args.output_dir / "base_model.pt")  # to load the adapter onto later

    # 2. its weakest digit
    digit = args.digit if args.digit is not None else int(before.argmin())
    log.info(
        "base model: %.1f%% overall; worst digit %d at %.1f%%",
        100 * overall_before,
        digit,
        100 * before[digit],
    )

    # 3. LoRA on the two Conv2d layers only; everything else is frozen
    config = hf_lora.LoRAConfig(r=args.rank, lora_alpha=args.lora_alpha, target_modules=["conv1", "conv2"])
    model = hf_lora.get_lora_model(model, config)
    model.print_trainable_parameters()
    x_ft, y_ft = emphasise(x_train, y_train, digit, args.others, args.seed)
    log.info("fine-tuning data: %d images, %d of them %d", len(y_ft), int((y_ft == digit).sum()), digit)

    curve = [(0, before[digit].item(), overall_before)]

    def on_epoch(epoch: int) -> None:
        acc = per_digit_accuracy(model, x_test, y_test)[digit].item()
        curve.append((epoch, acc, overall_accuracy(model, x_test, y_test)))
        model.train()

    train(model, x_ft, y_ft, args.lora_epochs, args.lr, args.seed + 1, on_epoch)
    after = per_digit_accuracy(model, x_test, y_test)
    overall_after = overall_accuracy(model, x_test, y_test)

    # 4. switch the adapter off: the original network answers again
    with model.disable_adapter():
        disabled = per_digit_accuracy(model, x_test, y_test)
        overall_disabled = overall_accuracy(model, x_test, y_test)
    model.save_pretrained(args.output_dir)
    adapter_bytes = (args.output_dir / "adapter_model.safetensors").stat().st_size

    print_table(
        f"test accuracy of digit {digit} while fine-tuning the conv LoRA adapter",
        ["epoch", f"digit {digit}", "all digits"],
        [[e, f"{100 * a:.1f}%", f"{100 * o:.1f}%"] for e, a, o in curve],
    )
    print_table(
        "per-digit test accuracy",
        ["digit", "base model", "with LoRA", "adapter disabled"],
        [
            *[[f"{d}{' <-' if d == digit else ''}", *(f"{100 * t[d]:.1f}%" for t in (before, after, disabled))]
              for d in range(10)],
            ["all", *(f"{100 * o:.1f}%" for o in (overall_before, overall_after, overall_disabled))],
        ],
    )  # fmt: skip
    trainable, total = model.get_nb_trainable_parameters()
    same = torch.equal(before, disabled)
    print(
        f"digit {digit}: {100 * before[digit]:.1f}% -> {100 * after[digit]:.1f}% with a {trainable:,d}-parameter "
        f"conv adapter ({human_bytes(adapter_bytes)}; the CNN has {total - trainable:,d}). Adapter disabled: "
        f"{'identical to the base model' if same else 'DIFFERENT from the base model'}.\n"
        f"adapter saved to {args.output_dir}/"
    )
    report = {
        "digit": digit,
        "before": before.tolist(),
        "after": after.tolist(),
        "disabled": disabled.tolist(),
        "overall": {"before": overall_before, "after": overall_after, "disabled": overall_disabled},
        "curve": curve,
        "trainable_params": trainable,
        "adapter_bytes": adapter_bytes,
    }
    (args.output_dir / "results.json").write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
    sys.exit(0)

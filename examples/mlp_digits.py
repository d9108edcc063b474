"""LoRA on a plain PyTorch model: fix the digit a small network gets wrong most, and undo it at will.

The MNIST tutorial, on scikit-learn's bundled 8x8 digits (no download), in seconds on a CPU:

1. train a small MLP briefly, so it is decent but not perfect;
2. find the digit it classifies worst on the test set;
3. add LoRA adapters (hf_lora works on any torch.nn.Module with Linear layers) and fine-tune only them
   on data that emphasises that digit, watching its accuracy rise epoch by epoch;
4. inside `with model.disable_adapter():` the original network is back, exactly: same accuracy on
   every digit, because the base weights were never touched.

    python examples/mlp_digits.py
    python examples/mlp_digits.py --digit 3 --rank 2
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from common import check_range, human_bytes, print_table, seed_everything, setup_logging
from torch import nn

log = logging.getLogger("mlp_digits")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", type=Path, default=Path("runs/mlp_digits"))
    p.add_argument("--hidden", type=int, default=64, help="width of the two hidden layers")
    p.add_argument("--base-epochs", type=int, default=3, help="short on purpose: leave mistakes to fix")
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
    for flag in ("--hidden", "--base-epochs", "--lora-epochs", "--rank"):
        check_range(p, args, flag, 1)
    check_range(p, args, "--others", 0, 1)
    if args.tiny:
        args.lora_epochs = min(args.lora_epochs, 4)
    return args


class MLP(nn.Module):
    """64 pixels -> two hidden layers -> 10 digits. Named layers, so LoRA can target them by name."""

    def __init__(self, hidden: int = 64):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def load_digits_split(seed: int):
    """1,797 8x8 images, pixel values scaled to [0, 1]; a stratified 50/50 split (~90 test images per digit)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.5, stratify=y, random_state=seed)
    return x_train, y_train, x_test, y_test


def train(model: nn.Module, x, y, epochs: int, lr: float, seed: int, on_epoch=None) -> None:
    """Plain mini-batch Adam on whatever parameters still require grad (all of them, or only LoRA's)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(1, epochs + 1):
        for idx in torch.randperm(len(x), generator=generator).split(32):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if on_epoch:
            on_epoch(epoch)
    model.eval()


@torch.no_grad()
def per_digit_accuracy(model: nn.Module, x, y) -> torch.Tensor:
    model.eval()
    correct = model(x).argmax(-1) == y
    return torch.stack([correct[y == d].float().mean() for d in range(10)])


@torch.no_grad()
def overall_accuracy(model: nn.Module, x, y) -> float:
    model.eval()
    return (model(x).argmax(-1) == y).float().mean().item()


def emphasise(x, y, digit: int, others: float, seed: int):
    """Every training image of `digit`, plus a random `others` fraction of the rest."""
    generator = torch.Generator().manual_seed(seed)
    keep = (y == digit) | (torch.rand(len(y), generator=generator) < others)
    return x[keep], y[keep]


def main(argv: list[str] | None = None) -> dict:
    import hf_lora

    args = parse_args(argv)
    setup_logging(args.verbose)
    seed_everything(args.seed)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    x_train, y_train, x_test, y_test = load_digits_split(args.seed)

    # 1. a base model, deliberately under-trained
    model = MLP(args.hidden)
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

    # 3. LoRA on every Linear layer; the base weights are frozen
    config = hf_lora.LoRAConfig(r=args.rank, lora_alpha=args.lora_alpha, target_modules=["fc1", "fc2", "out"])
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
        f"test accuracy of digit {digit} while fine-tuning the LoRA adapter",
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
        f"adapter ({human_bytes(adapter_bytes)}; the MLP has {total - trainable:,d}). Adapter disabled: "
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

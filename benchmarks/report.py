"""The machine description and the Markdown report (BENCHMARKS.md) rendered from results.json."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMMENTARY_START = "<!-- commentary:start (kept when the report is regenerated) -->"
COMMENTARY_END = "<!-- commentary:end -->"
MICRO_START = (
    "<!-- micro-benchmarks:start (sections written by hand from benchmarks/moe.py, qlora.py, ...; "
    "kept when the report is regenerated) -->"
)
MICRO_END = "<!-- micro-benchmarks:end -->"
DEFAULT_COMMENTARY = "_No commentary yet: edit this section by hand; run.py keeps it._"

# Issue 7 wants merged inference at "1.00x (± noise)": the tolerance used for its check mark.
NOISE = 0.02


# ---- environment -------------------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git(*args: str) -> str:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def environment(device: str) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    import hf_lora

    cpu = next(
        (
            ln.split(":", 1)[1].strip()
            for ln in _read("/proc/cpuinfo").splitlines()
            if ln.startswith("model name")
        ),
        platform.processor() or platform.machine(),
    )
    mem_kb = next(
        (int(ln.split()[1]) for ln in _read("/proc/meminfo").splitlines() if ln.startswith("MemTotal:")), 0
    )
    env = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": round(mem_kb / 2**20, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "hf_lora": hf_lora.__version__,
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--", "hf_lora")),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "load_average_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
        env["cuda"] = torch.version.cuda
    return env


# ---- formatting --------------------------------------------------------------------------------------


def fmt_s(seconds: float) -> str:
    """Seconds in a readable unit, 3-4 significant digits."""
    if seconds >= 10:
        return f"{seconds:.1f} s"
    if seconds >= 1:
        return f"{seconds:.2f} s"
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f} ms"
    if ms >= 1:
        return f"{ms:.1f} ms"
    return f"{seconds * 1e6:.0f} µs"


def fmt_time(stat: dict[str, Any]) -> str:
    return f"{fmt_s(stat['median'])} [{fmt_s(stat['min'])}–{fmt_s(stat['max'])}]"


def fmt_mb(stat: dict[str, Any]) -> str:
    return f"{stat['median']:,.0f} MB [{stat['min']:,.0f}–{stat['max']:,.0f}]"


def goal(value: float, op: str, target: float, tol: float = 0.0) -> str:
    ok = {"<=": value <= target + tol, ">=": value >= target - tol, "==": abs(value - target) <= tol}[op]
    shown = {"<=": "≤", ">=": "≥", "==": "="}[op]
    bound = f"{target:.2f}" + (f" ± {tol:.2f}" if tol else "")
    return f"{shown} {bound} {'✓' if ok else '✗'}"


def check(goals: list[list[str]], what: str, value: float, op: str, target: float, tol: float = 0.0) -> str:
    """`goal()`'s mark for `value`, also recorded as a row of the report's Goals table."""
    mark = goal(value, op, target, tol)
    goals.append([what, f"{value:.3f}", mark])
    return mark


def table(header: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


# ---- sections ----------------------------------------------------------------------------------------


def _ok(entries: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for wl, e in entries.items():
        if "error" not in e:
            yield wl, e


def _errors(entries: dict[str, Any]) -> list[str]:
    return [
        f"- **{wl}: failed** — `{e['error'].splitlines()[-1]}`" for wl, e in entries.items() if "error" in e
    ]


_EXTRA_LABELS = {
    "chunked": "hf_lora with chunked loss (opt-in)",
    "peft_masks": "hf_lora with peft's dropout masks (`peft_dropout_masks()`)",
}


def _pair(key: str, r: dict[str, Any]) -> tuple[float, str, str, str]:
    """A ratios key ("0.0", "0.05", "0.05 chunked") and its entry -> (dropout, peft variant, hf_lora
    variant, label); the variants are named by the measurement."""
    p, _, extra = key.partition(" ")
    label = f"{p}, {_EXTRA_LABELS[extra]}" if extra else p
    return float(p), r["peft_variant"], r["hf_lora_variant"], label


def section_train_step(entries: dict[str, Any], goals: list[list[str]]) -> list[str]:
    out = [
        "One training step (forward + backward + AdamW step + zero_grad), median [min–max] over the "
        "interleaved rounds; ratios are ratios of medians, and in parentheses the median of the "
        "per-round ratios (each round runs the two back to back). Loss Δ: |loss of hf_lora − loss "
        "of peft| for the same seeded forward of copies of the two models with random B (so that the "
        "adapters change the output), dropout included (hf_lora drawing peft's masks for this check); "
        "it should be ~0. FLOPs LoRA/full: the model-FLOPs ratio of a "
        "LoRA step to a full fine-tuning step "
        "(4·N vs 6·N plus attention, see README), about the lowest LoRA/full time ratio that better "
        "LoRA layers alone can reach: the frozen model's forward and input gradients remain.",
        "",
    ]
    rows, gpu_rows = [], []
    for wl, e in _ok(entries):
        v = e["variants"]
        for key, r in e["ratios"].items():
            p, peft_v, ours_v, label = _pair(key, r)
            what = f"train_step {wl}, dropout {label}: hf_lora/peft"
            g = check(goals, what, r["hf_lora/peft"], "<=", 0.95 if p == 0 else 0.85)
            rows.append(
                [
                    wl,
                    label,
                    fmt_time(v["full"]),
                    fmt_time(v[peft_v]),
                    fmt_time(v[ours_v]),
                    f"**{r['hf_lora/peft']:.3f}**"
                    + (f" ({r['hf_lora/peft paired']:.3f})" if "hf_lora/peft paired" in r else ""),
                    g,
                    f"{r['peft/full']:.3f}",
                    f"{r['hf_lora/full']:.3f}",
                    f"{e['flops_per_token']['lora'] / e['flops_per_token']['full']:.3f}",
                    f"{r['loss_diff_hf_lora_vs_peft']:.1e}",
                ]
            )
            if "mfu" in v["full"]:
                hf, pf = v[ours_v], v[peft_v]
                speedup = hf["tokens_per_s"] / pf["tokens_per_s"]
                g = check(goals, f"GPU tokens/s {wl}, dropout {label}: hf_lora/peft", speedup, ">=", 1.3)
                gpu_rows.append(
                    [
                        wl,
                        label,
                        f"{v['full']['tokens_per_s']:,.0f} ({v['full']['mfu']:.1%})",
                        f"{pf['tokens_per_s']:,.0f} ({pf['mfu']:.1%})",
                        f"{hf['tokens_per_s']:,.0f} ({hf['mfu']:.1%})",
                        f"**{speedup:.3f}**",
                        g,
                    ]
                )
    saved_rows = []
    for wl, e in _ok(entries):
        mb = e.get("saved_for_backward_mb")
        if mb:
            for key, r in e["ratios"].items():
                _, peft_v, ours_v, label = _pair(key, r)
                sizes = [f"{mb[k]:,.0f}" for k in ("full", peft_v, ours_v)]
                saved_rows.append([wl, label, *sizes, f"**{mb[ours_v] / mb[peft_v]:.3f}**"])
    out += table(
        [
            "workload",
            "dropout",
            "full FT",
            "peft",
            "hf_lora",
            "hf_lora/peft (paired)",
            "goal",
            "peft/full",
            "hf_lora/full",
            "FLOPs LoRA/full",
            "loss Δ",
        ],
        rows,
    )
    if saved_rows:
        out += [
            "Activations saved for backward by one training forward (MB; distinct storages that "
            "autograd keeps, parameters excluded; `torch.autograd.graph.saved_tensors_hooks`; under "
            "bf16 autocast the bf16 copies autocast makes of the weights are counted too). This is "
            "deterministic, and shows how much of the peak-memory difference the libraries' saved "
            "tensors explain.",
            "",
        ]
        out += table(["workload", "dropout", "full FT", "peft", "hf_lora", "hf_lora/peft"], saved_rows)
    if gpu_rows:
        out += [
            "GPU throughput, tokens/s (MFU). MFU = tokens/s × FLOPs per token / peak; FLOPs per token = "
            "6·N + 12·L·d·seq for full fine-tuning and 4·N + 12·L·d·seq for LoRA (no weight gradients "
            "for frozen weights), N = matmul weights; peak = the run's `--peak-tflops` (H100 bf16 dense: "
            "989 TFLOP/s).",
            "",
        ]
        out += table(
            ["workload", "dropout", "full FT", "peft", "hf_lora", "hf_lora/peft tokens/s", "goal"], gpu_rows
        )
    return out + _errors(entries)


def section_peak_memory(entries: dict[str, Any], goals: list[list[str]]) -> list[str]:
    out = [
        "Peak RSS (the process's `VmHWM`) of a process that builds the model and trains a few steps, one "
        "process per configuration, configurations interleaved; median [min–max]. The process imports "
        "only what its configuration needs (peft only for peft). (`ru_maxrss` would do on a process "
        "started from a shell, but it survives fork+exec, so a worker started by the benchmark process "
        "would report that process's own peak; it is kept in results.json as `ru_maxrss_mb`.)",
        "",
    ]
    by_seq: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for wl, e in _ok(entries):
        for seq, entry in e.items():
            if isinstance(entry, dict) and "variants" in entry:
                by_seq.setdefault(seq, []).append((wl, entry))
    for seq, items in sorted(by_seq.items(), key=lambda kv: int(kv[0])):
        rows, cuda_rows = [], []
        for wl, entry in items:
            v = entry["variants"]
            for key, r in entry["ratios"].items():
                p, peft_v, ours_v, label = _pair(key, r)
                what = f"peak RSS {wl} seq {seq}, dropout {label}: hf_lora/peft"
                g = check(goals, what, r["hf_lora/peft"], "<=", 1.0 if p == 0 else 0.85)
                setup = f"{v[peft_v]['rss_after_setup_mb']:,.0f} / {v[ours_v]['rss_after_setup_mb']:,.0f}"
                rows.append(
                    [
                        wl,
                        label,
                        fmt_mb(v["full"]),
                        fmt_mb(v[peft_v]),
                        fmt_mb(v[ours_v]),
                        f"**{r['hf_lora/peft']:.3f}**",
                        g,
                        f"{r['peft/full']:.3f}",
                        f"{r['hf_lora/full']:.3f}",
                        setup,
                    ]
                )
                if "cuda" in v["full"]:
                    c = r["cuda hf_lora/peft"]
                    g = check(
                        goals, f"GPU memory {wl} seq {seq}, dropout {label}: hf_lora/peft", c, "<=", 1.0
                    )
                    cuda_rows.append(
                        [
                            wl,
                            label,
                            fmt_mb(v["full"]["cuda"]),
                            fmt_mb(v[peft_v]["cuda"]),
                            fmt_mb(v[ours_v]["cuda"]),
                            f"**{c:.3f}**",
                            g,
                        ]
                    )
        reps = items[0][1]["variants"]["full"]["n"]
        out += [
            f"**Sequence length {seq}** ({reps} process(es) per configuration, "
            f"{items[0][1].get('steps', '?')} steps each)",
            "",
        ]
        out += table(
            [
                "workload",
                "dropout",
                "full FT",
                "peft",
                "hf_lora",
                "hf_lora/peft",
                "goal",
                "peft/full",
                "hf_lora/full",
                "RSS before training, peft / hf_lora",
            ],
            rows,
        )
        if cuda_rows:
            out += [f"`torch.cuda.max_memory_allocated`, sequence length {seq}", ""]
            out += table(
                ["workload", "dropout", "full FT", "peft", "hf_lora", "hf_lora/peft", "goal"], cuda_rows
            )
    return out + _errors(entries)


def section_inference(
    entries: dict[str, Any], goals: list[list[str]], what: str = "inference", shape: str = ""
) -> list[str]:
    out = [
        f"Forward pass{shape} in eval mode under `torch.no_grad()`, median [min–max], interleaved. Adapters "
        "have random B (the update is not zero); merged = `merge_and_unload()`. The last column checks "
        "that all variants compute the same logits.",
        "",
    ]
    rows = []
    for wl, e in _ok(entries):
        for name, stat in e["variants"].items():
            r = e["ratios"][name]
            g = ""
            if name == "hf_lora":
                g = check(goals, f"{what} {wl}: hf_lora unmerged / base", r, "<=", 1.05)
            elif name == "hf_lora merged":
                g = check(goals, f"{what} {wl}: hf_lora merged / base", r, "==", 1.0, NOISE)
            diff = e["max_abs_logit_diff_vs_peft"][name]
            rows.append(
                [wl, name, fmt_time(stat), f"**{r:.3f}**", g, "—" if name == "base" else f"{diff:.1e}"]
            )
    out += table(["workload", "model", "forward", "× base", "goal", "max |Δ logits| vs peft"], rows)
    return out + _errors(entries)


def section_one_token(entries: dict[str, Any], goals: list[list[str]]) -> list[str]:
    shape = (
        " of a single token (batch 1, no KV cache: the shape of each step of generation, where reading"
        " the weights and every adapted layer's fixed per-call cost dominate, not FLOPs)"
    )
    return section_inference(entries, goals, what="one-token inference", shape=shape)


def section_inject_load(entries: dict[str, Any], goals: list[list[str]]) -> list[str]:
    out = [
        "Adding an adapter to a model (`get_lora_model` / `get_peft_model`) and loading a saved adapter "
        "(`LoRAModel.from_pretrained` / `PeftModel.from_pretrained`, both reading the same peft-written "
        "files), each repetition on a fresh deep copy of the base model (the copy is not timed).",
        "",
    ]
    rows = []
    for wl, e in _ok(entries):
        v, r = e["variants"], e["ratios"]
        for label, ours, theirs, key, target in (
            ("injection", "inject hf_lora", "inject peft", "inject hf_lora/peft", 0.5),
            ("adapter loading", "load hf_lora", "load peft", "load hf_lora/peft", 0.5),
            (
                "adapter loading vs peft low_cpu_mem_usage=True",
                "load hf_lora",
                "load peft (low_cpu_mem_usage)",
                "load hf_lora/peft (low_cpu_mem_usage)",
                None,
            ),
        ):
            g = (
                check(goals, f"{label} {wl}: hf_lora/peft", r[key], "<=", target)
                if target
                else "(information)"
            )
            rows.append([wl, label, fmt_time(v[ours]), fmt_time(v[theirs]), f"**{r[key]:.3f}**", g])
        out += [f"Loaded adapters agree: max |ΔB| = {e['loaded_B_max_abs_diff']:.1e}.", ""]
    out += table(["workload", "operation", "hf_lora", "peft", "hf_lora/peft", "goal"], rows)
    return out + _errors(entries)


def section_adapter_switch(entries: dict[str, Any], goals: list[list[str]]) -> list[str]:
    out = []
    for wl, e in _ok(entries):
        backends = {e[lib]["backend"] for lib in ("hf_lora", "peft")}
        errs = {b: m for lib in ("hf_lora", "peft") for b, m in e[lib]["backend_errors"].items()}
        out += [
            f"Two adapters of rank 8 on a {e['n_layer']}-layer {wl}, batch 1 × {e['seq']} tokens, eval, "
            f"no_grad, `torch.compile(backend={'/'.join(sorted(backends))!r})`. 'graphs' counts compiled "
            "frames (`torch._dynamo.utils.counters['frames']['ok']`); recompiles while switching counts "
            "those after both adapters have been seen once. `set_adapter` is timed without compilation.",
            "",
        ]
        if errs:
            out += [f"Backends that failed first: {errs}", ""]
        rows = []
        for lib in ("hf_lora", "peft"):
            x = e[lib]
            rows.append(
                [
                    lib,
                    x["after_first_forward"]["frames_compiled"],
                    x["after_first_switch"]["frames_compiled"],
                    x["recompiles_while_switching"],
                    x["end"]["graph_breaks"],
                    fmt_time(x["set_adapter"]),
                    fmt_time(x["forward_no_switch"]),
                    fmt_time(x["forward_after_switch"]),
                    fmt_time(x["set_adapter_plus_forward"]),
                    "yes" if x["outputs_differ"] else "**no**",
                ]
            )
        out += table(
            [
                "library",
                "graphs after 1st forward",
                "after 1st switch",
                "recompiles while switching",
                "graph breaks",
                "set_adapter (eager)",
                "forward, same adapter",
                "forward after a switch",
                "set_adapter + forward",
                "outputs differ by adapter",
            ],
            rows,
        )
        for lib in ("hf_lora", "peft"):
            reasons = e[lib]["end"]["recompile_reasons"]
            if reasons:
                out += [f"- {lib} recompiles because: `{reasons[0].splitlines()[0][:200]}`"]
            if e[lib]["end"]["graph_breaks"]:
                out += [f"- {lib} graph breaks: {'; '.join(e[lib]['end']['graph_break_reasons'])[:300]}"]
        for k, r in e["ratios"].items():
            out += [f"- {k}: {r:.3f}"]
        out += [""]
    return out + _errors(entries)


def section_profile(entries: dict[str, Any], goals: list[list[str]]) -> list[str]:
    out = []
    for wl, e in _ok(entries):
        for name, x in e.items():
            if isinstance(x, dict) and "table" in x:
                out += [
                    f"<details><summary>{wl}, {name}: top ops of one training step</summary>",
                    "",
                    "```",
                    x["table"].rstrip(),
                    "```",
                    "</details>",
                    "",
                ]
    return out + _errors(entries)


def section_variants(entries: dict[str, Any], goals: list[list[str]]) -> list[str]:
    out = [
        "Issue 9: what each variant costs. A training step (dropout 0) with DoRA vs plain LoRA, both "
        "libraries interleaved; and the time `get_lora_model` / `get_peft_model` takes with PiSSA (a "
        "randomised SVD with 4 iterations per target weight) or OLoRA (a QR) instead of the default "
        "initialisation, each including one deep copy of the base model. LoRA+ (a learning-rate ratio "
        "for B) and rsLoRA (a different scaling constant) change nothing in the step.",
        "",
    ]
    for wl, e in _ok(entries):
        v, r = e["variants"], e["ratios"]
        out += table(
            ["workload", "training step", "hf_lora", "peft", "hf_lora/peft"],
            [
                [wl, "plain LoRA", fmt_time(v["hf_lora"]), fmt_time(v["peft"]), f"**{r['hf_lora/peft']:.3f}**"],
                [wl, "DoRA", fmt_time(v["hf_lora DoRA"]), fmt_time(v["peft DoRA"]),
                 f"**{r['hf_lora DoRA/peft DoRA']:.3f}**"],
                [wl, "DoRA / plain", f"{r['hf_lora DoRA/hf_lora']:.2f}×", f"{r['peft DoRA/peft']:.2f}×", ""],
            ],
        )  # fmt: skip
        init = e["init"]
        rows = []
        for kind in ("default", "pissa_niter_4", "olora"):
            ours, theirs = init[f"hf_lora {kind}"], init[f"peft {kind}"]
            rows.append(
                [wl, kind, fmt_time(ours), fmt_time(theirs), f"**{ours['median'] / theirs['median']:.3f}**"]
            )
        out += table(["workload", "initialisation", "hf_lora", "peft", "hf_lora/peft"], rows)
    return out + _errors(entries)


SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any], list[list[str]]], list[str]]]] = {
    "train_step": ("Training step", section_train_step),
    "peak_memory": ("Peak memory during training", section_peak_memory),
    "inference": ("Inference latency", section_inference),
    "one_token": ("One-token inference latency", section_one_token),
    "inject_load": ("Injection and adapter loading", section_inject_load),
    "adapter_switch": ("Adapter switching under torch.compile", section_adapter_switch),
    "variants": ("LoRA variants", section_variants),
    "profile": ("Profile", section_profile),
}


# ---- the document ------------------------------------------------------------------------------------


DEFAULT_TITLE = "# Benchmarks: hf_lora vs peft"


def existing_commentary(md_path: Path) -> str:
    text = _read(str(md_path))
    if COMMENTARY_START in text and COMMENTARY_END in text:
        return text.split(COMMENTARY_START, 1)[1].split(COMMENTARY_END, 1)[0].strip()
    return DEFAULT_COMMENTARY


def existing_micro(md_path: Path) -> str:
    """The hand-written micro-benchmark sections at the end of the report (kept like the commentary)."""
    text = _read(str(md_path))
    if MICRO_START in text and MICRO_END in text:
        return text.split(MICRO_START, 1)[1].split(MICRO_END, 1)[0].strip()
    return ""


def existing_title(md_path: Path) -> str:
    """The report's title line, kept like the commentary (a report of a variant run is renamed by hand)."""
    first = _read(str(md_path)).partition("\n")[0]
    return first if first.startswith("# ") else DEFAULT_TITLE


def _run_lines(run_id: str, run: dict[str, Any]) -> list[str]:
    env, s = run["env"], run["settings"]
    machine = f"{env['cpu']}, {env['cores']} cores ({env['cores_usable']} usable), {env['ram_gib']} GiB RAM"
    if env.get("gpu"):
        machine += f"; GPU {env['gpu']} (CUDA {env['cuda']})"
    load = env.get("load_average_start")
    lines = [
        f"- **run `{run_id}`**: `{run['command']}`",
        f"  - date: {env['date']}; took {run.get('seconds', 0) / 60:.1f} min",
        f"  - machine: {machine}",
        f"  - versions: Python {env['python']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env['peft']}, hf_lora {env['hf_lora']} (git {env['git_commit']}"
        f"{', hf_lora/ modified' if env['git_dirty'] else ''})",
        f"  - torch threads: {env['torch_threads']}; device: {env['device']}; amp: {s['amp']}; "
        f"batch {s['batch']} × seq {s['seq']}; rounds: {s['warmup']} warm-up + {s['reps']} timed",
    ]
    if load:
        lines.append(
            f"  - load average (1 min) at start / end: {load[0]:.2f} / "
            f"{(run.get('load_average_end') or [float('nan')])[0]:.2f}"
            + (" — **busy machine: timings are noisy**" if load[0] > 1.0 else "")
        )
    if s["quick"]:
        lines.append(f"  - **quick mode**: {run.get('quick_note', '')}")
    return lines


def render(
    results: dict[str, Any],
    commentary: str,
    title: str = DEFAULT_TITLE,
    json_path: str = "benchmarks/results.json",
    micro: str = "",
) -> str:
    goals: list[list[str]] = []
    body: list[str] = []
    for key, (heading, fn) in SECTIONS.items():
        entries = results["measurements"].get(key)
        if not entries:
            continue
        runs = sorted({e.get("run", "?") for e in entries.values()})
        body += [f"## {heading} (`{key}`)", "", f"_Run: {', '.join(f'`{r}`' for r in runs)}_", ""]
        body += fn(entries, goals)
        body.append("")

    lines = [
        title,
        "",
        f"Generated by `benchmarks/run.py` from `{json_path}` (raw samples there); "
        "`benchmarks/README.md` explains each measurement. Ratios below 1 mean hf_lora is faster / "
        "smaller than what it is compared with. Goals are those of issue 7.",
        "",
        "## Runs",
        "",
    ]
    for run_id, run in sorted(results["runs"].items()):
        lines += _run_lines(run_id, run)
    lines += ["", "## Goals (issue 7)", ""]
    lines += table(["goal", "measured", "target"], goals) if goals else ["_No goal measured._", ""]
    lines += ["## Commentary", "", COMMENTARY_START, "", commentary, "", COMMENTARY_END, ""]
    if micro:
        body += [MICRO_START, "", micro, "", MICRO_END]
    return "\n".join(lines + body).rstrip() + "\n"

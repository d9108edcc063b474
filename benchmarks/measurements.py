"""One function per measurement. Each takes a workload and the run's `Settings` and returns a JSON-able
dict with raw samples and summaries; `report.py` turns those into tables.

Timed configurations always alternate within one process (round r runs every variant once, starting at
variant r mod n), after warm-up rounds that are discarded, so drift on a busy machine hits every variant
alike. Peak memory is the exception: each configuration runs in its own subprocess.
"""

from __future__ import annotations

import copy
import functools
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import workloads as W

HERE = Path(__file__).resolve().parent
DROPOUTS = (0.0, 0.05)
TRAIN_VARIANTS = ["full"] + [f"{lib}@{p}" for p in DROPOUTS for lib in ("peft", "hf_lora")]
# Extra hf_lora rows at the dropout whose goals are hardest, each compared with peft@0.05:
# its opt-in chunked causal-LM loss (no tokens x vocab logits kept; causal LMs only), and, in train_step
# only, its default run with peft's exact dropout masks (peft_dropout_masks(): what the fast CPU masks
# save). Ratio key -> variant.
CHUNKED = "hf_lora+chunked@0.05"
PEFT_MASKS = "hf_lora+peft_masks@0.05"
EXTRAS = {"0.05 chunked": CHUNKED, "0.05 peft_masks": PEFT_MASKS}


def train_variants(w: W.Workload, s: Settings) -> list[str]:
    return TRAIN_VARIANTS + ([CHUNKED] if s.chunked_loss and w.task == "causal_lm" else [])


def compared(variants) -> dict[str, tuple[str, str]]:
    """Ratio key ("0.0", "0.05", "0.05 chunked", ...) -> (hf_lora variant, peft variant), for the
    variants measured."""
    out = {str(p): (f"hf_lora@{p}", f"peft@{p}") for p in DROPOUTS}
    out.update({key: (v, "peft@0.05") for key, v in EXTRAS.items() if v in variants})
    return out


H100_BF16_DENSE_TFLOPS = 989.0


@dataclass
class Settings:
    """Everything a run varies; `--quick` and the device pick the defaults (see `settings_for`)."""

    quick: bool = False
    device: str = "cpu"
    amp: str = "none"  # "bf16": torch.autocast(bfloat16)
    threads: int = 1
    batch: int = 4
    seq: int = 128
    warmup: int = 2
    reps: int = 10  # timed rounds of train_step / inference
    mem_reps: int = 3
    mem_steps: int = 3
    mem_long_seq: int | None = 512  # a second peak-memory table at this length (None: skip)
    mem_long_reps: int = 2
    mem_long_steps: int = 2
    inject_reps: int = 5
    switch_layers: int = 4  # GPT-2 depth for adapter_switch (compile time grows with depth)
    switch_seq: int = 64
    switch_n: int = 20
    peak_tflops: float = H100_BF16_DENSE_TFLOPS
    chunked_loss: bool = True  # also measure hf_lora with enable_chunked_loss() (causal LMs)
    workload_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    def workload(self, name: str) -> W.Workload:
        w = W.WORKLOADS[name]
        return w.with_config(**self.workload_overrides.get(name, {}))


QUICK_NOTE = (
    "seq 64 instead of 128; 1 warm-up + 3 timed rounds instead of 2 + 10; peak memory from 1 process of "
    "2 steps per configuration instead of 3 processes of 3 steps, and no long-sequence (512) table; 2 "
    "inject/load repetitions instead of 5; the Llama shape with 4 layers instead of 30; adapter "
    "switching on a 2-layer GPT-2 (instead of 4) with 4 switches (instead of 20)."
)


def settings_for(quick: bool, device: str, threads: int, **overrides: Any) -> Settings:
    s = Settings(quick=quick, device=device, threads=threads)
    if device == "cuda":
        s.amp, s.batch, s.seq, s.mem_long_seq = "bf16", 8, 512, 1024
    if quick:
        s.seq, s.warmup, s.reps = 64, 1, 3
        s.mem_reps, s.mem_steps, s.mem_long_seq = 1, 2, None
        s.inject_reps, s.switch_layers, s.switch_n = 2, 2, 4
        s.workload_overrides = {w.name: w.quick_config for w in W.WORKLOADS.values() if w.quick_config}
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
    return s


# ---- helpers -----------------------------------------------------------------------------------------


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    """Seconds `fn()` takes (device work included), and its result."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "n": len(samples),
        "samples": samples,
    }


def interleaved(
    fns: dict[str, Callable[[], Any]], warmup: int, reps: int, device: str
) -> dict[str, dict[str, Any]]:
    """Run every function once per round (round r starts at function r mod n), after `warmup` rounds
    that are discarded; per-name summaries in seconds, with the samples in round order."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + reps):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            gc.collect()
            dt, _ = timed(fns[n], device)
            if r >= warmup:
                times[n].append(dt)
    return {n: summary(t) for n, t in times.items()}


def ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    return a["median"] / b["median"]


def paired_ratio(a: dict[str, Any], b: dict[str, Any]) -> float:
    """Median of the per-round ratios a_i / b_i: the two ran back to back in each round, so this one
    is less sensitive to load that changes from round to round than the ratio of medians."""
    return statistics.median(x / y for x, y in zip(a["samples"], b["samples"]))


def cleanup() -> None:
    """Collect garbage and return cached device memory (after the caller dropped its references)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class SavedTensors:
    """Inside the block, the distinct storages autograd saves for backward, parameters and buffers
    excluded: the activation memory a training step holds at the end of its forward pass."""

    def __init__(self, model: torch.nn.Module):
        self.exclude = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
        self.sizes: dict[int, int] = {}
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.exclude:
            self.sizes[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def mb(self) -> float:
        return sum(self.sizes.values()) / 2**20

    def __enter__(self) -> SavedTensors:
        self.hooks.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.hooks.__exit__(*exc)


# ---- 1. train_step -----------------------------------------------------------------------------------


def train_step(w: W.Workload, s: Settings) -> dict[str, Any]:
    """One training step (forward, backward, AdamW step, zero_grad) of full fine-tuning and of both
    libraries at dropout 0 and 0.05, interleaved in one process."""
    import hf_lora

    base = W.build_base(w, s.device)
    flops = {lora: W.flops_per_token(base, s.seq, lora) for lora in (False, True)}
    models = W.build_variants(w, [*train_variants(w, s), PEFT_MASKS], s.device, base=base)
    del base
    batch = W.make_batch(w, s.batch, s.seq, s.device)

    # Sanity: same seed, same batch, train mode -> hf_lora and peft give the same loss (dropout draws
    # included: peft_dropout_masks() makes hf_lora draw F.dropout's masks for this forward only), before
    # any step changes the weights. With grad enabled, as in the timed steps (the graph is dropped
    # unused), so that it checks the path being timed.
    # The same forward also counts the bytes autograd saves for backward (a deterministic view of
    # activation memory, next to peak RSS).
    first_loss, saved_mb = {}, {}
    for name, model in models.items():
        model.train()
        torch.manual_seed(W.SEED + 3)
        with (
            torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.amp == "bf16"),
            hf_lora.peft_dropout_masks(),
            SavedTensors(model) as saved,
        ):
            first_loss[name] = model(**batch).loss.item()
        saved_mb[name] = saved.mb

    loss_diff = {
        key: loss_difference(models[ours], models[theirs], batch, s)
        for key, (ours, theirs) in compared(models).items()
    }

    steps = {name: W.make_step(m, batch, s.amp, peft_masks=name == PEFT_MASKS) for name, m in models.items()}
    timings = interleaved(steps, s.warmup, s.reps, s.device)
    tokens = s.batch * s.seq
    out: dict[str, Any] = {
        "variants": timings,
        "trainable_params": {n: W.n_trainable(m) for n, m in models.items()},
        "first_loss": first_loss,
        "saved_for_backward_mb": saved_mb,
        "tokens_per_step": tokens,
        "flops_per_token": {"full": flops[False], "lora": flops[True]},
    }
    for name, t in timings.items():
        t["tokens_per_s"] = tokens / t["median"]
        if s.device == "cuda":
            fpt = flops[name != "full"]
            t["mfu"] = t["tokens_per_s"] * fpt / (s.peak_tflops * 1e12)
    out["ratios"] = {}
    for key, (ours, theirs) in compared(timings).items():
        hf, pf, full = timings[ours], timings[theirs], timings["full"]
        out["ratios"][key] = {
            "hf_lora_variant": ours,
            "peft_variant": theirs,
            "hf_lora/peft": ratio(hf, pf),
            "hf_lora/peft paired": paired_ratio(hf, pf),
            "hf_lora/full": ratio(hf, full),
            "peft/full": ratio(pf, full),
            "loss_diff_hf_lora_vs_peft": loss_diff[key],
        }
    del models, steps
    cleanup()
    return out


def loss_difference(ours: torch.nn.Module, theirs: torch.nn.Module, batch: dict, s: Settings) -> float:
    """|loss of hf_lora - loss of peft| for one seeded training forward of copies of the two models whose
    B is random (at B = 0, as created, the adapters add nothing and any LoRA path would agree), hf_lora
    drawing peft's dropout masks: a check that the timed models compute the same thing."""
    import hf_lora

    a, b = copy.deepcopy(ours), copy.deepcopy(theirs)
    W.randomise_B(a)
    W.copy_lora_weights(a, b)
    losses = []
    for model in (a, b):
        model.train()
        torch.manual_seed(W.SEED + 3)
        with (
            torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.amp == "bf16"),
            hf_lora.peft_dropout_masks(),
        ):
            losses.append(model(**batch).loss.item())
    del a, b
    cleanup()
    return abs(losses[0] - losses[1])


# ---- 2. peak_memory (one subprocess per configuration) ---------------------------------------------


def memory_worker(workload: str, variant: str, s: Settings) -> dict[str, Any]:
    """Run in a fresh process: build one configuration, train `mem_steps` steps, report peak memory.
    Imports only what the configuration needs (no peft for hf_lora or full fine-tuning)."""
    w = s.workload(workload)
    model = W.make_variant(w, variant, W.build_base(w, s.device))
    batch = W.make_batch(w, s.batch, s.seq, s.device)
    step = W.make_step(model, batch, s.amp)
    rss_setup = proc_status_mb("VmRSS")
    if s.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(s.mem_steps):
        step()
    sync(s.device)
    ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    hwm = proc_status_mb("VmHWM")
    out = {
        # ru_maxrss survives fork+exec: a worker started by a parent that holds several models would
        # report the parent's peak. VmHWM belongs to the worker's own address space, so it is the
        # number used; where /proc is missing (not Linux), ru_maxrss is all there is.
        "peak_rss_mb": hwm if hwm is not None else ru_maxrss,
        "ru_maxrss_mb": ru_maxrss,
        "rss_after_setup_mb": rss_setup,
        "peft_imported": "peft" in sys.modules,
    }
    if s.device == "cuda":
        out["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def proc_status_mb(field: str) -> float | None:
    """A memory field of /proc/self/status (VmRSS: now, VmHWM: peak), in MiB; None if unavailable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def run_worker(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    """`run.py --worker KIND` in a fresh Python process; its result is the last JSON line it prints."""
    cmd = [
        sys.executable,
        str(HERE / "run.py"),
        "--worker",
        kind,
        "--worker-args",
        json.dumps(spec, default=str),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{kind} worker {spec} exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_memory_worker(workload: str, variant: str, s: Settings, seq: int, steps: int) -> dict[str, Any]:
    settings = {**asdict(s), "seq": seq, "mem_steps": steps}
    return run_worker("memory", {"workload": workload, "variant": variant, "settings": settings})


def peak_memory(w: W.Workload, s: Settings) -> dict[str, Any]:
    """Peak RSS (and peak CUDA memory on GPU) of a short training run, each configuration in its own
    process, configurations interleaved; `mem_reps` processes of `mem_steps` steps per configuration at
    the run's sequence length, and `mem_long_reps` of `mem_long_steps` at `mem_long_seq`. (Two steps
    reach the peak: the first allocates AdamW's state, the second runs with it.)"""
    out: dict[str, Any] = {}
    plans = [(s.seq, s.mem_reps, s.mem_steps)]
    if s.mem_long_seq:
        plans.append((s.mem_long_seq, s.mem_long_reps, s.mem_long_steps))
    longest = W.max_positions(w)
    plans = [plan for plan in plans if plan[0] <= longest]  # DistilBERT has 512 positions
    for seq, reps, steps in plans:
        variants = train_variants(w, s)
        raw: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for r in range(reps):
            k = r % len(variants)
            for v in variants[k:] + variants[:k]:
                raw[v].append(run_memory_worker(w.name, v, s, seq, steps))
        entry: dict[str, Any] = {"steps": steps, "variants": {}, "ratios": {}}
        for v, runs in raw.items():
            entry["variants"][v] = summary([x["peak_rss_mb"] for x in runs])
            entry["variants"][v]["rss_after_setup_mb"] = statistics.median(
                x["rss_after_setup_mb"] or 0 for x in runs
            )
            if "cuda_max_allocated_mb" in runs[0]:
                entry["variants"][v]["cuda"] = summary([x["cuda_max_allocated_mb"] for x in runs])
            entry["variants"][v]["processes"] = (
                runs  # every worker's own numbers (ru_maxrss_mb, peft_imported, ...)
            )
        vs = entry["variants"]
        for key, (ours, theirs) in compared(vs).items():
            hf, pf, full = vs[ours], vs[theirs], vs["full"]
            entry["ratios"][key] = {
                "hf_lora_variant": ours,
                "peft_variant": theirs,
                "hf_lora/peft": ratio(hf, pf),
                "hf_lora/full": ratio(hf, full),
                "peft/full": ratio(pf, full),
            }
            if "cuda" in hf:
                entry["ratios"][key]["cuda hf_lora/peft"] = ratio(hf["cuda"], pf["cuda"])
        out[str(seq)] = entry
    return out


# ---- 3. inference ------------------------------------------------------------------------------------


INFER_VARIANTS = ["base", "hf_lora", "hf_lora merged", "peft", "peft merged"]


def inference(
    w: W.Workload, s: Settings, batch_size: int | None = None, seq: int | None = None, reps: int | None = None
) -> dict[str, Any]:
    """Forward latency (eval, no_grad) of the base model and of both libraries' adapters, unmerged and
    merged (merge_and_unload), interleaved. B is random so the adapter changes the output; the outputs
    of all four adapter variants are checked to agree."""
    base = W.build_base(w, s.device).eval()
    ours = W.make_hf_lora(w, copy.deepcopy(base), 0.05)
    W.randomise_B(ours)
    ref = W.make_peft(w, copy.deepcopy(base), 0.05)
    W.copy_lora_weights(ours, ref)
    models = {
        "base": base,
        "hf_lora": ours,
        "hf_lora merged": copy.deepcopy(ours).merge_and_unload(),
        "peft": ref,
        "peft merged": copy.deepcopy(ref).merge_and_unload(),
    }
    batch = W.make_batch(w, batch_size or s.batch, seq or s.seq, s.device)
    del batch["labels"]
    for m in models.values():
        m.eval()

    def forward(m: torch.nn.Module) -> Callable[[], Any]:
        def f() -> Any:
            with torch.no_grad(), torch.autocast(s.device, dtype=torch.bfloat16, enabled=s.amp == "bf16"):
                return m(**batch).logits

        return f

    fns = {n: forward(m) for n, m in models.items()}
    logits = {n: f().float() for n, f in fns.items()}
    diffs = {n: (logits[n] - logits["peft"]).abs().max().item() for n in models}
    timings = interleaved(fns, s.warmup, reps or s.reps, s.device)
    out = {
        "variants": timings,
        "max_abs_logit_diff_vs_peft": diffs,
        "ratios": {n: ratio(timings[n], timings["base"]) for n in models},
    }
    del models, fns, logits
    cleanup()
    return out


def one_token(w: W.Workload, s: Settings) -> dict[str, Any]:
    """`inference` of a single token (batch 1, no KV cache), as each step of generation runs: the
    weights' reading and every adapted layer's fixed per-call cost dominate, not the GEMMs' FLOPs."""
    return inference(w, s, batch_size=1, seq=1, reps=5 * s.reps)  # a short forward is noisier


# ---- 4. inject_load ----------------------------------------------------------------------------------


def inject_load(w: W.Workload, s: Settings) -> dict[str, Any]:
    """Time to add a LoRA adapter to a model (`get_lora_model` vs `get_peft_model`) and to load a saved
    adapter (`LoRAModel.from_pretrained` vs `PeftModel.from_pretrained`, both reading the same
    peft-written files), each repetition on a fresh deep copy of the base (the copy is not timed)."""
    import peft

    import hf_lora

    base = W.build_base(w, "cpu").eval()
    with tempfile.TemporaryDirectory() as tmp:
        ours = W.make_hf_lora(w, copy.deepcopy(base), 0.05)
        W.randomise_B(ours)
        ref = W.make_peft(w, copy.deepcopy(base), 0.05)
        W.copy_lora_weights(ours, ref)
        ref.save_pretrained(tmp)
        del ours, ref

        def fresh() -> torch.nn.Module:
            return copy.deepcopy(base)

        ops: dict[str, Callable[[torch.nn.Module], Any]] = {
            "inject hf_lora": lambda m: W.make_hf_lora(w, m, 0.05),
            "inject peft": lambda m: W.make_peft(w, m, 0.05),
            "load hf_lora": lambda m: hf_lora.LoRAModel.from_pretrained(m, tmp),
            "load peft": lambda m: peft.PeftModel.from_pretrained(m, tmp),
            "load peft (low_cpu_mem_usage)": lambda m: peft.PeftModel.from_pretrained(
                m, tmp, low_cpu_mem_usage=True
            ),
        }
        # The loaded adapters must agree before their speed means anything.
        a, b = ops["load hf_lora"](fresh()), ops["load peft"](fresh())
        diff = max(
            (layer.lora_B["default"] - b.base_model.model.get_submodule(path).lora_B["default"].weight)
            .abs()
            .max()
            .item()
            for path, layer in a.lora_layers()
        )
        del a, b

        times: dict[str, list[float]] = {n: [] for n in ops}
        names = list(ops)
        for r in range(s.inject_reps + 1):  # round 0 warms up
            k = r % len(names)
            for n in names[k:] + names[:k]:
                m = fresh()
                gc.collect()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    dt, result = timed(lambda m=m, n=n: ops[n](m), "cpu")
                if r > 0:
                    times[n].append(dt)
                del m, result
                cleanup()
    timings = {n: summary(t) for n, t in times.items()}
    return {
        "variants": timings,
        "loaded_B_max_abs_diff": diff,
        "ratios": {
            "inject hf_lora/peft": ratio(timings["inject hf_lora"], timings["inject peft"]),
            "load hf_lora/peft": ratio(timings["load hf_lora"], timings["load peft"]),
            "load hf_lora/peft (low_cpu_mem_usage)": ratio(
                timings["load hf_lora"], timings["load peft (low_cpu_mem_usage)"]
            ),
        },
    }


# ---- 5. adapter_switch -------------------------------------------------------------------------------


def _compile_counts() -> dict[str, Any]:
    from torch._dynamo.utils import counters, get_compilation_metrics

    metrics = get_compilation_metrics()
    return {
        "frames_compiled": counters["frames"]["ok"],
        "unique_graphs": counters["stats"]["unique_graphs"],
        "graph_breaks": sum(counters["graph_break"].values()),
        "graph_break_reasons": sorted(counters["graph_break"])[:5],
        "recompile_reasons": [m.recompile_reason for m in metrics if m.recompile_reason],
    }


def _reset_compiler() -> None:
    import torch._dynamo
    from torch._dynamo.utils import clear_compilation_metrics, counters

    torch._dynamo.reset()
    counters.clear()
    clear_compilation_metrics()


def _compile_first(model: torch.nn.Module, batch: dict[str, torch.Tensor], device: str) -> tuple:
    """torch.compile with inductor, falling back to aot_eager, then eager, if a backend fails on this
    machine; returns the compiled model, the backend, the errors, and the first forward's time/output."""
    errors = {}
    for backend in ("inductor", "aot_eager", "eager"):
        _reset_compiler()
        compiled = torch.compile(model, backend=backend)
        try:
            with torch.no_grad():
                t_first, y0 = timed(lambda c=compiled: c(**batch).logits, device)
            return compiled, backend, errors, t_first, y0
        except Exception as e:
            errors[backend] = f"{type(e).__name__}: {str(e)[:300]}"
    raise RuntimeError(f"torch.compile failed with every backend: {errors}")


def _switch_one(lib: str, w: W.Workload, base: torch.nn.Module, s: Settings) -> dict[str, Any]:
    if lib == "hf_lora":
        model = W.make_hf_lora(w, copy.deepcopy(base), 0.0)
        model.add_adapter("other", W.lora_config(w, 0.0))
        W.randomise_B(model)
    else:
        model = W.make_peft(w, copy.deepcopy(base), 0.0)
        model.add_adapter("other", W.peft_config(w, 0.0))
        with torch.no_grad():
            for _, m in model.named_modules():
                if hasattr(m, "lora_B") and isinstance(m.lora_B, torch.nn.ModuleDict):
                    for lin in m.lora_B.values():
                        lin.weight.normal_(0, 0.02)
    model.eval()
    adapters = ["default", "other"]

    # set_adapter alone, no compilation.
    set_times = []
    for i in range(2 * s.switch_n):
        dt, _ = timed(lambda i=i: model.set_adapter(adapters[(i + 1) % 2]), s.device)
        set_times.append(dt)
    model.set_adapter("default")

    batch = W.make_batch(w, 1, s.switch_seq, s.device)
    del batch["labels"]
    out: dict[str, Any] = {"set_adapter": summary(set_times)}
    compiled, backend, backend_errors, t_first, y0 = _compile_first(model, batch, s.device)
    out["backend"], out["backend_errors"] = backend, backend_errors
    out["first_compile_s"] = t_first
    out["after_first_forward"] = _compile_counts()
    with torch.no_grad():
        model.set_adapter("other")
        t_second, y1 = timed(lambda: compiled(**batch).logits, s.device)
        out["first_switch_s"] = t_second
        out["after_first_switch"] = _compile_counts()
        out["outputs_differ"] = bool((y0 - y1).abs().max().item() > 0)
        steady, switching = [], []
        for i in range(s.switch_n):
            dt, _ = timed(lambda: compiled(**batch).logits, s.device)  # same adapter as before
            steady.append(dt)
            model.set_adapter(adapters[i % 2])
            dt, _ = timed(lambda: compiled(**batch).logits, s.device)  # first forward after a switch
            switching.append(dt)
        # set_adapter + forward as one unit, as a server switching per request would see it.
        switch_fwd = []
        for i in range(s.switch_n):
            dt, _ = timed(
                lambda i=i: (model.set_adapter(adapters[i % 2]), compiled(**batch).logits), s.device
            )
            switch_fwd.append(dt)
    end = _compile_counts()
    out["end"] = end
    out["recompiles_while_switching"] = end["frames_compiled"] - out["after_first_switch"]["frames_compiled"]
    out["forward_no_switch"] = summary(steady)
    out["forward_after_switch"] = summary(switching)
    out["set_adapter_plus_forward"] = summary(switch_fwd)
    return out


def adapter_switch(w: W.Workload, s: Settings) -> dict[str, Any]:
    """Two adapters of the same rank under torch.compile: how many graphs get compiled, and what
    switching back and forth `switch_n` times costs, for each library; plus `set_adapter` alone."""
    w = w.with_config(n_layer=s.switch_layers)
    base = W.build_base(w, s.device).eval()
    out: dict[str, Any] = {}
    for lib in ("hf_lora", "peft"):
        out[lib] = _switch_one(lib, w, base, s)
        _reset_compiler()
        cleanup()
    out["n_layer"], out["seq"] = s.switch_layers, s.switch_seq
    out["ratios"] = {
        "set_adapter hf_lora/peft": ratio(out["hf_lora"]["set_adapter"], out["peft"]["set_adapter"]),
        "set_adapter+forward hf_lora/peft": ratio(
            out["hf_lora"]["set_adapter_plus_forward"], out["peft"]["set_adapter_plus_forward"]
        ),
    }
    return out


# ---- 7. variants (issue 9) ----------------------------------------------------------------------------


def variants(w: W.Workload, s: Settings) -> dict[str, Any]:
    """What each LoRA variant costs: a training step with DoRA vs plain LoRA in both libraries (dropout 0,
    interleaved), and the time to add a PiSSA- or OLoRA-initialised adapter (an SVD / QR of every
    target weight) vs the default initialisation. LoRA+ only changes the optimizer's learning rate for
    B, so its step costs what plain LoRA's does; rsLoRA only changes the scaling constant."""
    import peft

    import hf_lora

    base = W.build_base(w, s.device)
    batch = W.make_batch(w, s.batch, s.seq, s.device)

    def ours(**extra: Any) -> torch.nn.Module:
        torch.manual_seed(W.SEED + 1)
        return hf_lora.get_lora_model(copy.deepcopy(base), W.lora_config(w, 0.0, **extra))

    def theirs(**extra: Any) -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return peft.get_peft_model(copy.deepcopy(base), W.peft_config(w, 0.0, **extra))

    models = {"hf_lora": ours(), "hf_lora DoRA": ours(use_dora=True), "peft": theirs(),
              "peft DoRA": theirs(use_dora=True)}  # fmt: skip
    steps = {name: W.make_step(m, batch, s.amp) for name, m in models.items()}
    timings = interleaved(steps, s.warmup, s.reps, s.device)
    del models, steps
    cleanup()

    # Each call deep-copies the base (the same work for all) and adds an adapter; the model is dropped.
    inits = {"default": True, "pissa_niter_4": "pissa_niter_4", "olora": "olora"}
    makers = {
        f"{lib} {name}": functools.partial(make, init_lora_weights=value)
        for lib, make in (("hf_lora", ours), ("peft", theirs))
        for name, value in inits.items()
    }
    init_times = interleaved(makers, 1, s.inject_reps, s.device)
    return {
        "variants": timings,
        "init": init_times,
        "ratios": {
            "hf_lora DoRA/hf_lora": ratio(timings["hf_lora DoRA"], timings["hf_lora"]),
            "peft DoRA/peft": ratio(timings["peft DoRA"], timings["peft"]),
            "hf_lora DoRA/peft DoRA": ratio(timings["hf_lora DoRA"], timings["peft DoRA"]),
            "hf_lora/peft": ratio(timings["hf_lora"], timings["peft"]),
        },
    }


# ---- 6. profile --------------------------------------------------------------------------------------


def profile(w: W.Workload, s: Settings) -> dict[str, Any]:
    """torch.profiler tables (top ops by self CPU time) of one training step of each library at
    dropout 0.05, after two warm-up steps."""
    from torch.profiler import ProfilerActivity

    models = W.build_variants(w, ["peft@0.05", "hf_lora@0.05"], s.device)
    batch = W.make_batch(w, s.batch, s.seq, s.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.device == "cuda" else [])
    sort = "self_device_time_total" if s.device == "cuda" else "self_cpu_time_total"
    out = {}
    for name, model in models.items():
        out[name] = {"table": _profile_step(W.make_step(model, batch, s.amp), activities, sort, s.device)}
    del models, model
    cleanup()
    return out


def _profile_step(step: Callable[[], Any], activities: list, sort: str, device: str) -> str:
    from torch.profiler import profile as torch_profile

    for _ in range(2):
        step()
    sync(device)
    with torch_profile(activities=activities) as prof:
        step()
        sync(device)
    return prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=40)


MEASUREMENTS: dict[str, Callable[[W.Workload, Settings], dict[str, Any]]] = {
    "train_step": train_step,
    "peak_memory": peak_memory,
    "inference": inference,
    "one_token": one_token,
    "inject_load": inject_load,
    "adapter_switch": adapter_switch,
    "profile": profile,
    "variants": variants,
}
# Measurements that use a fixed workload instead of the --workloads list.
FIXED_WORKLOAD = {
    "inject_load": "gpt2-medium",
    "adapter_switch": "gpt2",
    "profile": "gpt2",
    "variants": "gpt2",
}

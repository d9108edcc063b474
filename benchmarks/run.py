"""Benchmarks of hf_lora against peft (and full fine-tuning), for issue 7.

    python benchmarks/run.py --quick                    # ~5-10 min: every measurement, small settings
    python benchmarks/run.py                            # the full run (~45-60 min on 2 CPU cores)
    python benchmarks/run.py --only train_step --workloads gpt2
    python benchmarks/run.py --list

A full run writes BENCHMARKS.md (repository root) and benchmarks/results.json; a quick run writes
benchmarks/quick/BENCHMARKS.md and benchmarks/quick/results.json, so it never replaces full results.
Results of measurements not run this time are kept from the previous results.json (each section says
which run produced it; --fresh starts from nothing), and the report's commentary section is kept.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from measurements import (  # noqa: E402
    FIXED_WORKLOAD,
    MEASUREMENTS,
    QUICK_NOTE,
    Settings,
    memory_worker,
    run_worker,
    settings_for,
)
from report import (  # noqa: E402
    ROOT,
    environment,
    existing_commentary,
    existing_micro,
    existing_title,
    render,
)
from workloads import SEED, TRAIN_WORKLOADS, WORKLOADS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small settings (see README); separate output files")
    ap.add_argument(
        "--only", nargs="+", choices=list(MEASUREMENTS), metavar="NAME", help="measurements to run"
    )
    ap.add_argument(
        "--workloads",
        nargs="+",
        choices=TRAIN_WORKLOADS,
        metavar="NAME",
        help=f"workloads for train_step / peak_memory / inference (default: {' '.join(TRAIN_WORKLOADS)})",
    )
    ap.add_argument("--threads", type=int, help="torch.set_num_threads (default: all cores)")
    ap.add_argument("--device", choices=["cpu", "cuda"], help="default: cuda if available, else cpu")
    ap.add_argument(
        "--amp", choices=["none", "bf16"], help="autocast dtype (default: bf16 on cuda, none on cpu)"
    )
    ap.add_argument("--batch", type=int, help="batch size (default 4 on CPU, 8 on GPU)")
    ap.add_argument("--seq", type=int, help="sequence length (default 128 on CPU / 64 quick, 512 on GPU)")
    ap.add_argument("--reps", type=int, help="timed rounds for train_step / inference")
    ap.add_argument("--warmup", type=int, help="discarded warm-up rounds")
    ap.add_argument("--mem-reps", type=int, help="processes per configuration for peak_memory")
    ap.add_argument(
        "--no-chunked-loss",
        action="store_true",
        help="skip the extra hf_lora variant with enable_chunked_loss() (causal LMs, dropout 0.05)",
    )
    ap.add_argument("--peak-tflops", type=float, help="device peak for MFU (default: H100 bf16 dense, 989)")
    ap.add_argument("--md", type=Path, help="report path (default: BENCHMARKS.md, or benchmarks/quick/…)")
    ap.add_argument("--json", type=Path, help="results path (default: benchmarks/results.json, or …/quick/…)")
    ap.add_argument("--fresh", action="store_true", help="do not keep results of earlier runs")
    ap.add_argument("--list", action="store_true", help="list measurements and workloads, then exit")
    ap.add_argument(
        "--in-process", action="store_true", help="run the measurements in this process (for debugging)"
    )
    ap.add_argument("--worker", choices=["memory", "measure"], help=argparse.SUPPRESS)
    ap.add_argument("--worker-args", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """Subprocess entry point: one peak_memory configuration ("memory") or one measurement of one
    workload ("measure"); the result as one JSON line on stdout."""
    spec = json.loads(args.worker_args)
    s = Settings(**spec["settings"])
    torch.set_num_threads(s.threads)
    torch.manual_seed(SEED)
    if args.worker == "memory":
        result = memory_worker(spec["workload"], spec["variant"], s)
    else:
        result = MEASUREMENTS[spec["measurement"]](s.workload(spec["workload"]), s)
    print(json.dumps(result, default=str), flush=True)


def measure_in_subprocess(measurement: str, workload: str, s: Settings) -> dict[str, Any]:
    """One measurement in a fresh process: nothing one measurement allocates, compiles or caches can
    slow down the next or add up (a single process holding every measurement was once OOM-killed)."""
    return run_worker("measure", {"measurement": measurement, "workload": workload, "settings": asdict(s)})


def plan(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(measurement, workload) pairs, in order."""
    names = args.only or list(MEASUREMENTS)
    workloads = args.workloads or list(TRAIN_WORKLOADS)
    return [(m, wl) for m in names for wl in ([FIXED_WORKLOAD[m]] if m in FIXED_WORKLOAD else workloads)]


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def quiet() -> None:
    """Silence deprecation chatter from transformers/peft; it says nothing about the measurements."""
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
    transformers.logging.set_verbosity_error()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    quiet()
    if args.worker:
        worker(args)
        return 0
    if args.list:
        for m, fn in MEASUREMENTS.items():
            print(f"{m:15s} {(fn.__doc__ or '').split(chr(10))[0]}")
        for w in WORKLOADS.values():
            print(f"{w.name:15s} {w.description}")
        return 0

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = args.threads or cores or 1
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    s = settings_for(
        args.quick,
        device,
        threads,
        amp=args.amp,
        batch=args.batch,
        seq=args.seq,
        reps=args.reps,
        warmup=args.warmup,
        mem_reps=args.mem_reps,
        peak_tflops=args.peak_tflops,
        chunked_loss=False if args.no_chunked_loss else None,
    )
    out_dir = HERE / "quick" if args.quick else HERE
    md_path = args.md or (out_dir / "BENCHMARKS.md" if args.quick else ROOT / "BENCHMARKS.md")
    json_path = args.json or out_dir / "results.json"

    results: dict[str, Any] = {"runs": {}, "measurements": {}}
    if json_path.exists() and not args.fresh:
        results = json.loads(json_path.read_text())
    run_id = time.strftime("%Y%m%d-%H%M%S")
    command = "python benchmarks/run.py" + ("" if not sys.argv[1:] else " " + shlex.join(sys.argv[1:]))
    run: dict[str, Any] = {"command": command, "env": environment(device), "settings": vars(s).copy()}
    if args.quick:
        run["quick_note"] = QUICK_NOTE
    print(
        f"run {run_id}: {command}\n  {run['env']['cpu']}, torch threads {threads}, device {device}",
        flush=True,
    )

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > 1.0:
        print(
            f"  warning: load average {load:.1f} before starting: other processes are running, so timings "
            "will be noisy"
            + (
                f"; with {threads} threads per op, OpenMP threads that wait for a descheduled sibling can "
                "make small ops many times slower (try --threads 1 to compare)"
                if threads > 1
                else ""
            ),
            flush=True,
        )
    partial = json_path.with_name(json_path.name + ".partial")
    started, failed = time.perf_counter(), []
    for m, wl in plan(args):
        print(f"[{time.perf_counter() - started:7.1f}s] {m} / {wl} ...", flush=True)
        t0 = time.perf_counter()
        try:
            entry = MEASUREMENTS[m](s.workload(wl), s) if args.in_process else measure_in_subprocess(m, wl, s)
        except Exception:
            traceback.print_exc()
            entry = {"error": traceback.format_exc()}
            failed.append(f"{m}/{wl}")
        entry["run"], entry["seconds"] = run_id, time.perf_counter() - t0
        results["measurements"].setdefault(m, {})[wl] = entry
        print(f"          done in {entry['seconds']:.1f}s", flush=True)
        # Progress so far, for a long run that gets interrupted (the real files are written at the end).
        write_atomic(partial, json.dumps({**results, "partial_run": run}, indent=1, default=str) + "\n")

    run["seconds"] = time.perf_counter() - started
    run["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["runs"][run_id] = run
    # Keep only the runs some result still comes from.
    used = {e.get("run") for entries in results["measurements"].values() for e in entries.values()}
    results["runs"] = {k: v for k, v in results["runs"].items() if k in used}
    write_atomic(json_path, json.dumps(results, indent=1, default=str) + "\n")
    shown_json = json_path.relative_to(ROOT) if json_path.is_relative_to(ROOT) else json_path
    report = render(
        results,
        existing_commentary(md_path),
        existing_title(md_path),
        str(shown_json),
        existing_micro(md_path),
    )
    write_atomic(md_path, report)
    partial.unlink(missing_ok=True)
    print(f"took {run['seconds'] / 60:.1f} min; wrote {md_path} and {json_path}")
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

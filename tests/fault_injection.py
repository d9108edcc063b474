"""Fault injection: make an operation fail at every step it takes, and check what it leaves behind.

A `sys.settrace` tracer counts the calls of hf_lora's own functions and raises `Injected` at the n-th; an
operation that changes the model must then leave it exactly as before (module classes and identities,
parameters and their flags, buffers, attributes), and a retry must work.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

import hf_lora


class Injected(Exception):
    pass


def fail_at_call(n: int | None):
    """A `sys.settrace` tracer that raises `Injected` at the n-th call of a function of hf_lora, and the
    list of the functions called (n=None only records)."""
    called: list = []
    root = str(Path(hf_lora.__file__).parent)

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(root):
            called.append(frame.f_code)
            if len(called) == n:
                sys.settrace(None)
                raise Injected(f"injected failure at call {n} ({frame.f_code.co_name})")
        return None

    return tracer, called


def model_state(model) -> dict:
    """Everything a failed call must leave as it was: classes and identities of the modules, parameters
    (the same objects, the same values, the same flags), buffers."""
    return {
        "modules": [(n, type(m), id(m)) for n, m in model.named_modules()],
        "params": [(n, id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
        "buffers": [(n, id(b), b.clone()) for n, b in model.named_buffers()],
        "attrs": {n: sorted(vars(m)) for n, m in model.named_modules()},
        "values": {n: _plain_values(m) for n, m in model.named_modules()},
    }


_PLAIN = (str, int, float, bool, tuple, list, dict, type(None))


def _plain_values(module) -> dict[str, str]:
    """A module's public attributes of plain types (active and merged adapters, scalings, configs, flags),
    by their repr."""
    return {k: repr(v) for k, v in vars(module).items() if not k.startswith("_") and isinstance(v, _PLAIN)}


def assert_same(a: dict, b: dict, rounding: float = 0.0) -> None:
    """`b` is the state `a` was; parameters equal, or within `rounding` eps of their magnitude (an unmerge
    undone by merging again: W - d + d, see tolerance.MERGE_ROUNDINGS)."""
    assert a["modules"] == b["modules"], [m for m in b["modules"] if m not in a["modules"]][:5]
    for name, attrs in a["attrs"].items():
        assert attrs == b["attrs"][name], f"{name}: {sorted(set(attrs) ^ set(b['attrs'][name]))}"
    for name, values in a["values"].items():
        assert values == b["values"][name], f"attributes of {name or 'the model'} changed"
    for (n1, i1, g1, t1), (n2, i2, g2, t2) in zip(a["params"], b["params"], strict=True):
        assert (n1, i1, g1) == (n2, i2, g2), n1
        if rounding:
            bound = rounding * torch.finfo(t1.dtype).eps * max(1.0, t1.abs().max().item())
            torch.testing.assert_close(t2, t1, rtol=0, atol=bound, msg=lambda m, n1=n1: f"{n1}: {m}")
        else:
            assert torch.equal(t1, t2), n1
    for (n1, i1, t1), (n2, i2, t2) in zip(a["buffers"], b["buffers"], strict=True):
        assert (n1, i1) == (n2, i2) and torch.equal(t1, t2), n1


def every_step(act, fresh, rounding: float = 0.0) -> int:
    """Inject a failure into `act(model)` at the first and the last call of each function of hf_lora it
    runs, on a fresh model each time: each must leave the model exactly as before (the parameters up to
    `rounding`, see `assert_same`), and a retry on it must then work. Returns the number of places."""
    tracer, called = fail_at_call(None)
    sys.settrace(tracer)
    try:
        act(fresh())
    finally:
        sys.settrace(None)
    first = {code: i for i, code in reversed(list(enumerate(called, 1)))}
    last = {code: i for i, code in enumerate(called, 1)}
    places = sorted(set(first.values()) | set(last.values()))
    assert len(first) > 10
    failed = None
    for n in places:
        model = fresh()
        before = model_state(model)
        tracer, _ = fail_at_call(n)
        sys.settrace(tracer)
        try:
            act(model)
        except Injected:
            failed = model
        else:  # (the call caught it and went on: fine, if it then did its job)
            continue
        finally:
            sys.settrace(None)
        assert_same(before, model_state(model), rounding)
    if failed is not None:
        act(failed)  # a retry on a model where it failed works
    return len(places)

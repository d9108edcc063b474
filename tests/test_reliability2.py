"""Reliability, round two: bad inputs beyond tests/test_reliability.py's matrix. Config values of the
wrong type or size, regexes that backtrack, ambiguous or oversized weight files, operations failing half
way, CLI misuse, secrets in errors. Where the cases repeat they are properties (hypothesis)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from fault_injection import every_step
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reference import randomise_B
from safetensors.torch import load_file, save_file
from tiny_models import MLP, make_model

from hf_lora import AdapterFormatError, LoRAConfig, LoRAModel, get_lora_model
from hf_lora.reading import read_adapter

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A good GPT-2 adapter on disk; cases copy and change it."""
    out = tmp_path_factory.mktemp("good")
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=GPT2_TARGETS))
    randomise_B(model)
    model.save_pretrained(out)
    return out


def copy_of(saved: Path, tmp: Path) -> Path:
    target = tmp / "adapter"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(saved, target)
    return target


def with_config(saved: Path, tmp: Path, **changes) -> Path:
    d = copy_of(saved, tmp)
    cfg = json.loads((d / "adapter_config.json").read_text())
    cfg.update(changes)
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    return d


# ---- 1. the config schema -----------------------------------------------------------------------------

# field -> a value of a wrong type, and words the error must hold (the field, the type wanted)
WRONG_TYPES = [
    ("use_rslora", "false", "use_rslora must be true or false"),
    ("use_dora", 1, "use_dora must be true or false"),
    ("fan_in_fan_out", "no", "fan_in_fan_out must be true or false"),
    ("inference_mode", None, "inference_mode must be true or false"),
    ("target_modules", 5, "target_modules must be"),
    ("exclude_modules", 5, "exclude_modules must be"),
    ("modules_to_save", 3, "modules_to_save must be"),
    ("rank_pattern", ["q_proj", 2], "rank_pattern must be"),
    ("alpha_pattern", "c_attn", "alpha_pattern must be"),
    ("layers_pattern", 7, "layers_pattern must be"),
    ("trainable_token_indices", 12, "trainable_token_indices must be"),
    ("base_model_name_or_path", ["gpt2"], "base_model_name_or_path must be"),
    ("revision", 3, "revision must be"),
    ("task_type", 3, "task_type must be"),
    ("r", [4], "r must be a positive integer"),
    ("lora_alpha", {"x": 1}, "lora_alpha must be a positive number"),
    ("bias", ["none"], "bias must be one of"),
]


@pytest.mark.parametrize(("field", "value", "words"), WRONG_TYPES, ids=[c[0] for c in WRONG_TYPES])
def test_a_value_of_the_wrong_type_is_named_with_its_field_before_anything_is_built(
    field, value, words, saved, tmp_path
):
    model = make_model("gpt2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(AdapterFormatError, match=words) as info:
        LoRAModel.from_pretrained(model, with_config(saved, tmp_path, **{field: value}))
    text = str(info.value)
    assert "adapter_config.json" in text and "object is not iterable" not in text
    assert "update sequence" not in text and len(text) < 2000
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize(("field", "value", "words"), WRONG_TYPES, ids=[c[0] for c in WRONG_TYPES])
def test_the_same_wrong_types_in_code_are_value_errors_naming_the_field(field, value, words):
    with pytest.raises(ValueError, match=words):
        LoRAConfig(**{field: value})


def test_a_deeply_nested_config_is_refused_naming_the_depth(saved, tmp_path):
    d = copy_of(saved, tmp_path)
    cfg = json.loads((d / "adapter_config.json").read_text())
    text = json.dumps(cfg)[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    (d / "adapter_config.json").write_text(text)
    with pytest.raises(AdapterFormatError, match="nested deeper than"):
        LoRAModel.from_pretrained(make_model("gpt2"), d)


def test_a_huge_list_is_refused_in_one_short_line(saved, tmp_path, caplog):
    d = with_config(saved, tmp_path, target_modules=[f"m{i}" for i in range(1_000_000)])
    with pytest.raises(AdapterFormatError, match="target_modules has 1000000 items") as info:
        LoRAModel.from_pretrained(make_model("gpt2"), d)
    assert len(str(info.value)) < 2000 and len(caplog.text) < 5000


def test_a_huge_config_file_is_refused_before_it_is_read(saved, tmp_path, monkeypatch):
    d = copy_of(saved, tmp_path)
    with open(d / "adapter_config.json", "r+b") as f:  # sparse: 200 MiB of nothing
        f.seek(200 * 2**20)
        f.write(b" ")
    read = []
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: read.append(self) or "")
    monkeypatch.setattr(Path, "read_bytes", lambda self, *a, **k: read.append(self) or b"")
    with pytest.raises(AdapterFormatError, match=r"adapter_config\.json is 200\.0 MiB"):
        LoRAModel.from_pretrained(make_model("gpt2"), d)
    assert not read


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=st.sampled_from([f for f, _, _ in WRONG_TYPES]),
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
        max_leaves=6,
    ),
)
def test_property_any_json_value_in_any_field_reads_or_fails_naming_that_field(field, value, saved, tmp_path):
    """Reading (the schema check, before any model is touched) accepts the value or names the field."""
    d = with_config(saved, tmp_path, **{field: value})
    try:
        read_adapter(d)
    except AdapterFormatError as e:
        assert field in str(e) and len(str(e)) < 2000, str(e)[:500]


# ---- 2. regexes from files --------------------------------------------------------------------------

EVIL = [
    ("target_modules", r"(a|a)*b"),
    ("target_modules", r"(.*)*x"),
    ("target_modules", r"(\w+\.?)+z"),
    ("exclude_modules", r"(.+)+$x"),
    ("rank_pattern", {r"(h+)+q": 2}),
    ("alpha_pattern", {r"(.*\.)*zz": 2}),
    ("target_modules", ".*" * 12 + "zz"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("field", "value"), EVIL, ids=[f"{f}:{v}" for f, v in EVIL])
def test_a_catastrophic_regex_from_a_file_is_refused_fast_naming_it(field, value, saved, tmp_path):
    d = with_config(saved, tmp_path, **{field: value})
    start = time.perf_counter()
    with pytest.raises(AdapterFormatError, match="backtrack") as info:
        LoRAModel.from_pretrained(make_model("gpt2"), d)
    assert time.perf_counter() - start < 10
    shown = value if isinstance(value, str) else next(iter(value))
    assert repr(shown) in str(info.value)


@pytest.mark.parametrize(
    "pattern",
    [
        r".*\.(c_attn|c_proj)",
        r"transformer\.h\.\d+\.attn\.c_attn",
        r".*h\.[01]\.(attn|mlp)\.c_.*",
        r"(.*\.)?c_fc",
    ],
)
def test_ordinary_regexes_still_load(pattern, saved, tmp_path):
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=4, target_modules=pattern))
    model.save_pretrained(tmp_path / "ok")
    LoRAModel.from_pretrained(make_model("gpt2"), tmp_path / "ok")


# ---- 5. ambiguous or oversized weight files ----------------------------------------------------------


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    return load_file(d / "adapter_model.safetensors")


def test_a_tensor_under_two_key_spellings_is_refused(saved, tmp_path):
    d = copy_of(saved, tmp_path)
    t = _tensors(d)
    key = next(k for k in t if k.endswith("lora_A.weight"))
    t[key.replace("lora_A.weight", "lora_A.default.weight")] = torch.randn_like(t[key])  # the stray one
    save_file(t, d / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match=r"same tensor under two names.*lora_A\.default\.weight"):
        LoRAModel.from_pretrained(make_model("gpt2"), d)


def _raw_safetensors(header: dict, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data


def test_duplicate_header_keys_are_refused(saved, tmp_path):
    d = copy_of(saved, tmp_path)
    t = _tensors(d)
    key = next(iter(t))
    blob = (d / "adapter_model.safetensors").read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8 : 8 + n])
    entry = json.dumps({key: header[key]})[1:-1]
    text = blob[8 : 8 + n].decode().rstrip()
    text = text[:-1] + "," + entry + "}"  # the same key again, at the end
    (d / "adapter_model.safetensors").write_bytes(
        len(text).to_bytes(8, "little") + text.encode() + blob[8 + n :]
    )
    with pytest.raises(AdapterFormatError, match=r"names .* more than once"):
        LoRAModel.from_pretrained(make_model("gpt2"), d)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool, torch.uint8])
def test_integer_or_bool_weights_are_refused(dtype, saved, tmp_path):
    d = copy_of(saved, tmp_path)
    t = _tensors(d)
    key = next(k for k in t if k.endswith("lora_B.weight"))
    t[key] = t[key].to(dtype)
    save_file(t, d / "adapter_model.safetensors")
    with pytest.raises(AdapterFormatError, match="not a floating-point tensor"):
        LoRAModel.from_pretrained(make_model("gpt2"), d)


def test_shapes_are_checked_from_the_header_before_any_data_is_read(saved, tmp_path):
    """A sparse file declaring a 1 GiB tensor for a module of the model: refused without reading it."""
    d = copy_of(saved, tmp_path)
    t = _tensors(d)
    key = next(k for k in t if k.endswith("lora_A.weight"))
    header, data, offset = {}, b"", 0
    for k, v in t.items():
        if k == key:
            continue
        raw = v.contiguous().numpy().tobytes()
        header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(raw)]}
        data, offset = data + raw, offset + len(raw)
    huge = 2**28  # float32 elements: 1 GiB
    header[key] = {"dtype": "F32", "shape": [huge // 64, 64], "data_offsets": [offset, offset + 4 * huge]}
    path = d / "adapter_model.safetensors"
    path.write_bytes(_raw_safetensors(header, data))
    with open(path, "r+b") as f:  # the declared bytes exist, as a hole
        f.truncate(path.stat().st_size + 4 * huge)
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(AdapterFormatError, match=r"has shape \(4194304, 64\), the model needs"):
        LoRAModel.from_pretrained(make_model("gpt2"), d)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024  # (Linux: kB)
    assert grown_mib < 100, f"a failed load took {grown_mib:.0f} MiB"


# ---- 3. every mutating operation is all or nothing ----------------------------------------------------


CONFIGS = {
    "lora+saved+tokens": LoRAConfig(
        r=4, target_modules=["c_attn", "c_fc"], modules_to_save=["ln_f"], trainable_token_indices=[1, 2]
    ),
    "dora": LoRAConfig(r=4, target_modules=["c_proj"], use_dora=True),
    "pissa": LoRAConfig(r=4, target_modules=["c_attn"], init_lora_weights="pissa"),
}


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_get_lora_model_failing_at_any_step_leaves_the_model_exactly_as_before(config):
    steps = every_step(lambda m: get_lora_model(m, config), lambda: make_model("gpt2"))
    print(f"{steps} steps")


@pytest.mark.parametrize("config", CONFIGS.values(), ids=CONFIGS.keys())
def test_add_adapter_failing_at_any_step_leaves_the_model_exactly_as_before(config):
    def fresh():
        torch.manual_seed(0)
        return get_lora_model(make_model("gpt2"), LoRAConfig(r=2, target_modules=["c_attn"]))

    every_step(lambda m: m.add_adapter("other", config.replace(trainable_token_indices=None)), fresh)


def test_saving_several_adapters_writes_none_when_a_subfolder_cannot_be_written(tmp_path):
    model = get_lora_model(make_model("gpt2"), LoRAConfig(r=2, target_modules=["c_attn"]))
    model.add_adapter("other", LoRAConfig(r=2, target_modules=["c_fc"]))
    out = tmp_path / "out"
    model.save_pretrained(out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    randomise_B(model)
    shutil.rmtree(out / "other")
    (out / "other").write_text("a file where the subfolder should be")
    with pytest.raises(OSError):
        model.save_pretrained(out)
    root = {p: p.read_bytes() for p in out.glob("*") if p.is_file() and p.name != "other"}
    assert root == {p: b for p, b in before.items() if p.parent == out}, "the root adapter was rewritten"


# ---- 6. the CLI ---------------------------------------------------------------------------------------

HF_LORA = str(Path(sys.executable).with_name("hf-lora"))


def cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [HF_LORA, *map(str, args)], capture_output=True, text=True, timeout=300, env=os.environ | env
    )


def assert_one_line_exit_2(proc: subprocess.CompletedProcess, command: str, reason: str) -> str:
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert "Traceback" not in proc.stderr and lines[-1].startswith(f"hf-lora {command}: error:"), lines
    assert reason in lines[-1], lines[-1]
    return lines[-1]


@pytest.fixture(scope="module")
def models_on_disk(tmp_path_factory, saved):
    root = tmp_path_factory.mktemp("cli")
    make_model("gpt2").save_pretrained(root / "base")
    tuned = make_model("gpt2")
    with torch.no_grad():
        tuned.transformer.h[0].attn.c_attn.weight.add_(0.01)
    tuned.save_pretrained(root / "tuned")
    return root


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("onto", ["base", "adapter"])
def test_merge_never_writes_over_an_input(onto, models_on_disk, saved, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models_on_disk / "base", base)
    adapter = copy_of(saved, tmp_path)
    before = {"base": _files(base), "adapter": _files(adapter)}
    out = {"base": base, "adapter": adapter}[onto]
    proc = cli("merge", base, adapter, out)
    assert_one_line_exit_2(proc, "merge", f"is the {onto} folder")
    assert _files(base) == before["base"] and _files(adapter) == before["adapter"]


def test_extract_never_writes_over_an_input(models_on_disk, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(models_on_disk / "base", base)
    before = _files(base)
    proc = cli("extract", base, models_on_disk / "tuned", base, "--r", "2")
    assert_one_line_exit_2(proc, "extract", "is the base folder")
    assert _files(base) == before


def test_extract_refuses_a_rank_larger_than_a_layer_can_have(models_on_disk, tmp_path):
    proc = cli("extract", models_on_disk / "base", models_on_disk / "tuned", tmp_path / "o", "--r", "65")
    assert_one_line_exit_2(proc, "extract", "r=65 is larger than the rank an update of any target layer")
    assert not (tmp_path / "o").exists()


def test_an_unexpected_error_is_one_line_too(tmp_path):
    """A config nested beyond Python's recursion limit failed with a traceback; any error: one line."""
    d = tmp_path / "deep"
    d.mkdir()
    (d / "adapter_config.json").write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_exit_2(cli("info", d), "info", "nested deeper than")
    for error, words in (("{}['url']", "lacks the entry 'url'"), ("1 / 0", "ZeroDivisionError")):
        code = f"import sys; from hf_lora import cli\ndef bad(args): {error}\ncli._info = bad\n"
        code += "sys.exit(cli.main(['info', 'x']))"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        line = assert_one_line_exit_2(proc, "info", words)
        assert line != "hf-lora info: error: 'url'"


# ---- 7, 8. secrets and honest Hub errors ----------------------------------------------------------------

SECRET = "hf_SeCrEtToKeN0123456789abcdef"


@pytest.fixture
def failing_hub():
    """A Hub that answers every request with HTTP 500, echoing the request's headers in its body."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            body = json.dumps({"error": f"internal error; request headers: {dict(self.headers)}"}).encode()
            self.send_response(500)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        do_GET = do_HEAD = do_POST = _answer

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_a_hub_error_says_what_the_server_answered_and_never_shows_the_token(failing_hub, tmp_path):
    env = {"HF_ENDPOINT": failing_hub, "HF_HOME": str(tmp_path / "home"), "HF_HUB_DISABLE_XET": "1"}
    env |= {"HF_HUB_ETAG_TIMEOUT": "5", "HF_HUB_DOWNLOAD_TIMEOUT": "5"}
    code = (
        "from hf_lora.reading import read_adapter\n"
        f"try:\n    read_adapter('alice/adapter', token={SECRET!r})\n"
        "except Exception as e:\n    print(type(e).__name__, str(e), repr(e.__cause__), repr(e.__context__))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=os.environ | env)  # fmt: skip
    assert "HubError" in proc.stdout and "answered HTTP 500" in proc.stdout, proc.stdout + proc.stderr[-2000:]
    assert "cannot be reached" not in proc.stdout
    assert SECRET not in proc.stdout + proc.stderr
    cli_proc = cli("info", "alice/adapter", **env, HF_TOKEN=SECRET)
    assert_one_line_exit_2(cli_proc, "info", "answered HTTP 500")
    assert SECRET not in cli_proc.stdout + cli_proc.stderr


@settings(max_examples=100, deadline=None)
@given(token=st.from_regex(r"hf_[A-Za-z0-9]{30,40}", fullmatch=True), around=st.text(max_size=40))
def test_property_scrubbing_removes_any_token_wherever_it_sits(token, around):
    from hf_lora.secrets import scrub_secrets

    for text in (
        f"{around}{token}{around}",
        f"Authorization: Bearer {token}",
        f"{{'authorization': '{token}'}}",
    ):
        assert token not in scrub_secrets(text), text
        assert token not in scrub_secrets(text.replace(token, token[3:]), token[3:])  # (any given token)


# ---- 4. a reader beside writers -------------------------------------------------------------------------


def _save_forever(directory: str, r: int, stop) -> None:
    torch.set_num_threads(1)
    model = get_lora_model(MLP(), LoRAConfig(r=r, lora_alpha=r, target_modules=["fc1", "fc2"]))
    while not stop.is_set():
        model.save_pretrained(directory, model_card=False)


@pytest.mark.timeout(180)
def test_a_reader_beside_two_writers_sees_one_whole_save(tmp_path):
    """Two processes save adapters of r=4 and r=8 into one folder while this one reads it: each read must
    be one save's config with that save's weights (torn mixes, r=4 config with r=8 weights, came out)."""
    directory = tmp_path / "adapter"
    get_lora_model(MLP(), LoRAConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"])).save_pretrained(
        directory
    )
    ctx = multiprocessing.get_context("fork")
    stop = ctx.Event()
    writers = [ctx.Process(target=_save_forever, args=(str(directory), r, stop)) for r in (4, 8)]
    for w in writers:
        w.start()
    seen = set()
    try:
        start = time.monotonic()  # read for 5 s, and on until both writers' saves were seen (20 s at most)
        while (elapsed := time.monotonic() - start) < 5 or (len(seen) < 2 and elapsed < 20):
            files = read_adapter(directory)
            weights_r = files.tensors["base_model.model.fc1.lora_A.weight"].shape[0]
            assert files.config.r == files.config.lora_alpha == weights_r, (files.config.r, weights_r)
            seen.add(weights_r)
    finally:
        stop.set()
        for w in writers:
            w.join(timeout=30)
    assert seen == {4, 8}, "the reader saw both writers' saves"


_REGEX_PIECES = [
    "a",
    "h",
    ".",
    r"\.",
    ".*",
    ".+",
    r"\d+",
    "[^.]*",
    r"\w",
    "(",
    ")",
    "|",
    "*",
    "+",
    "?",
    "{2,}",
]
_LONG_PATH = "model.language_model.layers.10.self_attn.q_proj.base_layer.lora_dropout.default.weights.x"


_ATOMS = [".*", ".+", "a+", "h?", ".?", "a|a", r"\w+", "h", r"\.", "[^.]*", r"\d+|\."]


@st.composite
def regexes(draw):
    """Free sequences of regex pieces, and groups of atoms under a quantifier (where backtracking lives)."""
    free = "".join(draw(st.lists(st.sampled_from(_REGEX_PIECES), max_size=8)))
    inner = "".join(draw(st.lists(st.sampled_from(_ATOMS), min_size=1, max_size=3)))
    group = f"({inner}){draw(st.sampled_from(['*', '+', '{2,}', '?', '']))}"
    tail = draw(st.sampled_from(["x", "!", "", "a", r"\.q"]))
    return draw(st.sampled_from([free, group + tail, free + group + tail]))


@pytest.mark.timeout(120)  # (without the guard, a catastrophic pattern is drawn and hangs: fails here)
@settings(max_examples=300, deadline=None)
@given(regexes())
def test_property_a_regex_the_guard_accepts_matches_fast(pattern):
    """Any pattern: refused by the guard, or matched against a long module path in well under a second
    (as target_modules, and inside peft's rank_pattern wrapper). Measured bound for accepted patterns: a few
    ms; 0.5 s leaves room for a slow machine, while a catastrophic one takes seconds to years."""
    import re

    from hf_lora.regex_guard import backtracking_problem

    try:
        re.compile(pattern)
    except re.error:
        return
    if backtracking_problem(pattern) is not None:
        return
    start = time.perf_counter()
    re.fullmatch(pattern, _LONG_PATH)
    re.fullmatch(pattern, _LONG_PATH + "!")
    re.match(rf"(.*\.)?({pattern})$", _LONG_PATH + "!")
    assert time.perf_counter() - start < 0.5, pattern


_DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "X9"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_property_a_damaged_header_loads_or_is_refused_as_a_format_error(data, saved, tmp_path):
    """Shapes, dtypes, offsets and keys of the safetensors header changed at random: the load works (the
    change was harmless) or fails with AdapterFormatError; never another exception, never a wrong load."""
    d = copy_of(saved, tmp_path)
    path = d / "adapter_model.safetensors"
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header, body = json.loads(blob[8 : 8 + n]), blob[8 + n :]
    keys = sorted(k for k in header if k != "__metadata__")
    key = data.draw(st.sampled_from(keys))
    change = data.draw(st.sampled_from(["shape", "dtype", "offsets", "spelling", "drop"]))
    entry = dict(header[key])
    if change == "shape":
        entry["shape"] = data.draw(st.lists(st.integers(0, 2**20), max_size=3))
    elif change == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(_DTYPES))
    elif change == "offsets":
        entry["data_offsets"] = sorted(
            data.draw(st.lists(st.integers(0, len(body) + 8), min_size=2, max_size=2))
        )
    elif change == "spelling":
        header[key.replace(".weight", ".default.weight")] = entry
    if change == "drop":
        del header[key]
    else:
        header[key] = entry
    path.write_bytes(_raw_safetensors(header, body))
    model = make_model("gpt2")
    try:
        loaded = LoRAModel.from_pretrained(model, d)
    except AdapterFormatError:
        return
    good = _tensors(saved)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in _own_tensors(loaded, good).items())


def _own_tensors(model, file_tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors under the model's state-dict keys (default adapter)."""
    from hf_lora.adapter_files import adapter_key_map

    keymap = adapter_key_map(model, "default")
    return {own: file_tensors[file_key] for file_key, own in keymap.items() if file_key in file_tensors}

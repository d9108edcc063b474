"""`hf-lora`: everyday adapter tasks from the shell.

    hf-lora inspect MODEL [--r 8] [--targets q_proj v_proj]   what LoRA would adapt, and its size
    hf-lora info ADAPTER [--subfolder NAME]                   what an adapter holds; peft-compatible?
    hf-lora merge BASE ADAPTER OUT [--subfolder NAME]         a full model with the adapter folded in
    hf-lora extract BASE FINETUNED OUT --r 16                 an adapter from a full fine-tune (SVD)
    hf-lora push ADAPTER_DIR REPO_ID                          upload a saved adapter in one commit
    hf-lora pull REPO_ID DIR                                  download an adapter

MODEL / BASE / FINETUNED are Hub ids or local folders of transformers models; ADAPTER is a folder or a
Hub repo (--subfolder NAME picks an adapter saved in its NAME/ subfolder, as models with several adapters
save all but "default"). Bad input exits with status 2 and one line saying why.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from .errors import LoRAError
from .secrets import scrub_secrets

EXIT_BAD_INPUT = 2
_CHECKPOINT = re.compile(r"checkpoint-\d+")  # transformers' PREFIX_CHECKPOINT_DIR, and the step
REVISION_HELP = "branch, tag or commit on the Hub (default: main)"
SUBFOLDER_HELP = (
    "the adapter in this subfolder of ADAPTER (an adapter saved beside others, not named 'default')"
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    logging.getLogger("huggingface_hub").propagate = False  # it prints through a handler of its own
    # transformers imports torchao, where installed, on every from_pretrained; on a CPU machine its CUDA
    # extensions fail to load and torch warns about its enums: noise that is no advice to the user
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        args.run(args)
    except Exception as e:
        message = _bad_input_message(e, args.command)
        if message is None:  # a bug: one line too, and its traceback with -v
            logging.getLogger(__name__).debug("traceback", exc_info=True)
            text = " ".join(str(e).split())[:500]
            message = f"{type(e).__name__}: {text} (unexpected: run with -v for the traceback, and report it)"
        print(f"hf-lora {args.command}: error: {scrub_secrets(message)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def _bad_input_message(e: Exception, command: str) -> str | None:
    """One line for an error the user can act on (bad input, the Hub unreachable or refusing); else None."""
    from .fetch import endpoint, network_cause

    if not isinstance(e, LoRAError) and (cause := network_cause(e)):
        offline = "" if command == "push" else ", or set HF_HUB_OFFLINE=1 to use files downloaded before"
        return (
            f"cannot reach the Hub at {endpoint()} ({type(cause).__name__}: {cause}). Check the network "
            f"connection and HF_ENDPOINT{offline}."
        )
    hub_error = type(e).__module__.split(".")[0] == "huggingface_hub"
    if not (hub_error or isinstance(e, (LoRAError, OSError, ValueError, KeyError))):
        return None
    if isinstance(e, KeyError):  # str() of a KeyError is the bare key, "'url'"
        return f"an answer or file lacks the entry {e.args[0]!r} it should have ({type(e).__name__})"
    lines = [line.strip(" -") for line in str(e).strip().splitlines() if line.strip()]
    return " ".join(lines) or type(e).__name__  # (LoRAConfig lists its problems on lines of their own)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hf-lora", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    c = sub.add_parser(
        "inspect", help="architecture, default targets, Linear/Conv1D layers, trainable parameters"
    )
    c.add_argument("model", help="Hub id or folder of a transformers model (only its config is read)")
    c.add_argument("--r", type=int, default=8, help="LoRA rank for the parameter count (default: 8)")
    c.add_argument("--targets", nargs="+", help="target_modules (default: the architecture's)")
    c.add_argument("--all-layers", action="store_true", help="list every layer, not one per name")
    c.set_defaults(run=_inspect)

    c = sub.add_parser("info", help="config, size, tensors, base model and peft-compatibility of an adapter")
    c.add_argument("adapter", help="adapter folder or Hub repo")
    c.add_argument("--subfolder", help=SUBFOLDER_HELP)
    c.add_argument("--revision", help=REVISION_HELP)
    c.set_defaults(run=_info)

    c = sub.add_parser("merge", help="fold an adapter into its base model and save the full model")
    c.add_argument("base", help="Hub id or folder of the base model the adapter was trained on")
    c.add_argument("adapter", help="adapter folder or Hub repo")
    c.add_argument("out", help="folder for the merged model")
    c.add_argument("--subfolder", help=SUBFOLDER_HELP)
    c.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="save in this dtype")
    c.set_defaults(run=_merge)

    c = sub.add_parser("extract", help="extract a LoRA adapter from a full fine-tune by truncated SVD")
    c.add_argument("base", help="Hub id or folder of the model before fine-tuning")
    c.add_argument("finetuned", help="Hub id or folder of the fully fine-tuned model")
    c.add_argument("out", help="folder for the extracted adapter")
    c.add_argument("--r", type=int, required=True, help="rank of the extracted adapter")
    c.add_argument(
        "--targets",
        "--target-modules",
        nargs="+",
        help="target_modules: the Linear/Conv1D modules to extract (default: every changed one)",
    )
    c.add_argument(
        "--modules-to-save",
        nargs="+",
        metavar="MODULE",
        help="modules_to_save: modules copied whole from the fine-tune (changed embeddings, norms, heads)",
    )
    c.set_defaults(run=_extract)

    c = sub.add_parser("push", help="upload a saved adapter folder to the Hub in one commit")
    c.add_argument("adapter_dir", help="folder written by save_pretrained")
    c.add_argument("repo_id", help="Hub repo to upload to, e.g. you/my-adapter (created if missing)")
    c.add_argument("--private", action="store_true", help="create the repo as private")
    c.add_argument("--revision", help="branch to commit to (default: main)")
    c.add_argument("--message", help="commit message")
    c.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    c.set_defaults(run=_push)

    c = sub.add_parser("pull", help="download an adapter from the Hub")
    c.add_argument("repo_id", help="Hub repo of the adapter")
    c.add_argument("dir", help="folder to download it into")
    c.add_argument("--revision", help=REVISION_HELP)
    c.add_argument("--token", help="Hub token (default: HF_TOKEN or the stored login)")
    c.set_defaults(run=_pull)
    return p


# ---- commands ---------------------------------------------------------------------------------------


def _inspect(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoConfig

    from . import LoRAConfig, get_lora_model
    from .kinds import kind_of
    from .targets import default_target_modules, lora_modules, model_type

    config = AutoConfig.from_pretrained(args.model)
    cls = _model_class(config)
    with torch.device("meta"):  # the structure without the weights: instant, no memory
        model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    try:
        defaults = default_target_modules(model)
    except LoRAError:
        defaults = None
    print(f"model:        {args.model}")
    print(f"architecture: {type(model).__name__} (model_type {model_type(model)!r})")
    print(f"parameters:   {sum(p.numel() for p in model.parameters()):,}")
    print(f"default targets: {defaults if defaults else 'none (pass --targets, or all-linear)'}")
    rows: dict[tuple[str, str, tuple[int, ...]], int] = {}  # one row per name AND shape: they can differ
    for path, module in lora_modules(model):
        key = (
            path if args.all_layers else path.rsplit(".", 1)[-1],
            type(module).__name__,
            tuple(kind_of(module).weight(module).shape),  # (nn.MultiheadAttention's: in_proj_weight)
        )
        rows[key] = rows.get(key, 0) + 1
    print(f"\n{'layer':<40} {'type':<8} {'weight shape':<16} count")
    for (name, kind, shape), n in rows.items():
        print(f"{name:<40} {kind:<8} {shape!s:<16} {n}")
    targets = args.targets or defaults
    if targets:
        lora = get_lora_model(
            model, LoRAConfig(r=args.r, target_modules=targets if targets != ["all-linear"] else "all-linear")
        )
        trainable, total = lora.get_nb_trainable_parameters()
        print(f"\nLoRA r={args.r} on {targets}: {len(list(lora.lora_layers()))} layers, "
              f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100 * trainable / total:.4f}")  # fmt: skip


def _info(args: argparse.Namespace) -> None:
    from .adapter_files import PREFIX
    from .reading import read_adapter

    files = read_adapter(args.adapter, subfolder=args.subfolder, revision=args.revision, advice=_advice())
    cfg = files.config
    tensors = files.tensors
    n_params = sum(t.numel() for t in tensors.values())
    n_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    kinds = {"lora_A": 0, "lora_B": 0, "lora_magnitude_vector": 0, "other": 0}
    layers = set()
    for key in tensors:
        kind = re.search(r"\.(?:lora_embedding_|lora_)(A|B)\b|\.(lora_magnitude_vector)", key)
        kinds["other" if kind is None else kind[2] or f"lora_{kind[1]}"] += 1
        if kind is not None and kind[1] == "A":
            layers.add(key[: kind.start()])
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})
    peft_ok = all(k.startswith(PREFIX) for k in tensors) and files.raw_config.get("peft_type") == "LORA"
    print(f"adapter:      {files.source}")
    print(f"base model:   {cfg.base_model_name_or_path or 'not recorded'}")
    print(f"task type:    {cfg.task_type or 'not set'}")
    print(
        f"r / alpha:    {cfg.r} / {cfg.lora_alpha}{' (rsLoRA)' if cfg.use_rslora else ''}{' DoRA' if cfg.use_dora else ''}"
    )
    print(f"targets:      {cfg.target_modules} -> {len(layers)} layers")
    print(f"saved whole:  {cfg.modules_to_save or 'none'}")
    if cfg.trainable_token_indices is not None:
        from .model_card import token_rows_summary

        print(f"token rows:   {token_rows_summary(cfg.trainable_token_indices)}")
    print(f"tensors:      {len(tensors)} ({kinds['lora_A']} A, {kinds['lora_B']} B, "
          f"{kinds['lora_magnitude_vector']} DoRA magnitudes, {kinds['other']} other), {', '.join(dtypes)}")  # fmt: skip
    print(f"size:         {n_params:,} parameters, {n_bytes / 2**20:.2f} MiB")
    print(f"peft format:  {'yes: PeftModel.from_pretrained reads it' if peft_ok else 'no'}")


def _merge(args: argparse.Namespace) -> None:
    import torch

    from . import LoRAModel
    from .load_plan import saved_vocabulary
    from .reading import read_adapter

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} exists and is not a folder; give a folder for the merged model.")
    _refuse_overwriting_inputs(out, base=args.base, adapter=Path(args.adapter, args.subfolder or ""))
    # fail before the (slow) base model load if the adapter is unusable
    files = read_adapter(args.adapter, subfolder=args.subfolder, advice=_advice())
    base = _load_model(args.base)
    if rows := saved_vocabulary(base, files.tensors):
        print(f"the adapter holds embeddings for {rows} tokens (the base model has "
              f"{base.get_input_embeddings().num_embeddings}): resizing the base model's embeddings first")  # fmt: skip
        base.resize_token_embeddings(rows)
    model = LoRAModel.from_pretrained(base, args.adapter, subfolder=args.subfolder)
    merged = model.merge_and_unload(progressbar=True)
    if args.dtype:
        merged = merged.to(getattr(torch, args.dtype))
    merged.save_pretrained(out, safe_serialization=True)
    if not any(out.glob("model*.safetensors")):  # transformers only logs some failures
        raise OSError(f"the merged model was not written to {out}; run with -v for transformers' messages.")
    adapter_dir = Path(args.adapter, args.subfolder or "")
    has_tokenizer = adapter_dir.is_dir() and any((adapter_dir / name).exists() for name in _TOKENIZER_FILES)
    _copy_tokenizer(str(adapter_dir) if has_tokenizer else args.base, args.out)  # (new tokens: the adapter's)
    print(f"merged model saved to {args.out}")


def _extract(args: argparse.Namespace) -> None:
    from .extract import extract_lora

    _refuse_overwriting_inputs(Path(args.out), base=args.base, finetuned=args.finetuned)
    base, finetuned = _load_model(args.base), _load_model(args.finetuned)
    model, report = extract_lora(
        base,
        finetuned,
        args.r,
        target_modules=args.targets,
        modules_to_save=args.modules_to_save,
        return_report=True,
    )
    model.peft_config["default"].base_model_name_or_path = str(args.base)
    model.save_pretrained(args.out)
    worst = min(report, key=lambda row: row.energy_kept)
    mean = sum(row.energy_kept for row in report) / len(report)
    print(f"extracted r={args.r} adapter from {len(report)} layers to {args.out}: "
          f"mean energy kept {100 * mean:.2f}%, lowest {100 * worst.energy_kept:.2f}% ({worst.path})")  # fmt: skip
    (Path(args.out) / "extraction_report.json").write_text(
        json.dumps([vars(row) for row in report], indent=1)
    )


def _push(args: argparse.Namespace) -> None:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from .fetch import http_error
    from .hub import ADAPTER_FILES, owners_cards
    from .reading import read_adapter

    folder = Path(args.adapter_dir)
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is not a local folder: push uploads an adapter saved on this machine "
            "(to copy a Hub repo, `hf-lora pull` it first)."
        )
    subfolders = _pushed_subfolders(folder)
    for subfolder in subfolders:  # refuse to upload what does not load
        read_adapter(folder, subfolder=subfolder, advice=_advice())
    files = [
        glob.escape(f"{subfolder}/{name}" if subfolder else name)
        for subfolder in subfolders
        for name in ADAPTER_FILES
    ]
    api = HfApi(token=args.token)
    try:
        api.create_repo(args.repo_id, private=args.private, exist_ok=True)
        if args.revision:
            api.create_branch(args.repo_id, branch=args.revision, exist_ok=True)
        keep = owners_cards(folder, args.repo_id, args.revision, args.token)  # as push_adapter_to_hub
        info = api.upload_folder(
            repo_id=args.repo_id,
            folder_path=folder,
            revision=args.revision,
            allow_patterns=files,
            ignore_patterns=keep or None,
            commit_message=args.message or "Upload LoRA adapter (hf_lora)",
        )
    except HfHubHTTPError as e:
        raise http_error(e, args.repo_id) from None
    print(f"pushed {folder} to {args.repo_id}: {info.commit_url}")


def _pushed_subfolders(folder: Path) -> list[str | None]:
    """The adapters a push uploads: the root one (None) and those in subfolders, but a Trainer's
    checkpoint-*/ folders (Trainer.push_to_hub leaves them out too)."""
    from .reading import list_adapters

    found = [sub for _, sub in list_adapters(folder)]
    checkpoints = sorted((sub for sub in found if sub and _CHECKPOINT.fullmatch(sub)), key=_step)
    pushed = [sub for sub in found if sub not in checkpoints]
    if checkpoints and not pushed:
        raise ValueError(
            f"{folder} holds only Trainer checkpoints ({', '.join(checkpoints)}), no adapter of its own: push "
            f"the checkpoint you mean, e.g. `hf-lora push {folder / checkpoints[-1]} REPO_ID`."
        )
    return pushed or [None]  # (no adapter at all: read_adapter says so)


def _step(checkpoint: str) -> int:
    return int(checkpoint.rsplit("-", 1)[1])


def _pull(args: argparse.Namespace) -> None:
    from .hub import download_adapter

    path = download_adapter(args.repo_id, args.dir, revision=args.revision, token=args.token)
    print(f"downloaded {args.repo_id} to {path}")


# ---- helpers ----------------------------------------------------------------------------------------


def _advice():
    """How read_adapter's errors word the options they suggest, for users of this command."""
    from .reading import Advice

    return Advice(
        pick_subfolder="pass --subfolder <name>",
        allow_pickle="load it in Python with allow_pickle=True if you trust its author (the hf-lora command "
        "reads safetensors only)",
    )


def _refuse_overwriting_inputs(out: Path, **inputs: str | Path) -> None:
    """OUT must be a folder of its own: writing into an input's folder replaces its files (data loss)."""
    for role, path in inputs.items():
        if Path(path).exists() and out.exists() and out.resolve() == Path(path).resolve():
            raise ValueError(
                f"OUT ({out}) is the {role} folder: writing there would replace its files. Give a new folder."
            )


def _model_class(config):
    """The concrete class named in the config (e.g. GPT2LMHeadModel), else AutoModel's choice."""
    import transformers

    for name in getattr(config, "architectures", None) or []:
        if cls := getattr(transformers, name, None):
            return cls
    return transformers.AutoModel


def _load_model(name_or_path: str):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(name_or_path)
    return _model_class(config).from_pretrained(name_or_path)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model")


def _copy_tokenizer(source: str, out: str) -> None:
    """Save the base model's tokenizer next to the merged model, when it has one (transformers builds an
    empty one from a folder without tokenizer files: that one is not saved)."""
    log = logging.getLogger(__name__)
    if Path(source).is_dir() and not any((Path(source) / name).exists() for name in _TOKENIZER_FILES):
        log.info("no tokenizer files in %s; saved the model only", source)
        return
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError):
        log.info("no tokenizer found in %s; saved the model only", source)
        return
    if len(tokenizer) > 0:
        tokenizer.save_pretrained(out)


if __name__ == "__main__":
    raise SystemExit(main())

"""`hf-longattn`: the command line.

    hf-longattn niah --model smollm2 --methods dense,streaming --lengths 1k,2k,4k --depths 11 --samples 5 --out runs/niah
    hf-longattn niah --model smollm2 --methods dense,longheads --lengths 8k,16k,32k --out runs/longer   (past 8K trained)
    hf-longattn niah-merge runs/8k runs/16k runs/32k --out runs/merged   (runs of one grid, one length each)
    hf-longattn lm-eval --model hf-longattn --model_args pretrained=smollm2,method=streaming,window=1024 --tasks ...
    hf-longattn longbench-local DATA_DIR --out TASK_DIR   (task YAMLs for LongBench JSONL files you have locally)
    hf-longattn serve --model smollm2 --method hip --port 8000   (OpenAI-style HTTP server: hf_longattn/serving)

Everything that can be wrong with the arguments (a method that does not exist, an option a method does not have, a
model that cannot be found, a length past the model's context without a method that extends it, a method that cannot
run on the model) is reported before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from .options import parse_lengths, parse_method_args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "lm-eval":  # everything after it belongs to lm-eval's own parser
        from .lm_eval_model import lm_eval_main

        return lm_eval_main(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except UsageError as error:
        parser.error(str(error))


class UsageError(ValueError):
    """Bad command-line input: argparse prints it with the usage line and exits with status 2."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-longattn", description="Evaluate sparse long-context attention methods.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    niah = commands.add_parser("niah", help="needle-in-a-haystack grid: heatmaps, JSON, a table against dense")
    niah.add_argument("--model", required=True, help="'smollm2' (bundled), a local folder or .gguf file, or a hub id")
    niah.add_argument("--gguf-file", help="GGUF file name inside --model (a folder or hub repo)")
    niah.add_argument("--model-name", help="name shown in tables and plots (default: --model)")
    niah.add_argument("--methods", default="dense", help="comma-separated, from: " + ", ".join(_available()))
    niah.add_argument("--method-args", help='per-method options: \'{"hip": {"budget": 2048}}\' or hip.budget=2048,...')
    niah.add_argument("--lengths", default="1k,2k,4k", help="context lengths in the model's tokens, e.g. 1k,2k,4096")
    niah.add_argument("--depths", default="11", help="number of evenly spaced depths 0..100%%, or a list like 0,25,50")
    niah.add_argument("--samples", type=int, default=1, help="prompts per (length, depth) cell")
    niah.add_argument("--needle", default="passkey", help="passkey, sanfrancisco or multikey:N")
    niah.add_argument("--haystack", default="essays", help="essays (Paul Graham, offline), synthetic, a folder of "
                                                         ".txt files, or hf:DATASET")
    niah.add_argument("--chat-template", choices=["auto", "yes", "no"], default="auto",
                      help="wrap the prompt in the tokenizer's chat template (auto: when it has one)")
    niah.add_argument("--allow-extrapolation", action="store_true",
                      help="allow lengths beyond the model's max_position_embeddings (its trained context) without a "
                           "method that extends the context (such as longheads, with which they need no flag)")
    niah.add_argument("--dtype", default="auto", help="float32, bfloat16, float16; auto = bfloat16 on GPU, float32 on CPU")
    niah.add_argument("--device", default="auto", help="cuda, cpu, cuda:1, ...; auto = cuda when available")
    niah.add_argument("--batch-size", type=int, default=1, help="prompts of one length generated together")
    niah.add_argument("--seed", type=int, default=0)
    niah.add_argument("--out", required=True, help="output folder for JSON, PNG and the markdown summary")
    niah.add_argument("--quiet", action="store_true", help="no progress bar")
    niah.set_defaults(run=run_niah_command)

    merge = commands.add_parser("niah-merge", help="one grid (heatmaps, JSON, table) from niah runs of different "
                                                   "lengths, e.g. one process a length")
    merge.add_argument("runs", nargs="+", help="--out folders of `hf-longattn niah` runs")
    merge.add_argument("--out", required=True, help="output folder for the merged JSON, PNG and markdown summary")
    merge.set_defaults(run=run_niah_merge_command)

    local = commands.add_parser("longbench-local", help="write lm-eval task YAMLs for local LongBench JSONL files")
    local.add_argument("data_dir", help="folder with LongBench files such as hotpotqa.jsonl, qasper.jsonl")
    local.add_argument("--out", required=True, help="folder for the YAMLs; pass it to lm-eval as --include_path")
    local.set_defaults(run=run_longbench_local_command)

    from ..serving.command import add_serve_command

    add_serve_command(commands)
    commands.add_parser("lm-eval", help="lm-eval's own CLI with the hf-longattn model and our task YAMLs registered; "
                                        "all further arguments go to lm-eval")
    return parser


def _available() -> list[str]:
    from .. import available_methods

    return available_methods()


def check_methods(methods: list[str], method_args: dict[str, dict]) -> None:
    """Unknown method names and unknown or invalid options, before anything is loaded."""
    from ..config import ConfigError
    from .options import check_method_options

    known = _available()
    for method in methods:
        if method not in known:
            raise UsageError(f"unknown method '{method}'; available methods: {', '.join(known)}")
        try:
            check_method_options(method, method_args[method])
        except ConfigError as error:
            raise UsageError(f"--method-args: {error}") from None


def resolve_model(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """(path or hub id, gguf file) for --model; 'smollm2' is the bundled SmolLM2-135M-Instruct."""
    from ..bundled import BUNDLED_NAME, bundled_model_path

    if name == BUNDLED_NAME:
        try:
            folder, bundled_file = bundled_model_path()
        except FileNotFoundError as error:
            raise UsageError(str(error)) from None
        return str(folder), bundled_file
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return str(path.parent), path.name
    if path.exists():
        if gguf_file and not (path / gguf_file).is_file():
            raise UsageError(f"--gguf-file {gguf_file} is not in {path}")
        return str(path), gguf_file
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name, gguf_file  # a hub id; load_config says whether it is reachable
    raise UsageError(f"model '{name}' not found: it is not a local folder or .gguf file, nor a hub id like "
                     "'org/name'. Use --model smollm2 for the bundled SmolLM2-135M-Instruct.")


def load_config(path: str, gguf_file: str | None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError) as error:
        raise UsageError(f"could not load the model config of '{path}': {error}") from None


def max_positions(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "max_position_embeddings", None)


def extends_context(method: str) -> bool:
    """True for a method built to read past the model's trained context (it declares `extends_context`)."""
    from ..methods import get_method

    return bool(getattr(get_method(method), "extends_context", False))


def check_lengths(lengths: list[int], limit: int | None, allow_extrapolation: bool, methods: list[str] = ()) -> None:
    """Lengths past the trained context run when a method extends the context (the others run beside it for
    comparison, with a note) or with --allow-extrapolation; otherwise they are an error."""
    beyond = [n for n in lengths if limit and n > limit]
    if not beyond:
        return
    extending = [m for m in methods if extends_context(m)]
    where = f"lengths {', '.join(map(str, beyond))} are beyond the model's trained context ({limit} tokens)"
    if extending:
        others = [m for m in methods if m not in extending]
        note = f"; {', '.join(others)} run there too, for comparison (usually failing)" if others else ""
        print(f"hf-longattn: {where}: {', '.join(extending)} extend(s) the context{note}", file=sys.stderr)
    elif allow_extrapolation:
        print(f"hf-longattn: {where}: running them because --allow-extrapolation was given", file=sys.stderr)
    else:
        raise UsageError(
            f"lengths {', '.join(map(str, beyond))} exceed the model's max_position_embeddings ({limit} tokens, its "
            "trained context) and none of the methods extends the context: add one that does (e.g. --methods "
            "dense,longheads) or pass --allow-extrapolation to run them anyway (dense attention usually fails there)")


def check_model_for_methods(config, methods: list[str]) -> None:
    """A method that cannot run on this model (e.g. longheads on a dynamic-NTK RoPE) says so before loading it."""
    from ..methods import get_method

    for method in methods:
        check = getattr(get_method(method), "check_model_config", None)
        if check is not None:
            try:
                check(config)
            except ValueError as error:
                raise UsageError(f"--methods {method}: {error}") from None


def _depths(text: str):
    try:
        return int(text) if text.strip().isdigit() else [float(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise UsageError(f"--depths {text!r}: give a count such as 11 or percentages such as 0,50,100") from None


def run_niah_merge_command(args) -> int:
    from .niah import load_run, merge_runs, save_report

    try:
        merged = merge_runs([load_run(folder) for folder in args.runs])
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    paths = save_report(merged, args.out, command="hf-longattn " + shlex.join(args.argv))
    print(Path(paths["summary"]).read_text())
    return 0


def run_niah_command(args) -> int:
    try:
        lengths = parse_lengths(args.lengths)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        method_args = parse_method_args(args.method_args, methods)
    except (ValueError, json.JSONDecodeError) as error:
        raise UsageError(str(error)) from None
    if len(set(methods)) != len(methods) or not methods:
        raise UsageError(f"--methods {args.methods!r}: name each method once")
    if args.samples < 1 or args.batch_size < 1:
        raise UsageError("--samples and --batch-size must be at least 1")
    from .haystack import make_needle
    from .niah import depth_grid

    try:
        depths = depth_grid(_depths(args.depths))
        make_needle(args.needle, __import__("random").Random(0))
    except ValueError as error:
        raise UsageError(str(error)) from None
    check_methods(methods, method_args)
    path, gguf_file = resolve_model(args.model, args.gguf_file)
    config = load_config(path, gguf_file)
    check_model_for_methods(config, methods)
    limit = max_positions(config)
    check_lengths(lengths, limit, args.allow_extrapolation, methods)

    import torch

    from ..bundled import load_model
    from .niah import run_niah, save_report

    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = ("bfloat16" if device.startswith("cuda") else "float32") if args.dtype == "auto" else args.dtype
    model, tokenizer = load_model(path, gguf_file=gguf_file, dtype=getattr(torch, dtype))
    model.to(device)
    chat = {"auto": None, "yes": True, "no": False}[args.chat_template]
    command = "hf-longattn " + " ".join(shlex.quote(a) for a in args.argv)
    run_niah(
        model, tokenizer, method_args, lengths, depths, args.samples, needle=args.needle, haystack=args.haystack,
        seed=args.seed, batch_size=args.batch_size, chat_template=chat, model_name=args.model_name or args.model,
        progress=not args.quiet, max_position_embeddings=limit,
        on_result=lambda done: save_report(done, args.out, command=command),  # finished methods survive a later crash
    )
    print((Path(args.out) / "niah_summary.md").read_text())
    print(f"results in {args.out}")
    return 0


def run_longbench_local_command(args) -> int:
    from .longbench import write_local_tasks

    try:
        written = write_local_tasks(args.data_dir, args.out)
    except (FileNotFoundError, ValueError) as error:
        raise UsageError(str(error)) from None
    print(f"wrote {len(written)} task(s) to {args.out}: {', '.join(written)}")
    print(f"run them with: hf-longattn lm-eval --include_path {args.out} --tasks {','.join(written)} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())

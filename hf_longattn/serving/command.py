"""`hf-longattn serve`: arguments, checks before anything is loaded, then load, patch and serve."""

from __future__ import annotations

import logging
import sys
from pathlib import Path


def add_serve_command(commands) -> None:
    serve = commands.add_parser("serve", help="an OpenAI-style HTTP server (completions, chat, streaming) for a "
                                              "patched model")
    serve.add_argument("--model", required=True, help="'smollm2' (bundled), a local folder or .gguf file, or a hub id")
    serve.add_argument("--gguf-file", help="GGUF file name inside --model (a folder or hub repo)")
    serve.add_argument("--method", default="hip", help="attention method, or 'none' for the unpatched model")
    serve.add_argument("--method-args", help="the method's options: 'k=1024,window=256' or JSON '{\"k\": 1024}'")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--served-model-name", help="the model id clients send and /v1/models shows (default: --model)")
    serve.add_argument("--dtype", default="auto", help="float32, bfloat16, float16; auto: bfloat16 on GPU, or float32")
    serve.add_argument("--device-map", default="auto",
                       help="accelerate's device_map: auto (GPUs, then CPU, then disk), balanced, sequential, cpu, "
                            "cuda:1, ...")
    serve.add_argument("--max-memory", help="per device, for device_map: '0=70GiB,1=70GiB,cpu=100GiB'; what does not "
                                            "fit is offloaded to disk")
    serve.add_argument("--offload-folder", help="where disk-offloaded weights go (default: a temporary folder)")
    serve.add_argument("--max-context", type=int,
                       help="most tokens (prompt + completion) a request may use; default: the model's trained "
                            "context, or what the method declares it can read")
    serve.add_argument("--default-max-tokens", type=int, default=256,
                       help="completion length when a chat request gives no max_tokens")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.set_defaults(run=run_serve_command)


def method_options(text: str | None, method: str) -> dict:
    """'k=1024,window=256', 'hip.k=1024' or JSON ('{"k": 1024}' or '{"hip": {"k": 1024}}') -> {'k': 1024, ...}."""
    from ..eval.options import parse_options

    options = parse_options(text)
    if list(options) == [method] and isinstance(options[method], dict):
        return options[method]
    return {k.removeprefix(f"{method}."): v for k, v in options.items()}


def run_serve_command(args) -> int:
    from ..eval.cli import UsageError, check_methods, load_config, max_positions, resolve_model
    from .loading import parse_max_memory

    method = args.method
    try:
        options = method_options(args.method_args, method)
        max_memory = parse_max_memory(args.max_memory)
    except ValueError as error:
        raise UsageError(str(error)) from None
    if method == "none":
        if options:
            raise UsageError("--method-args given without a --method whose options they could be")
    else:
        check_methods([method], {method: options})
    if args.max_context is not None and args.max_context < 2:
        raise UsageError(f"--max-context {args.max_context}: give a number of tokens of at least 2")
    if args.default_max_tokens < 1:
        raise UsageError("--default-max-tokens must be at least 1")
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a TCP port (0..65535)")
    try:
        import uvicorn

        from .api import create_app
    except ImportError as error:
        raise UsageError(f"serving needs FastAPI and uvicorn ({error}): pip install 'hf_longattn[serve]'") from None
    path, gguf_file = resolve_model(args.model, args.gguf_file)
    trained = max_positions(load_config(path, gguf_file))
    if args.max_context and trained and args.max_context > trained:
        print(f"hf-longattn: --max-context {args.max_context} is beyond the model's trained context ({trained} "
              "tokens); dense attention usually fails there", file=sys.stderr)

    from .engine import Engine
    from .loading import describe, load_for_serving

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    model, tokenizer = load_for_serving(path, gguf_file, method, options, args.dtype, args.device_map, max_memory,
                                        args.offload_folder)
    name = args.served_model_name or (args.model if args.model == "smollm2" else Path(args.model).name)
    engine = Engine(model, tokenizer, name, max_context=args.max_context, default_max_tokens=args.default_max_tokens)
    info = describe(model)
    logging.getLogger("hf_longattn.serve").info("serving %s with %s %s on %s, at most %s tokens a request", name,
                                                info["method"], info["method_options"], info["devices"],
                                                engine.max_context)
    uvicorn.run(create_app(engine, info), host=args.host, port=args.port, log_level=args.log_level)
    return 0

"""An OpenAI-style HTTP server for a patched model: `hf-longattn serve --model smollm2 --method hip`.

    engine.py   one generate() at a time, streamed token by token to the event loop; the context limit
    api.py      the FastAPI app: /v1/completions, /v1/chat/completions (both with `stream`), /v1/models, /health
    loading.py  load with accelerate's device_map (GPUs, CPU and disk offload through max_memory), then patch
    command.py  the `serve` subcommand of `hf-longattn`

Nothing here is imported by `import hf_longattn`; FastAPI and uvicorn (the `serve` extra) are imported only by api.py.
"""

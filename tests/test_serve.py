"""The OpenAI-style server on 127.0.0.1 with the real SmolLM2 patched with HiP (a budget small enough to be sparse on
these prompts): plain HTTP and the official `openai` client, streaming, one generate() at a time, 4xx for bad
requests, a client that disconnects frees its slot; and `hf-longattn serve` started as a user would, offloaded.

Every expected text comes from `model.generate()` on the same patched model, not from the server."""

import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")
pytestmark = pytest.mark.slow

HIP = {"k": 16, "window": 16, "sink": 4, "block_size_q": 16}  # sparse on prompts of a few dozen tokens
PROMPT = ("Some facts. The sky is blue. Grass is green. Snow is white. Coal is black. Blood is red. The sun is yellow. "
          "Oranges are orange. Violets are purple. Lemons are yellow. Limes are green. The sea is blue. Clouds are "
          "white. The first ten prime numbers, in order, are 2, 3, 5, 7,")  # 81 tokens: HiP selects among them
CHAT = [{"role": "user", "content": "Name the capital of France in one word."}]
REPO = Path(__file__).resolve().parents[1]


def greedy(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    """What the patched model itself generates: the expected text of a greedy request."""
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)


def chat_ids(tokenizer, messages) -> list[int]:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(smollm2, smollm2_dir):
    from hf_longattn import patch_model, unpatch_model
    from hf_longattn.serving.api import create_app
    from hf_longattn.serving.engine import Engine
    from hf_longattn.serving.loading import describe

    model, tokenizer = smollm2
    patch_model(model, "hip", **HIP)
    engine = Engine(model, tokenizer, "smollm2")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine, describe(model)), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    expected = {
        "prompt": greedy(model, tokenizer, tokenizer(PROMPT).input_ids, 6),
        "chat": greedy(model, tokenizer, chat_ids(tokenizer, CHAT), 6),
    }
    try:
        yield SimpleNamespace(url=f"http://127.0.0.1:{sock.getsockname()[1]}", port=sock.getsockname()[1],
                              model=model, tokenizer=tokenizer, engine=engine, expected=expected, folder=smollm2_dir)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        unpatch_model(model)


def post(served, path: str, body, timeout: float = 120) -> tuple[int, dict]:
    """Plain HTTP (the standard library): status and the decoded JSON answer."""
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=timeout)
    payload = body if isinstance(body, (str, bytes)) else json.dumps(body)
    connection.request("POST", path, payload, {"Content-Type": "application/json"})
    response = connection.getresponse()
    answer = json.loads(response.read())
    connection.close()
    return response.status, answer


def get(served, path: str) -> dict:
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    connection.request("GET", path)
    answer = json.loads(connection.getresponse().read())
    connection.close()
    return answer


def test_completion_and_chat_over_plain_http(served):
    tokenizer = served.tokenizer
    status, answer = post(served, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert status == 200, answer
    assert answer["choices"][0]["text"] == served.expected["prompt"]
    assert answer["object"] == "text_completion" and answer["model"] == "smollm2"
    prompt_tokens = len(tokenizer(PROMPT).input_ids)
    assert answer["usage"]["prompt_tokens"] == prompt_tokens > sum(HIP.values())  # HiP selects: the sparse path ran
    assert answer["choices"][0]["finish_reason"] in ("length", "stop") and answer["usage"]["completion_tokens"] <= 6
    timing = answer["timing"]
    assert 0 <= timing["queue_s"] < timing["time_to_first_token_s"] <= timing["total_s"]
    assert timing["prefill_tokens_per_s"] > 0 and timing["decode_tokens_per_s"] > 0

    status, by_ids = post(served, "/v1/completions", {"prompt": tokenizer(PROMPT).input_ids, "max_tokens": 6,
                                                      "temperature": 0})
    assert status == 200 and by_ids["choices"][0]["text"] == served.expected["prompt"]

    status, chat = post(served, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 6, "temperature": 0})
    assert status == 200, chat
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": served.expected["chat"]}
    assert chat["usage"]["prompt_tokens"] == len(chat_ids(tokenizer, CHAT))


def test_streamed_completion_over_plain_http_is_server_sent_events(served):
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=120)
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    connection.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.getheader("content-type").startswith("text/event-stream")
    events = [line[len("data: "):] for line in response.read().decode().split("\n\n") if line]
    connection.close()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text_chunks = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is None]
    assert len(text_chunks) >= 2  # streamed piece by piece, not in one block
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == served.expected["prompt"]
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0]["finish_reason"] in ("length", "stop") and finish["timing"]["time_to_first_token_s"] > 0
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens"] == len(served.tokenizer(PROMPT).input_ids)


def test_the_openai_client_completes_chats_and_streams(served):
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0)

    [card] = client.models.list().data
    assert card.id == "smollm2" and card.method == "hip" and card.method_options["k"] == HIP["k"]
    assert card.max_context == 8192

    completion = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=6, temperature=0)
    assert completion.choices[0].text == served.expected["prompt"]
    assert completion.usage.prompt_tokens == len(served.tokenizer(PROMPT).input_ids)
    assert completion.timing["time_to_first_token_s"] > 0

    chat = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, temperature=0)
    assert chat.choices[0].message.content == served.expected["chat"]

    pieces = [c.choices[0].text for c in client.completions.create(
        model="smollm2", prompt=PROMPT, max_tokens=6, temperature=0, stream=True)]
    assert len(pieces) >= 2 and "".join(pieces) == served.expected["prompt"]

    deltas = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="smollm2", messages=CHAT, max_tokens=6, temperature=0, stream=True)]
    assert "".join(deltas) == served.expected["chat"]

    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=-1)


def test_concurrent_requests_get_the_text_they_get_one_at_a_time(served):
    prompts = ["Water boils at a temperature of", "The three primary colors are", "A haiku about the sea:"]
    bodies = [{"prompt": p, "max_tokens": 5, "temperature": 0} for p in prompts]
    bodies.append({"prompt": prompts[0], "max_tokens": 5, "temperature": 1.0, "seed": 7})  # sampled, seeded
    alone = [post(served, "/v1/completions", b)[1] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda b: post(served, "/v1/completions", b)[1], bodies))
    assert [a["choices"][0]["text"] for a in together] == [a["choices"][0]["text"] for a in alone]
    # They were served one after another: all but the first waited in the queue.
    waits = sorted(a["timing"]["queue_s"] for a in together)
    assert waits[-1] >= min(a["timing"]["total_s"] - a["timing"]["queue_s"] for a in together) * 0.9


BAD_REQUESTS = [
    ("/v1/completions", '{"prompt": "hi", "max_tokens": 4', 400, "not valid JSON"),
    ("/v1/completions", "[1, 2]", 400, "JSON object"),
    ("/v1/completions", {"max_tokens": 4}, 400, "'prompt' is required"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": "4"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "hi", "logprobs": 2}, 400, "unknown field 'logprobs'"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "one choice per request"),
    ("/v1/completions", {"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4 stop strings"),
    ("/v1/completions", {"prompt": ["one", "two"]}, 400, "one prompt per request"),
    ("/v1/completions", {"prompt": [5, 10 ** 9]}, 400, "outside the vocabulary"),
    ("/v1/completions", {"prompt": ""}, 400, "empty"),
    ("/v1/completions", {"prompt": [5] * 8193, "max_tokens": 1}, 400, "at most 8192"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 9000}, 400, "max_tokens can be at most"),
    ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "serves 'smollm2'"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "content"),
]


def test_bad_requests_get_a_4xx_with_a_reason_and_the_server_keeps_serving(served):
    served_before = get(served, "/health")["served"]
    for path, body, status, reason in BAD_REQUESTS:
        got, answer = post(served, path, body)
        assert got == status and reason in answer["error"]["message"], (body, got, answer)
    assert get(served, "/health")["served"] == served_before  # nothing was generated for them
    status, answer = post(served, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert status == 200 and answer["choices"][0]["text"] == served.expected["prompt"]


def test_a_stop_string_ends_the_text_before_it(served):
    expected = served.expected["prompt"]
    stop = expected.strip()[:2]  # appears in the greedy continuation
    cut = expected[:expected.index(stop)]
    status, answer = post(served, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                                      "stop": [stop]})
    assert status == 200 and answer["choices"][0] == {"index": 0, "text": cut, "finish_reason": "stop",
                                                      "logprobs": None}


def wait_until_idle(served, cancelled_before: int, seconds: float = 20) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = get(served, "/health")
        if not health["busy"] and health["cancelled"] > cancelled_before:
            return health
        time.sleep(0.1)
    raise AssertionError(f"the abandoned generation still runs: {get(served, '/health')}")


def test_a_client_that_disconnects_frees_its_slot(served):
    long_request = {"prompt": "Count to one thousand: 1, 2, 3,", "max_tokens": 2000, "temperature": 0,
                    "ignore_eos": True}  # minutes of generation on a CPU, unless it is stopped
    # Mid-stream: read the first text chunk, then hang up.
    before = get(served, "/health")["cancelled"]
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps({**long_request, "stream": True}),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200 and response.readline().startswith(b"data: ")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    wait_until_idle(served, before)

    # Waiting for a plain answer, then gone.
    before = get(served, "/health")["cancelled"]
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=60)
    connection.request("POST", "/v1/completions", json.dumps(long_request), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 20
    while not get(served, "/health")["busy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    wait_until_idle(served, before)

    status, answer = post(served, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert status == 200 and answer["choices"][0]["text"] == served.expected["prompt"]
    assert answer["timing"]["queue_s"] < 1


def test_hf_longattn_serve_command_with_part_of_the_model_offloaded(served, tmp_path):
    """`hf-longattn serve` as a user runs it: device_map="auto" with max_memory, so most layers go to disk (the
    model is the bundled SmolLM2 saved as a plain checkpoint, which loads faster than its GGUF file)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "hf_longattn.eval", "serve", "--model", str(served.folder),
               "--method", "hip", "--method-args", ",".join(f"{k}={v}" for k, v in HIP.items()),
               "--max-memory", "cpu=250MB", "--offload-folder", str(tmp_path / "offload"), "--port", str(port),
               "--log-level", "warning"]
    log = open(tmp_path / "server.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        remote = SimpleNamespace(port=port)
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up"
            try:
                health = get(remote, "/health")
                break
            except OSError:
                time.sleep(0.5)
        assert health["method"] == "hip" and health["method_options"]["window"] == HIP["window"]
        assert {"cpu", "disk"} <= set(health["devices"])
        status, answer = post(remote, "/v1/completions", {"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
        assert status == 200 and answer["choices"][0]["text"] == served.expected["prompt"]
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()


def test_the_package_and_its_command_line_import_no_server_library():
    code = ("import sys, hf_longattn, hf_longattn.eval.cli as cli; cli._parser(); "
            "print([m for m in ('fastapi', 'uvicorn', 'starlette', 'pydantic') if m in sys.modules])")
    done = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr[-2000:]


def test_the_context_limit_is_the_trained_one_unless_the_method_reads_past_it():
    from hf_longattn import patch_model, unpatch_model
    from hf_longattn.serving.engine import context_limit
    from tiny_models import make_model

    model = make_model("llama")
    trained = model.config.max_position_embeddings
    assert context_limit(model) == trained
    patch_model(model, method="hip")
    assert context_limit(model) == trained
    unpatch_model(model)
    patch_model(model, method="longheads")
    assert context_limit(model) is None

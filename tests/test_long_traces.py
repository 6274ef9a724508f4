"""Losses from hidden states (``model.loss_head``, forklight/head.py): the chunked path gives the full-logits
path's losses (1e-5 relative) and gradients (1e-4) on Llama- and GPT-2-style models, tied and untied heads and
LoRA, for the SSFT loss, the matching costs and GRPO's token log-probs; the head never sees more than
``loss_chunk_tokens`` positions at once and never a prompt position; a model whose logits are not its head on
its hidden states (Gemma-2's soft-capping) falls back to full logits and says why; liger off CUDA is refused.
Packing (``model.pack_rows``): whole sequences with restarting positions, the same loss and gradients as
padding on Llama and GPT-2, and a model whose attention crosses packed sequences is padded instead."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from forklight.errors import ConfigError
from forklight.head import fused_nll_sum, head_nll, resolve_head
from forklight.losses import token_nll
from forklight.modules.ssft import SSFTModule
from tests.conftest import TINY_MODEL_CONFIG, tiny_export, toy_batch

GPT2_CONFIG = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_positions": 256}
MODELS = {
    "llama-untied": {**TINY_MODEL_CONFIG, "tie_word_embeddings": False},
    "llama-tied": {**TINY_MODEL_CONFIG, "tie_word_embeddings": True},
    "gpt2-tied": GPT2_CONFIG,
}


def ssft(config: dict, loss_head: str, **kwargs) -> SSFTModule:
    module = SSFTModule(model_config=dict(config), tokenizer="toy", num_fork_tokens=4, loss_head=loss_head,
                        loss_chunk_tokens=7, **kwargs)  # a chunk size that splits the scored positions unevenly
    module.configure_model()
    return module


def loss_and_gradients(module: SSFTModule, batch, assignments) -> tuple[float, dict[str, torch.Tensor]]:
    module.model.zero_grad()
    torch.manual_seed(0)  # the same dropout masks (GPT-2 has dropout; the head has none)
    loss, tokens = module.matched_loss(batch, assignments)
    loss.backward()
    return float(loss), {name: p.grad.clone() for name, p in module.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("lora", [False, True])
def test_chunked_ssft_loss_and_gradients_equal_the_full_logits_path(name, lora):
    options = {"lora": {"r": 4, "target_modules": ["q_proj", "v_proj"] if "llama" in name else ["c_attn"]}} if lora else {}
    full, chunked = ssft(MODELS[name], "full", **options), ssft(MODELS[name], "chunked", **options)
    chunked.model.load_state_dict(full.model.state_dict())
    assert chunked.head_path().chunked and not full.head_path().chunked
    batch = toy_batch(2)
    assignments = full.match(batch)
    expected_loss, expected = loss_and_gradients(full, batch, assignments)
    loss, gradients = loss_and_gradients(chunked, batch, assignments)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    assert expected.keys() == gradients.keys() and len(gradients) > 2
    for key in expected:
        torch.testing.assert_close(gradients[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


@pytest.mark.parametrize("share", [True, False])
def test_chunked_matching_costs_equal_the_full_logits_costs(share):
    full = ssft(MODELS["llama-untied"], "full", match_prefix_tokens=5, match_share_prompt=share)
    chunked = ssft(MODELS["llama-untied"], "chunked", match_prefix_tokens=5, match_share_prompt=share)
    chunked.model.load_state_dict(full.model.state_dict())
    batch = toy_batch(3)
    for got, want in zip(chunked.trace_tag_costs(batch), full.trace_tag_costs(batch)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_the_head_sees_only_scored_positions_a_chunk_at_a_time(monkeypatch):
    """A plain head: fused, each scored position through the head's matmul once, none recomputed in backward."""
    import forklight.head

    module = ssft(MODELS["llama-untied"], "chunked")
    batch = toy_batch(2)
    assignments = module.match(batch)  # decides the head path (a probe) and runs the costs
    module.packing()  # the packing probe runs the whole model once
    seen, linear, head = [], torch.nn.functional.linear, module.model.get_output_embeddings()

    def recorded(x, weight, *args):  # the head's matmuls: its weight, in the loss's dtype
        if weight.data_ptr() == head.weight.data_ptr():
            seen.append(x.shape)
        return linear(x, weight, *args)

    monkeypatch.setattr(forklight.head.F, "linear", recorded)
    loss, tokens = module.matched_loss(batch, assignments)
    loss.backward()
    supervised = int(tokens)  # positions whose next token is supervised (trace tokens): no prompt position
    assert supervised == sum(len(trace) for traces in batch.trace_ids for trace in traces)  # end of turn included
    assert all(len(shape) == 2 and shape[0] <= 7 for shape in seen)  # [c, D], c <= loss_chunk_tokens
    assert sum(shape[0] for shape in seen) == supervised  # each scored position once: no recompute


def test_a_module_head_is_called_a_chunk_at_a_time_and_recomputed_in_backward():
    """A head that is a module, not a plain Linear (LoRA's trainable fork-token rows): checkpointed chunks."""
    module = ssft(MODELS["llama-untied"], "chunked", lora={"r": 4, "target_modules": ["q_proj", "v_proj"]})
    batch = toy_batch(2)
    assignments = module.match(batch)
    module.packing()
    seen = []
    module.model.get_output_embeddings().register_forward_hook(lambda m, inputs, output: seen.append(inputs[0].shape))
    loss, tokens = module.matched_loss(batch, assignments)
    loss.backward()  # recomputes each chunk
    assert all(len(shape) == 2 and shape[0] <= 7 for shape in seen)
    assert sum(shape[0] for shape in seen) == 2 * int(tokens)  # each scored position once, and once in backward


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_fused_sum_equals_cross_entropy_in_value_and_gradients(bias, temperature):
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=bias)
    hidden, targets = torch.randn(23, 16, requires_grad=True), torch.randint(50, (23,))
    expected = torch.nn.functional.cross_entropy(head(hidden) / temperature, targets, reduction="sum")
    (3 * expected).backward()  # an upstream gradient other than 1
    want = [hidden.grad.clone()] + [p.grad.clone() for p in head.parameters()]
    hidden.grad = None
    head.zero_grad()
    got = fused_nll_sum(head, hidden, targets, 5, temperature)
    (3 * got).backward()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    for grad, reference in zip([hidden.grad] + [p.grad for p in head.parameters()], want):
        torch.testing.assert_close(grad, reference, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # no gradients kept
        torch.testing.assert_close(fused_nll_sum(head, hidden, targets, 5, temperature), expected, rtol=1e-5, atol=1e-5)
    head.weight.requires_grad_(False)  # a frozen head: the hidden states' gradient only
    hidden.grad, head.weight.grad = None, None
    fused_nll_sum(head, hidden, targets, 5, temperature).backward()
    assert head.weight.grad is None
    torch.testing.assert_close(hidden.grad, want[0] / 3, rtol=1e-5, atol=1e-6)


def test_the_fused_sum_under_bf16_autocast_is_close_to_the_checkpointed_chunks():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 300, bias=False)
    hidden, targets = torch.randn(40, 32, requires_grad=True), torch.randint(300, (40,))
    results = []
    for fn in (fused_nll_sum, lambda *a: head_nll(*a).sum()):
        hidden.grad, head.weight.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(head, hidden, targets, 16)
        loss.backward()
        assert loss.dtype == torch.float32 and hidden.grad.dtype == head.weight.grad.dtype == torch.float32
        results.append((loss.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-3)


def test_head_nll_matches_cross_entropy_with_temperature_and_no_grad():
    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=True)
    hidden, targets = torch.randn(23, 16), torch.randint(50, (23,))
    for temperature in (1.0, 0.7):
        expected = torch.nn.functional.cross_entropy(head(hidden) / temperature, targets, reduction="none")
        with torch.no_grad():
            torch.testing.assert_close(head_nll(head, hidden, targets, 5, temperature), expected, rtol=1e-5, atol=1e-6)


def test_grpo_token_log_probs_equal_on_every_path(tmp_path):
    """GRPO's token log-probs (and their gradients): full logits, chunked, packed or padded, all equal the padded
    full-logits reference, a row with no supervised token (a skipped sample) included."""
    from forklight.data.rendering import IGNORE_INDEX, assemble_rows
    from forklight.modules.grpo import GRPOModule

    export = tiny_export(tmp_path)
    batch = toy_batch(2)
    results = {}
    for mode, pack in (("full", False), ("chunked", False), ("chunked", True), ("full", True)):
        module = GRPOModule(init_from=str(export), num_fork_tokens=3, loss_head=mode, loss_chunk_tokens=5,
                            rollout_temperature=0.8, pack_rows=pack)
        module.configure_model()
        assert module.packing() == pack
        rows = assemble_rows([p for p in batch.prompt_ids for _ in range(2)], [module.fork_token_ids[0]] * 4,
                             [trace for traces in batch.trace_ids for trace in traces[:2]], 0)
        rows.labels[2] = IGNORE_INDEX  # a skipped sample
        log_probs = module.token_log_probs(module.model, rows)  # [4, T-1]
        log_probs.sum().backward()
        results[mode, pack] = log_probs.detach(), {n: p.grad for n, p in module.model.named_parameters() if p.grad is not None}
        if (mode, pack) == ("full", False):
            reference = -token_nll(module.model(input_ids=rows.input_ids).logits, rows.labels, 0.8)
            torch.testing.assert_close(log_probs.detach(), reference.detach())
    expected, expected_grads = results["full", False]
    assert expected.shape == (4, rows.input_ids.shape[1] - 1) and not expected[2].any()
    assert len({len(trace) for traces in batch.trace_ids for trace in traces[:2]}) > 1  # rows of different lengths
    for key, (log_probs, grads) in results.items():
        torch.testing.assert_close(log_probs, expected, rtol=1e-5, atol=1e-6, msg=str(key))
        for name, grad in expected_grads.items():
            torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{key} {name}")


def test_repack_rows_puts_every_sequence_back_in_place():
    from forklight.data.rendering import IGNORE_INDEX, assemble_rows, repack_rows

    prompts = [torch.tensor([1, 2, 3]), torch.tensor([4, 5]), torch.tensor([6]), torch.tensor([7, 8])]
    continuations = [torch.arange(10, 10 + n) for n in (2, 9, 4, 3)]
    rows = assemble_rows(prompts, [99] * 4, continuations, 0)  # [4, 12]
    rows.labels[3] = IGNORE_INDEX
    packed = repack_rows(rows, 0)
    assert packed.rows.input_ids.shape[0] < 4 and packed.rows.input_ids.shape[1] == 12
    real = packed.source_row >= 0
    assert torch.equal(rows.input_ids[packed.source_row[real], packed.source_position[real]], packed.rows.input_ids[real])
    assert torch.equal(rows.labels[packed.source_row[real], packed.source_position[real]], packed.rows.labels[real])
    assert torch.equal(packed.rows.position_ids[real], packed.source_position[real])  # positions restart per sequence
    assert (packed.rows.labels != IGNORE_INDEX).sum() == (rows.labels != IGNORE_INDEX).sum()
    assert int((packed.source_row == 3).sum()) == 1  # no supervised token: one token kept, no loss


def test_a_model_whose_logits_are_not_its_head_falls_back_to_full_logits_and_says_why():
    gemma = {"model_type": "gemma2", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64, "final_logit_softcapping": 2.0}
    module = ssft(gemma, "auto")
    with pytest.warns(UserWarning, match=r"model.loss_head=auto: losses use the model's full logits: its logits are "
                                         r"not its head applied to its last hidden states"):
        assert not module.head_path().chunked
    batch = toy_batch(1)
    loss, _ = module.matched_loss(batch, module.match(batch))
    assert torch.isfinite(loss)


def test_liger_off_cuda_and_unknown_modes_are_refused_naming_the_key(tiny_ssft):
    module = tiny_ssft()
    with pytest.raises(ConfigError, match=r"model.init_args.loss_head=liger cannot run: it runs on CUDA only.*"
                                          r"use loss_head: chunked"):
        resolve_head("liger", module.model)
    with pytest.raises(ConfigError, match=r"model.init_args.loss_head must be one of"):
        tiny_ssft(loss_head="fused")
    with pytest.raises(ConfigError, match=r"model.init_args.loss_chunk_tokens must be an int >= 1"):
        tiny_ssft(loss_chunk_tokens=0)
    assert resolve_head("auto", module.model).chunked and not resolve_head("auto", module.model).liger  # CPU


def test_cost_chunks_are_sized_by_padded_tokens(tiny_ssft):
    module = tiny_ssft(match_chunk_tokens=100)
    assert module.cost_chunks([30, 30, 30, 30, 50, 10]) == [0, 3, 5, 6]  # 3x30 | 2x50 | 10
    assert module.cost_chunks([500, 20]) == [0, 1, 2]  # a row longer than the budget runs alone
    assert tiny_ssft(match_chunk_tokens=100, match_chunk_rows=2).cost_chunks([10] * 5) == [0, 2, 4, 5]


# ---- packing (model.pack_rows) ---------------------------------------------------------------------------------------
def test_pack_rows_packs_whole_sequences_with_restarting_positions():
    from forklight.data.rendering import assemble_rows, pack_rows

    batch = toy_batch(3)
    prompts = [batch.prompt_ids[q] for q, traces in enumerate(batch.trace_ids) for _ in traces]
    traces = [trace for traces in batch.trace_ids for trace in traces]
    tags = [90 + i % 3 for i in range(len(traces))]
    padded, packed = assemble_rows(prompts, tags, traces, 0), pack_rows(prompts, tags, traces, 0)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # fewer rows...
    assert packed.input_ids.shape[1] == padded.input_ids.shape[1]  # ...no longer than the longest sequence
    assert packed.input_ids.numel() < padded.input_ids.numel()
    sequences = []
    for ids, labels, positions in zip(packed.input_ids, packed.labels, packed.position_ids):
        starts = (positions == 0).nonzero().flatten().tolist() + [len(positions)]
        sequences += [(ids[a:b].tolist(), labels[a:b].tolist()) for a, b in zip(starts, starts[1:])]
    expected = [(ids[: len(p) + 1 + len(t)].tolist(), labels[: len(p) + 1 + len(t)].tolist())
                for ids, labels, p, t in zip(padded.input_ids, padded.labels, prompts, traces)]
    assert sorted(s for s in sequences if any(label != -100 for label in s[1])) == sorted(expected)
    assert (packed.labels != -100).sum() == (padded.labels != -100).sum()
    one_row = pack_rows(prompts, tags, traces, 0, pack_length=10_000)
    assert one_row.input_ids.shape == (1, sum(len(p) + 1 + len(t) for p, t in zip(prompts, traces)))


@pytest.mark.parametrize("name", ["llama-untied", "gpt2-tied"])
def test_packed_and_padded_rows_give_the_same_loss_and_gradients(name):
    padded, packed = ssft(MODELS[name], "chunked", pack_rows=False), ssft(MODELS[name], "chunked", pack_rows=True)
    packed.model.load_state_dict(padded.model.state_dict())
    batch = toy_batch(3)
    assignments = padded.match(batch)
    expected_loss, expected = loss_and_gradients(padded.eval(), batch, assignments)  # eval: no dropout masks
    loss, gradients = loss_and_gradients(packed.eval(), batch, assignments)
    assert packed.packing() and not padded.packing()
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for key in expected:
        torch.testing.assert_close(gradients[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


class _IgnoresPositions(torch.nn.Module):
    """A model that drops ``position_ids``: its attention runs across packed sequences."""

    def __init__(self, inner) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, position_ids=None, **kwargs):
        return self.inner(input_ids=input_ids, **kwargs)


def test_a_model_whose_attention_crosses_packed_sequences_is_padded_and_says_why():
    module = ssft(MODELS["llama-untied"], "full")
    module.model = _IgnoresPositions(module.model)
    with pytest.warns(UserWarning, match=r"model.pack_rows is on, but _IgnoresPositions cannot take packed rows: "
                                         r"attention crosses sequences"):
        assert not module.packing()


# ---- token-budget batches (data.max_tokens_per_batch) -----------------------------------------------------------------
def test_token_budget_batches_respect_the_budget_and_balance_the_ranks():
    from forklight.data.batching import token_budget_batches

    rng = np.random.default_rng(0)
    lengths = [int(x) for x in np.clip(rng.lognormal(6, 1, size=200), 64, 4096)]
    order = list(rng.permutation(200))
    batches = token_budget_batches(order, lengths, max_tokens=3000, num_replicas=2)
    assert batches == token_budget_batches(order, lengths, max_tokens=3000, num_replicas=2)  # same on every rank
    seen = [i for shares in batches for share in shares for i in share]
    assert len(seen) == len(set(seen)) and set(seen) <= set(order) and len(seen) >= 198  # at most a tail dropped
    sizes = set()
    for shares in batches:
        assert all(shares)  # every rank gets a question
        total = sum(lengths[i] for share in shares for i in share)
        loads = [sum(lengths[i] for i in share) for share in shares]
        assert total <= 2 * 3000 or sum(map(len, shares)) == 2  # over budget only with one question per rank
        assert max(loads) - min(loads) <= max(lengths[i] for share in shares for i in share)  # balanced by tokens
        sizes.add(sum(map(len, shares)))
    assert len(sizes) > 3  # batches of many short questions and of few long ones
    assert token_budget_batches([0, 1, 2], [10, 5000, 10], 100) == [[[0]], [[1]], [[2]]]  # too long: alone


def test_an_ssft_fit_with_token_budget_batches(tmp_path):
    from forklight.cli import build_cli
    from tests.conftest import CONFIGS, tiny_overrides

    cli = build_cli(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path, max_steps=3),
                     "--data.init_args.max_tokens_per_batch=300"])
    loader = cli.trainer.train_dataloader
    sizes = [len(batch) for batch in loader]
    tokens = [sum(len(p) + sum(map(len, ts)) for p, ts in zip(batch.prompt_ids, batch.trace_ids)) for batch in loader]
    assert len(set(sizes)) > 1 and all(t <= 300 for t, n in zip(tokens, sizes) if n > 1)
    assert cli.trainer.global_step == 3
    with pytest.raises(ConfigError, match="data.max_tokens_per_batch must be >= 1 or null, got 0"):
        build_cli(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path), "--data.init_args.max_tokens_per_batch=0"])


@pytest.mark.slow
def test_token_budget_batches_under_ddp_step_like_one_process_with_the_global_budget(tmp_path):
    """Two ranks with 400 tokens each cut the same global batches as one process with 800 (each split by tokens
    over the ranks), so the per-step losses (the global token mean) agree."""
    from tests.test_distributed import LOSS_TOLERANCE, fit, scalars

    runs = {name: scalars(fit("ssft.yaml", tmp_path / name, f"--data.init_args.max_tokens_per_batch={budget}",
                              strategy=strategy) / "ssft" / "version_0")
            for name, budget, strategy in (("single", 800, None), ("ddp", 400, "ddp"))}
    assert len(runs["single"]["train/loss"]) == 3
    assert runs["ddp"]["train/loss"] == pytest.approx(runs["single"]["train/loss"], **LOSS_TOLERANCE)


# ---- questions longer than the budget: pieces of their traces ---------------------------------------------------------
def test_a_question_longer_than_the_budget_is_split_into_pieces_of_its_traces():
    from forklight.data.batching import merge_pieces, token_budget_batches, trace_pieces

    assert trace_pieces(10, [50, 40, 30, 20], 80) == [[0, 3], [1, 2]]  # first fit decreasing, prompt in each piece
    assert trace_pieces(10, [500, 20], 80) == [[0], [1]]  # longer than the budget: alone
    assert merge_pieces([(3, (0,)), 5, (3, (2,))]) == [(3, (0, 2)), 5]
    items, lengths = [0, (1, (0,)), (1, (1,))], {0: 30, (1, (0,)): 60, (1, (1,)): 50}
    assert token_budget_batches(items, lengths, 70, num_replicas=2) == [[[(1, (0,))], [(1, (1,)), 0]]]


def test_every_trace_is_trained_once_per_epoch_when_questions_are_split(tmp_path):
    from forklight.data.batching import LengthGroupedSampler, QuestionDataset
    from forklight.data.rendering import RenderedQuestion

    rng = np.random.default_rng(0)
    questions = [RenderedQuestion(id=str(i), prompt_ids=[1] * 5, trace_ids=[[2] * int(n) for n in rng.integers(5, 60, 4)],
                                  sources=[None] * 4, answer=None, columns={}) for i in range(20)]
    dataset = QuestionDataset(questions, max_traces=None, seed=0)
    for replicas in (1, 2):
        trained, split = [], 0
        for rank in range(replicas):
            sampler = LengthGroupedSampler(dataset, batch_size=2, seed=0, num_replicas=replicas, rank=rank, max_tokens=100)
            for batch in sampler:
                for question in dataset[batch]:
                    pieces = question.trained if question.trained is not None else range(4)
                    split += question.trained is not None
                    trained += [(question.id, j) for j in pieces]
                tokens = sum(len(q.prompt_ids) + sum(len(t) for j, t in enumerate(q.trace_ids)
                                                     if q.trained is None or j in q.trained) for q in dataset[batch])
                assert replicas > 1 or tokens <= 100 or len(batch) == 1  # one process: within the budget
        assert split > 0
        assert len(trained) == len(set(trained))  # never twice
        assert len(trained) >= 80 - 4 * replicas  # all, but a trailing global batch smaller than the ranks


def test_pieces_of_a_question_match_it_whole_and_sum_to_its_loss_and_gradients():
    """Two batches, each a piece of the same question, match it as the whole question does and train their own
    traces: their token-weighted losses and gradients add up to the whole question's."""
    module = ssft(MODELS["llama-untied"], "chunked")
    whole = toy_batch(1)
    assignments = module.match(whole)
    expected_loss, expected = loss_and_gradients(module, whole, assignments)
    total_tokens = float(module.matched_loss(whole, assignments)[1])
    num_traces = len(whole.trace_ids[0])
    loss_sum, gradient_sum = 0.0, {}
    for piece in ([0, 2], [j for j in range(num_traces) if j not in (0, 2)]):
        part = dataclasses.replace(whole, trained=[piece])
        assert part.split and [a.tolist() for a in module.match(part)] == [a.tolist() for a in assignments]
        tokens = float(module.matched_loss(part, assignments)[1])
        loss, gradients = loss_and_gradients(module, part, assignments)
        loss_sum += loss * tokens
        for key, value in gradients.items():
            gradient_sum[key] = gradient_sum.get(key, 0) + value * tokens
    assert loss_sum == pytest.approx(expected_loss * total_tokens, rel=1e-5)
    for key in expected:
        torch.testing.assert_close(gradient_sum[key], expected[key] * total_tokens, rtol=1e-4, atol=1e-5, msg=key)


def test_an_ssft_fit_splits_questions_longer_than_the_budget_and_rl_refuses_to(tmp_path):
    from forklight.cli import build_cli
    from tests.conftest import CONFIGS, tiny_overrides

    cli = build_cli(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path, max_steps=3),
                     "--data.init_args.max_tokens_per_batch=60"])
    batches = list(cli.trainer.train_dataloader)
    assert any(batch.split for batch in batches)
    trained = [(q, j) for batch in batches for b, q in enumerate(batch.ids) for j in range(len(batch.trace_ids[b]))
               if batch.trains(b, j)]
    assert len(trained) == len(set(trained)) == sum(len(q.trace_ids) for q in cli.datamodule.datasets["train"].questions)
    assert cli.trainer.global_step == 3
    export = tiny_export(tmp_path / "export")
    with pytest.raises(ConfigError, match=r"data.max_tokens_per_batch split question .* GFPOModule samples its prompts"):
        build_cli(["fit", "-c", str(CONFIGS / "gfpo.yaml"), *tiny_overrides(tmp_path / "gfpo", max_steps=1),
                   f"--model.init_args.init_from={export}", "--model.init_args.num_fork_tokens=3",
                   "--model.init_args.group_size=3", "--model.init_args.max_completion_tokens=6",
                   "--data.init_args.max_tokens_per_batch=60"])

"""Gradient accumulation and micro-batching step exactly like one big batch.

SSFT/SFT through a real Lightning ``Trainer`` (``accumulate_grad_batches``): two micro-batches of
very different token counts must take the step of one batch holding both, whose loss is the
token mean over all of them. GRPO (manual optimisation) through ``update_micro_batch_rows``: the
chunked backward must give the gradient of one backward over every row, for every loss type.
"""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from forklight.data.rendering import TraceSetBatch
from forklight.rollout import Completion, RolloutGroup
from tests.conftest import TINY_MODEL_CONFIG, fake_rollouts, tiny_export, toy_batch

GRADIENT_TOLERANCE = 1e-6


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients of every step it takes (after Lightning's hooks and clipping)."""

    def __init__(self, params, lr: float = 1.0) -> None:
        super().__init__(params, lr=lr)
        self.gradients: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None  # Lightning runs training_step and backward in here
        self.gradients.append([p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                               for group in self.param_groups for p in group["params"]])
        super().step()
        return loss


def _recording(module, lr: float = 1.0):
    """Give ``module`` a RecordingSGD (and a constant schedule, which the RL loop steps)."""

    def configure_optimizers():
        optimizer = RecordingSGD([p for p in module.parameters() if p.requires_grad], lr=lr)
        module.recorder = optimizer
        return {"optimizer": optimizer, "lr_scheduler": torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)}

    module.configure_optimizers = configure_optimizers
    return module


def _trainer(max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                     num_sanity_val_steps=0, **kwargs)


def _loader(batches: list) -> DataLoader:
    return DataLoader(batches, batch_size=None, collate_fn=lambda batch: batch)


def _questions(batch: TraceSetBatch, keep: slice, trace_tokens: int | None = None) -> TraceSetBatch:
    """Questions ``keep`` of ``batch``, every trace cut to ``trace_tokens`` tokens."""
    cut = (lambda trace: trace[:trace_tokens]) if trace_tokens else (lambda trace: trace)
    return TraceSetBatch(ids=batch.ids[keep], prompt_ids=batch.prompt_ids[keep],
                         trace_ids=[[cut(t) for t in traces] for traces in batch.trace_ids[keep]],
                         sources=batch.sources[keep], answers=batch.answers[keep], columns=batch.columns[keep])


def _join(*batches: TraceSetBatch) -> TraceSetBatch:
    return TraceSetBatch(ids=[i for b in batches for i in b.ids], prompt_ids=[p for b in batches for p in b.prompt_ids],
                         trace_ids=[t for b in batches for t in b.trace_ids], sources=[s for b in batches for s in b.sources],
                         answers=[a for b in batches for a in b.answers], columns=[c for b in batches for c in b.columns])


def _ssft(**kwargs):
    from forklight.modules.ssft import SSFTModule

    module = SSFTModule(model_config=dict(TINY_MODEL_CONFIG), tokenizer="toy", num_fork_tokens=4, matching="fixed",
                        **kwargs)
    return _recording(module)


def _max_difference(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b, strict=True))


def _relative_error(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """|a - b| / |b| over all parameters (the gradients as one vector)."""
    difference = sum(((x - y) ** 2).sum() for x, y in zip(a, b, strict=True)) ** 0.5
    return (difference / sum((y**2).sum() for y in b) ** 0.5).item()


def _supervised_tokens(batch: TraceSetBatch) -> int:
    return sum(len(trace) for traces in batch.trace_ids for trace in traces)


@pytest.mark.parametrize("clip", [None, 0.05])
def test_accumulated_micro_batches_take_the_step_of_one_big_batch(clip):
    source = toy_batch(4)
    small, large = _questions(source, slice(0, 1), trace_tokens=4), _questions(source, slice(1, 4))
    assert _supervised_tokens(large) > 20 * _supervised_tokens(small)  # very different token counts
    accumulated, whole = _ssft(), _ssft()
    _trainer(1, accumulate_grad_batches=2, gradient_clip_val=clip).fit(accumulated, _loader([small, large]))
    _trainer(1, gradient_clip_val=clip).fit(whole, _loader([_join(small, large)]))
    assert len(accumulated.recorder.gradients) == len(whole.recorder.gradients) == 1
    error = _max_difference(accumulated.recorder.gradients[0], whole.recorder.gradients[0])
    relative = _relative_error(accumulated.recorder.gradients[0], whole.recorder.gradients[0])
    print(f"clip {clip}: max |gradient difference| {error:.3g}, relative to the gradient norm {relative:.3g}")
    assert error < GRADIENT_TOLERANCE
    # train/loss at the step: the token mean over the whole window, as the big batch logs it
    accumulated_loss = accumulated.trainer.callback_metrics["train/loss"].item()
    assert accumulated_loss == pytest.approx(whole.trainer.callback_metrics["train/loss"].item(), rel=1e-5)


def test_a_short_last_window_and_a_skipped_micro_batch_still_give_the_token_mean():
    source = toy_batch(4)
    first, poisoned = _questions(source, slice(0, 1), trace_tokens=5), _questions(source, slice(1, 2))
    second, third = _questions(source, slice(2, 3)), _questions(source, slice(3, 4), trace_tokens=9)
    accumulated = _ssft(on_nonfinite="skip")
    matched_loss = accumulated.matched_loss

    def poison(batch, assignments):
        loss, tokens = matched_loss(batch, assignments)
        return (loss * float("nan"), tokens) if batch.ids == poisoned.ids else (loss, tokens)

    accumulated.matched_loss = poison
    # windows of 3: [first, poisoned (skipped), second], then the epoch's short last window [third]
    _trainer(2, accumulate_grad_batches=3).fit(accumulated, _loader([first, poisoned, second, third]))
    assert accumulated.fault_counts["nonfinite_skipped"] == 1
    whole = _ssft()
    _trainer(2).fit(whole, _loader([_join(first, second), third]))
    for step in range(2):
        error = _max_difference(accumulated.recorder.gradients[step], whole.recorder.gradients[step])
        print(f"step {step}: max |gradient difference| {error:.3g}")
        assert error < GRADIENT_TOLERANCE


def test_random_matching_draws_a_fresh_assignment_for_every_micro_batch():
    from forklight.modules.ssft import SSFTModule

    module = SSFTModule(model_config=dict(TINY_MODEL_CONFIG), tokenizer="toy", num_fork_tokens=6, matching="random")
    module.configure_model()
    batch = toy_batch(2)
    draws = {batch_idx: [a.tolist() for a in module.match(batch, batch_idx)] for batch_idx in range(4)}
    assert len({str(draw) for draw in draws.values()}) == 4  # micro-batches of one optimiser step differ
    assert [a.tolist() for a in module.match(batch, 2)] == draws[2]  # reproducible (a resumed run draws the same)
    seen = []  # through the trainer: two micro-batches of the same batch in one optimiser step
    module = _recording(SSFTModule(model_config=dict(TINY_MODEL_CONFIG), tokenizer="toy", num_fork_tokens=6,
                                   matching="random"))
    original = module.matched_loss
    module.matched_loss = lambda b, assignments: seen.append([a.tolist() for a in assignments]) or original(b, assignments)
    _trainer(1, accumulate_grad_batches=2).fit(module, _loader([batch, batch]))
    assert len(seen) == 2 and seen[0] != seen[1]


def test_token_window_arithmetic_over_ranks_and_micro_batches():
    """R ranks x K micro-batches, each rank's part averaged by DDP and divided by K by Lightning, times the
    correction: the gradient of the token mean over every rank's every micro-batch."""
    from forklight.losses import accumulation_correction, data_parallel_token_mean, summed_nll, window_token_mean_part

    torch.manual_seed(0)
    logits = torch.randn(8, 6, 9, requires_grad=True)  # 4 micro-batches (2 ranks x 2 steps) of 2 rows
    labels = torch.randint(0, 9, (8, 6))
    labels[0, :5] = labels[3, :2] = labels[6, :4] = -100  # very different token counts
    nll, tokens = summed_nll(logits, labels)
    (nll / tokens).backward()
    expected, logits.grad = logits.grad.clone(), None
    ranks, steps = 2, 2
    micro = [[slice(2 * (r + ranks * k), 2 * (r + ranks * k) + 2) for r in range(ranks)] for k in range(steps)]
    reference, window = None, 0.0
    for k in range(steps):
        parts = [summed_nll(logits[rows], labels[rows]) for rows in micro[k]]
        global_tokens = float(sum(count for _, count in parts))  # sum over ranks
        reference = reference or global_tokens
        window += global_tokens
        means = [data_parallel_token_mean(s, torch.tensor(global_tokens), ranks) for s, _ in parts]  # as matched_loss
        losses = [window_token_mean_part(mean, global_tokens, reference, steps) for mean in means]
        (sum(losses) / ranks / steps).backward()  # DDP's mean over ranks, Lightning's 1 / accumulate_grad_batches
    torch.testing.assert_close(logits.grad * accumulation_correction(reference, window), expected, atol=1e-7, rtol=0)


# ---- GRPO: micro-batched update --------------------------------------------------------------------------------
def _varied_rollouts(batch, tags, batch_idx):
    """Completion k of every group: k + 1 tokens and text ``so k`` (lengths and rewards differ within a group)."""
    return [RolloutGroup(qid, prompt.tolist(), group,
                         [Completion(token_ids=[7 + q] * (k + 1) + [9] * (k % 2), text=f"so {k}", length=k + 3,
                                     truncated=False, stop_token=5) for k, _ in enumerate(group)])
            for q, (qid, prompt, group) in enumerate(zip(batch.ids, batch.prompt_ids, tags))]


def _grpo(tmp_path, **kwargs):
    from forklight.modules.grpo import GRPOModule

    module = GRPOModule(init_from=str(tiny_export(tmp_path)), num_fork_tokens=3, group_size=4, max_completion_tokens=8,
                        max_grad_norm=None, **kwargs)
    module.rollouts = _varied_rollouts
    module.verifier = lambda texts, answers, **_: [float(int(text.split()[1]) % 3 == 0) for text in texts]
    return _recording(module, lr=0.05)


@pytest.mark.filterwarnings("ignore:The '.*dataloader' does not have many workers")
@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_micro_batched_update_equals_one_backward_over_the_batch(tmp_path, loss_type):
    batches = [toy_batch(2), _questions(toy_batch(4), slice(2, 4))]
    runs, backward_rows = {}, {}
    for rows in (None, 3):  # 8 rows a step: chunks of 3, 3 and 2
        module = _grpo(tmp_path, loss_type=loss_type, kl_coef=0.1, num_iterations=2, update_micro_batch_rows=rows)
        token_log_probs, seen = module.token_log_probs, []
        module.token_log_probs = lambda model, chunk: (seen.append((torch.is_grad_enabled(), len(chunk.input_ids)))
                                                       or token_log_probs(model, chunk))
        _trainer(4).fit(module, _loader(batches))
        runs[rows], backward_rows[rows] = module.recorder.gradients, [n for grad, n in seen if grad]
    assert backward_rows == {None: [8] * 4, 3: [3, 3, 2] * 4}  # the update did run in chunks
    assert len(runs[None]) == len(runs[3]) == 4  # 2 batches x 2 iterations
    errors = [_max_difference(a, b) for a, b in zip(runs[None], runs[3])]
    largest = max(g.abs().max().item() for g in runs[None][0])
    print(f"{loss_type}: max |gradient difference| per step {['%.3g' % e for e in errors]}, largest entry {largest:.3g}")
    assert max(errors) < GRADIENT_TOLERANCE
    assert largest > 1e-3  # the gradient is not trivially zero


@pytest.mark.parametrize("method", ["grpo", "gfpo"])
def test_accumulate_grad_batches_with_manual_optimisation_names_the_key_and_the_option(tmp_path, method):
    from forklight.modules.gfpo import GFPOModule

    module = _grpo(tmp_path) if method == "grpo" else GFPOModule(init_from=str(tiny_export(tmp_path)), num_fork_tokens=3)
    with pytest.raises(ValueError, match=r"trainer.accumulate_grad_batches=2.*update_micro_batch_rows"):
        _trainer(1, accumulate_grad_batches=2).fit(module, _loader([toy_batch(2)]))
    with pytest.raises(ValueError, match="model.update_micro_batch_rows must be >= 1"):
        _grpo(tmp_path, update_micro_batch_rows=0)
    with pytest.raises(ValueError, match=r"trainer.gradient_clip_val=1.0.*model.init_args.max_grad_norm"):
        _trainer(1, gradient_clip_val=1.0).fit(_grpo(tmp_path), _loader([toy_batch(2)]))


def test_grpo_log_probs_are_taken_at_the_rollout_temperature(tmp_path):
    module = _grpo(tmp_path, rollout_temperature=0.7)
    module.configure_model()
    batch = toy_batch(2)
    rows = module.prepare_update(batch, 0).rows
    with torch.no_grad():
        logits = module.model(input_ids=rows.input_ids).logits[:, :-1].float()  # [S, T-1, V]
        targets = rows.labels[:, 1:]
        expected = (logits / 0.7).log_softmax(-1).gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        expected = expected * (targets != -100)
        got = module.token_log_probs(module.model, rows)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="model.rollout_temperature"):
        _grpo(tmp_path, rollout_temperature=0.0)


# ---- the RL probabilities come from the distribution that was sampled: no dropout ---------------------------------
DROPOUT_GPT2 = {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 2, "n_inner": 64, "n_positions": 256,
                "resid_pdrop": 0.3, "embd_pdrop": 0.3, "attn_pdrop": 0.3, "tie_word_embeddings": False}


def _dropout_export(tmp_path):
    return tiny_export(tmp_path, DROPOUT_GPT2, "dropout_export")


@pytest.mark.parametrize("checkpointing", [False, True])
def test_without_dropout_turns_dropout_off_and_keeps_gradient_checkpointing(checkpointing):
    from transformers import AutoConfig, AutoModelForCausalLM

    from forklight.modules.rl import without_dropout

    config = dict(DROPOUT_GPT2)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(config.pop("model_type"), vocab_size=40, **config))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    attention_calls = []
    model.transformer.h[0].attn.register_forward_hook(lambda *_: attention_calls.append(1))
    input_ids = torch.arange(1, 13).reshape(2, 6)
    assert not torch.equal(model(input_ids=input_ids).logits, model(input_ids=input_ids).logits)  # dropout is on
    with without_dropout(model):
        first = model(input_ids=input_ids).logits
        attention_calls.clear()
        second = model(input_ids=input_ids).logits
        second.sum().backward()
    calls = len(attention_calls)
    with torch.no_grad():
        model.eval()
        evaluated = model(input_ids=input_ids).logits
    assert torch.equal(first, second) and torch.allclose(first, evaluated, atol=1e-6)  # no dropout: the eval model
    assert calls == (2 if checkpointing else 1)  # the block recomputed in backward: still checkpointed
    assert model.transformer.wte.weight.grad.abs().sum() > 0
    model.train()
    with without_dropout(model):
        pass
    assert all(module.training for module in model.modules())  # modes restored


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.parametrize("trainable", ["head", "all"])
def test_gfpo_first_iteration_ratio_is_one_with_a_dropout_model(tmp_path, monkeypatch, trainable):
    import forklight.modules.gfpo as gfpo

    module = gfpo.GFPOModule(init_from=str(_dropout_export(tmp_path)), num_fork_tokens=3, group_size=6,
                             max_completion_tokens=4, trainable=trainable)
    module.configure_model()
    assert module.model.training and any(m.p > 0 for m in module.model.modules() if isinstance(m, torch.nn.Dropout))
    module.rollouts = fake_rollouts(lambda tag: f"so {100 + tag}")
    module.verifier = lambda texts, answers, **_: [float(text == "so 101") for text in texts]
    new = []
    real = gfpo.fork_log_policy
    monkeypatch.setattr(gfpo, "fork_log_policy", lambda *a, **k: new.append(real(*a, **k)) or new[-1])
    batch = toy_batch(4)
    update = module.prepare_update(batch, 0)
    parts = module.update_loss(update, 0)
    log_ratio = (new[0] - update.old_log_policy).gather(1, update.tags)  # [B, G]
    print(f"trainable={trainable}: max |log ratio| at the first iteration {log_ratio.abs().max().item():.3g}")
    assert log_ratio.abs().max().item() < 1e-6
    assert parts.clip_frac.item() == 0.0
    parts.loss.backward()  # gradient still flows through the dropout-free forward
    assert module.model.get_output_embeddings().weight.grad[module.fork_token_ids].abs().sum() > 0
    assert module.model.training  # the mode is restored


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_grpo_old_and_new_log_probs_agree_at_the_first_iteration_with_a_dropout_model(tmp_path):
    from forklight.modules.grpo import GRPOModule

    module = GRPOModule(init_from=str(_dropout_export(tmp_path)), num_fork_tokens=3, group_size=4,
                        max_completion_tokens=8, num_iterations=2, kl_coef=0.1)
    module.configure_model()
    module.rollouts = _varied_rollouts
    module.verifier = lambda texts, answers, **_: [float(int(text.split()[1]) % 2) for text in texts]
    update = module.prepare_update(toy_batch(2), 0)
    new = []
    real = module.token_log_probs
    module.token_log_probs = lambda *a, **k: new.append(real(*a, **k)) or new[-1]
    parts = module.update_loss(update, 0)
    difference = (new[0] - update.old_log_probs).abs().max().item()
    print(f"max |new - old| token log-prob at the first iteration {difference:.3g}")
    assert difference < 1e-6
    assert (new[0].detach() - update.ref_log_probs).abs().max().item() < 1e-6  # the reference starts equal too
    assert parts.clip_frac.item() == 0.0 and parts.kl.item() < 1e-6
    parts.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.model.parameters())
    assert module.model.training
    assert np.isfinite(parts.loss.item())

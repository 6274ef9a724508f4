"""GFPO and GRPO: losses by hand, the bandit, gradient sources, and both modules through the CLI."""

from __future__ import annotations

import json

import pytest
import torch

from forklight.cli import main
from forklight.losses import (
    categorical_kl,
    gfpo_loss,
    group_advantages,
    grpo_loss,
    stratified_gfpo_loss,
)
from forklight.rollout import Completion, RolloutGroup
from tests.conftest import (
    CONFIGS,
    fake_rollouts,
    tiny_export,
    tiny_gfpo,
    tiny_overrides,
    toy_batch,
)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    valid = torch.tensor([[True, True, True, True], [True, True, True, False]])
    centred = group_advantages(rewards, valid, "none")
    assert torch.allclose(centred, torch.tensor([[0.5, -0.5, 0.5, -0.5], [0.0, 0.0, 0.0, 0.0]]))
    scaled = group_advantages(rewards, valid, "group")
    std = torch.tensor([1.0, 0.0, 1.0, 0.0]).std()  # unbiased, as torch.std
    assert torch.allclose(scaled[0], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (std + 1e-4))
    assert torch.all(scaled[1] == 0)  # all valid samples equal; the skipped one gets no advantage


def test_exact_kl_matches_torch_distributions():
    logits_p, logits_q = torch.randn(5, 6), torch.randn(5, 6)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Categorical(logits=logits_p), torch.distributions.Categorical(logits=logits_q)
    )
    assert torch.allclose(categorical_kl(logits_p.log_softmax(-1), logits_q.log_softmax(-1)), expected, atol=1e-6)


def test_stratified_gfpo_gradient_is_the_analytic_policy_gradient():
    logits = torch.randn(3, 4, requires_grad=True)  # [B, N]
    tag_rewards = torch.rand(3, 4)
    parts = stratified_gfpo_loss(logits.log_softmax(-1), None, tag_rewards, torch.ones(3, 4, dtype=torch.bool), 0.0, 0.0)
    parts.loss.backward()
    pi = logits.detach().softmax(-1)
    expected_reward = (pi * tag_rewards).sum(-1, keepdim=True)
    analytic = pi * (tag_rewards - expected_reward) / 3  # d E_pi[r] / d logits, averaged over B
    assert torch.allclose(-logits.grad, analytic, atol=1e-6)


def test_gfpo_sampled_loss_by_hand():
    log_policy = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    old = torch.log(torch.tensor([[0.25, 0.25, 0.5]]))
    tags = torch.tensor([[0, 2]])
    advantages = torch.tensor([[1.0, -1.0]])
    parts = gfpo_loss(log_policy, old, None, tags, advantages, torch.ones(1, 2, dtype=torch.bool), 0.2, 0.0, 0.0)
    # ratios 2.0 (clipped to 1.2, A=+1) and 0.5 (A=-1: min(-0.5, -0.8) = -0.8)
    assert parts.loss.item() == pytest.approx(-(1.2 + -0.8) / 2)
    assert parts.clip_frac.item() == pytest.approx(1.0)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_token_normalisation_by_hand(loss_type):
    log_probs = torch.zeros(2, 3, requires_grad=True)  # ratio 1: per-token loss = -A
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    advantages = torch.tensor([1.0, -2.0])
    parts = grpo_loss(log_probs, log_probs.detach(), None, advantages, mask, loss_type, 0.2, 0.0, max_completion_length=4)
    sums = torch.tensor([-1.0 * 3, 2.0 * 1])  # per-sequence sums of -A over tokens
    expected = {
        "grpo": ((sums[0] / 3 + sums[1] / 1) / 2).item(),
        "dapo": (sums.sum() / 4).item(),
        "dr_grpo": (sums.sum() / (2 * 4)).item(),
    }[loss_type]
    assert parts.loss.item() == pytest.approx(expected)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_grpo_loss_of_two_ranks_averages_to_the_one_process_loss(loss_type):
    from forklight.losses import grpo_normaliser

    log_probs = torch.zeros(4, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    advantages = torch.tensor([1.0, -2.0, 0.5, 3.0])
    whole = grpo_loss(log_probs, log_probs, None, advantages, mask, loss_type, 0.2, 0.0, 4).loss
    halves = [slice(0, 2), slice(2, 4)]
    total = sum(grpo_normaliser(mask[h], loss_type, 4) for h in halves)  # what sum_over_ranks gives
    ranks = [grpo_loss(log_probs[h], log_probs[h], None, advantages[h], mask[h], loss_type, 0.2, 0.0, 4,
                       global_count=total, world_size=2).loss for h in halves]
    assert ((ranks[0] + ranks[1]) / 2).item() == pytest.approx(whole.item())  # DDP averages the ranks


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_gfpo_learns_the_tag_that_succeeds_on_a_bandit(tmp_path):
    module = tiny_gfpo(tmp_path, tag_sampling="policy")
    module.rollouts = fake_rollouts(lambda tag: f"so {100 + tag}")
    module.verifier = lambda texts, answers, **_: [1.0 if text == "so 101" else 0.0 for text in texts]  # tag 2 wins
    batch = toy_batch(4)
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=2.0)
    before = module.fork_policy_of(batch.prompt_ids).exp()[:, 1].mean().item()
    for step in range(15):
        update = module.prepare_update(batch, step)
        optimizer.zero_grad()
        module.update_loss(update, 0).loss.backward()
        optimizer.step()
    after = module.fork_policy_of(batch.prompt_ids).exp()[:, 1].mean().item()
    assert before < 0.5 and after > 0.9


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_gfpo_gradient_ignores_completion_tokens_and_completions_never_get_grad(tmp_path):
    module = tiny_gfpo(tmp_path, tag_sampling="stratified")
    module.verifier = lambda texts, answers, **_: [1.0 if "1" in text else 0.0 for text in texts]
    batch = toy_batch(2)
    calls = []
    forward = module.model.forward

    def recording_forward(*args, **kwargs):
        calls.append((torch.is_grad_enabled(), kwargs["input_ids"].shape[1]))
        return forward(*args, **kwargs)

    module.model.forward = recording_forward
    gradients = []
    for texts in ({0: "a 1", 1: "b", 2: "c 1"}, {0: "zz 11 zz", 1: "qq", 2: "1 long completion"}):  # same rewards
        module.rollouts = fake_rollouts(lambda tag, texts=texts: texts[tag])
        module.zero_grad()
        module.update_loss(module.prepare_update(batch, 0), 0).loss.backward()
        gradients.append(module.model.get_output_embeddings().weight.grad.clone())
    assert torch.equal(gradients[0], gradients[1])
    longest_prompt = max(len(p) for p in batch.prompt_ids)
    assert all(length <= longest_prompt for grad, length in calls if grad)  # prompts only, with gradient
    assert any(grad for grad, _ in calls)
    head = module.model.get_output_embeddings().weight.grad
    others = [i for i in range(head.shape[0]) if i not in module.fork_token_ids]
    assert torch.all(head[others] == 0) and head[module.fork_token_ids].abs().sum() > 0  # trainable: head


def _numbered_rollouts(stop_token: int):
    """A ``rollouts`` replacement: completion k of a group is tokens ``20 + k, 21 + k, ...`` (k + 1 of them),
    then ``stop_token``, except the last completion, which is truncated (no stop token); text ``so k``."""

    def rollouts(batch, tags, batch_idx):
        return [RolloutGroup(qid, prompt.tolist(), group, [
            Completion(token_ids=list(range(20 + k, 21 + 2 * k)), text=f"so {k}", length=k + 2,
                       truncated=k == len(group) - 1, stop_token=None if k == len(group) - 1 else stop_token)
            for k, _ in enumerate(group)]) for qid, prompt, group in zip(batch.ids, batch.prompt_ids, tags)]

    return rollouts


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
@pytest.mark.filterwarnings("ignore:The '.*dataloader' does not have many workers")
def test_grpo_loss_covers_completion_and_stop_tokens_only_and_the_reference_stays_frozen(tmp_path):
    import lightning as L
    from torch.utils.data import DataLoader

    from forklight.modules.grpo import GRPOModule

    module = GRPOModule(init_from=str(tiny_export(tmp_path)), num_fork_tokens=3, group_size=4, max_completion_tokens=8,
                        kl_coef=0.5, learning_rate=0.05)
    module.configure_model()
    module.rollouts = _numbered_rollouts(stop_token=module.stop_ids[0])
    module.verifier = lambda texts, answers, **_: [float(int(text.split()[1]) % 2) for text in texts]  # every A != 0
    batch = toy_batch(2)
    completions = [c for group in module.rollouts(batch, [[0] * 4] * 2, 0) for c in group.completions]  # [S]
    prompt_lengths = [len(p) for p in batch.prompt_ids for _ in range(4)]  # [S]

    # Which next-token log-probs the loss depends on: row s predicts its tokens at positions P_s.., tag at P_s
    update = module.prepare_update(batch, 0)
    token_log_probs, seen = module.token_log_probs, []
    module.token_log_probs = lambda model, rows: seen.append(token_log_probs(model, rows)) or seen[-1].retain_grad() or seen[-1]
    module.update_loss(update, 0).loss.backward()
    gradient = seen[0].grad  # [S, T-1]: position t scores input token t + 1
    for row, (completion, length) in enumerate(zip(completions, prompt_lengths)):
        scored = completion.token_ids + ([] if completion.truncated else [completion.stop_token])  # stop included
        covered = gradient[row].nonzero().flatten()
        assert covered.tolist() == list(range(length, length + len(scored)))  # not the prompt, not the tag
        assert update.rows.input_ids[row, covered + 1].tolist() == scored
    assert sum(c.stop_token is not None for c in completions) == 6 and sum(c.truncated for c in completions) == 2

    # A few real training steps with the KL on: the policy moves, the frozen reference never does
    module.token_log_probs = token_log_probs
    reference = {name: value.clone() for name, value in module.reference_model.state_dict().items()}
    policy = {name: value.clone() for name, value in module.model.state_dict().items()}
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, DataLoader([batch] * 3, batch_size=None, collate_fn=lambda item: item))
    assert trainer.global_step == 3
    assert any(not torch.equal(value, policy[name]) for name, value in module.model.state_dict().items())
    assert all(torch.equal(value, reference[name]) for name, value in module.reference_model.state_dict().items())
    assert all(not p.requires_grad and p.grad is None for p in module.reference_model.parameters())
    with torch.no_grad():  # the same reference probabilities of the same rows; the policy's have moved away
        assert torch.equal(module.token_log_probs(module.reference_model, update.rows), update.ref_log_probs)
        assert not torch.allclose(module.token_log_probs(module.model, update.rows), update.ref_log_probs)


def test_math_verifier_tricky_cases():
    from forklight.rewards import MathVerifier

    verifier = MathVerifier(timeout_s=3)  # generous: the normal cases must not time out on a busy machine
    completions = ["so \\boxed{\\frac{1}{2}}", "the answer is **73**", "I give up", "\\boxed{5}", "\\boxed{2}"]
    answers = ["0.5", "73", "4", "not a number !!", "\\boxed{9^{9^{9^{9^{9}}}}}"]
    scores = verifier(completions, answers)
    assert scores[:3] == [1.0, 1.0, 0.0]
    assert scores[3] is None  # an unparseable gold answer skips the sample
    assert scores[4] == 0.0  # the pathological comparison times out and scores 0
    assert verifier.counts == {"parse_failures": 1, "timeouts": 1, "gold_failures": 1}


def test_math_verifier_outside_the_main_thread():
    from concurrent.futures import ThreadPoolExecutor

    from forklight.rewards import MathVerifier

    verifier = MathVerifier(timeout_s=5)
    with ThreadPoolExecutor(1) as pool:
        scores = pool.submit(verifier, ["\\boxed{0.5}", "nothing"], ["\\frac{1}{2}", "3"]).result()
    assert scores == [1.0, 0.0]


def test_weighted_verifiers_and_class_path(tmp_path):
    from forklight.rewards import resolve_verifier

    verifier, extract = resolve_verifier(["exact_integer", {"class_path": "forklight.rewards.MathVerifier",
                                                             "init_args": {"timeout_s": 2}, "weight": 0.5}])
    assert verifier(["so 12", "so 13"], ["12", "12"]) == [1.5, 0.0]
    assert extract("so 0012") == "12"
    with pytest.raises(ValueError, match="exactly one of 'class_path'"):
        resolve_verifier({"weight": 2.0})


@pytest.mark.slow
def test_gfpo_and_grpo_fit_from_an_ssft_run_through_the_cli(tmp_path):
    main(["fit", "-c", str(CONFIGS / "ssft.yaml"), *tiny_overrides(tmp_path, max_steps=2), "--model.init_args.num_fork_tokens=3"])
    run = tmp_path / "ssft" / "version_0"
    rl_overrides = [*tiny_overrides(tmp_path, max_steps=2), "--model.init_args.group_size=3",
                    "--model.init_args.max_completion_tokens=6"]
    main(["fit", "-c", str(CONFIGS / "gfpo.yaml"), *rl_overrides, "--model.init_args.num_fork_tokens=3",
          f"--model.init_args.init_from={tmp_path}/ssft/version_*/export", "--model.init_args.kl_coef=0.1"])
    export = tmp_path / "gfpo" / "version_0" / "export"
    metadata = json.loads((export / "forklight.json").read_text())
    assert metadata["method"] == "GFPOModule" and metadata["fork_policy"] == "learned"
    assert metadata["hparams"]["init_from"] == str(run / "export")  # the glob resolved, and saved
    main(["fit", "-c", str(CONFIGS / "grpo.yaml"), *rl_overrides, "--model.init_args.num_fork_tokens=3",
          f"--model.init_args.init_from={run}/checkpoints/last.ckpt", "--model.init_args.kl_coef=0.05",
          "--model.init_args.num_iterations=2"])
    assert (tmp_path / "grpo" / "version_0" / "checkpoints" / "last.ckpt").exists()
    with pytest.raises(ValueError, match="has 3 fork tokens"):
        main(["fit", "-c", str(CONFIGS / "gfpo.yaml"), *rl_overrides, f"--model.init_args.init_from={export}"])


def test_completions_never_contain_a_fork_token(tiny_ssft, monkeypatch):
    # A GFPO update moves the fork tokens' output rows; generation must still never emit a tag.
    from forklight.rollout import generate_completions

    module = tiny_ssft(num_fork_tokens=3)
    with torch.no_grad():
        module.model.get_output_embeddings().weight[module.fork_token_ids] += 5.0  # tags now dominate the logits
    prefixes = [p.tolist() + [module.fork_token_ids[0]] for p in toy_batch(2).prompt_ids]
    free = generate_completions(module.model, module.tokenizer, prefixes, module.stop_ids, 12, 1.0)
    assert any(t in module.fork_token_ids for c in free for t in c.token_ids)  # the test can fail
    import forklight.rollout as rollout

    seen = {}
    real = rollout.generate_completions
    monkeypatch.setattr(rollout, "generate_completions", lambda *a, **k: seen.update(k) or real(*a, **k))
    module.evaluator.evaluate_batch(toy_batch(1))
    assert seen["suppress_ids"] == module.fork_token_ids  # the evaluation loop suppresses them
    suppressed = generate_completions(module.model, module.tokenizer, prefixes, module.stop_ids, 12, 1.0,
                                      suppress_ids=module.fork_token_ids)
    assert not any(t in module.fork_token_ids for c in suppressed for t in c.token_ids)

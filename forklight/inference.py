"""Reason in parallel at inference: completions after chosen forking tokens, and a vote over them.

    from forklight.inference import ForkingModel

    model = ForkingModel("runs/ssft/version_0/export")            # any forklight export (or .ckpt)
    by_tag = model.generate("What is 12+30?", tags="all", n=2)     # {"<think1>": [Completion, Completion], ...}
    solution = model.solve("What is 12+30?")                       # one completion per tag, majority answer
    solution.answer, solution.votes                                # "42", {"42": 5, "41": 1}

``tags``: ``"all"`` (every tag), ``"default"`` (the tag matched to the most training traces), ``"policy"`` (the
model's own tag distribution: one forward pass for the fork-token logits after the prompt, then ``n`` tags drawn
from it, as a GFPO export is meant to be used), or a list of tag indices (0-based). Generation runs on the
export's generation engine (``engine="hf"``, the default, or ``"vllm"`` with ``vllm={...}``: docs/vllm.md), with
the fork tokens suppressed after the chosen tag and the export's stop tokens. Votes count answers the verifier
calls equal as one (``verifier="math"``: ``1/2`` = ``\\frac12``); ties go to the answer whose first vote came from
the lowest tag, and answerless completions do not vote (:mod:`forklight.metrics`).
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from forklight.data.records import QuestionRecord
from forklight.data.rendering import render_prompt_ids
from forklight.evaluation import sample_tags
from forklight.metrics import answer_groups, majority_vote
from forklight.rollout import Completion


@dataclass
class Solution:
    """The majority answer of one completion per tag (:meth:`ForkingModel.solve`)."""

    answer: str | None  # the winning answer (None: no completion had one)
    votes: dict[str, int]  # each answer group's first member -> its votes
    completions: dict[str, list[Completion]] = field(default_factory=dict)  # tag name -> its completions
    answers: dict[str, list[str | None]] = field(default_factory=dict)  # tag name -> extracted answers


class ForkingModel:
    def __init__(self, export: str, engine: str = "hf", vllm: dict | None = None, verifier: str = "math",
                 prompt_template: str | None = None, system_prompt: str | None = None, max_new_tokens: int = 1024,
                 temperature: float = 0.7, top_p: float = 0.95, seed: int = 0, device: str | None = None) -> None:
        """A forklight export (or checkpoint) ready to generate after its forking tokens.

        Args:
            export: an export dir with ``forklight.json``, a ``.ckpt``, or a glob of either (``init_from``).
            engine: ``hf`` or ``vllm`` (the generation engines of ``model.engine``).
            vllm: ``VLLMSettings`` options for ``engine="vllm"``.
            verifier: whose answer extraction and equality the votes use (``math``, ``exact_integer``, ``choice``).
            prompt_template / system_prompt: as in the data config the model was trained with.
            max_new_tokens, temperature, top_p, seed: sampling defaults (each call may override them).
            device: where the model runs (default: CUDA when available).
        """
        from forklight.modules.ssft import SSFTModule

        self.module = SSFTModule(init_from=export, num_fork_tokens=None, engine=engine, vllm=vllm, verifier=verifier,
                                 seed=seed)
        self.module.configure_model()
        self.module.model.eval()
        self.module.to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.prompt_template, self.system_prompt = prompt_template, system_prompt
        self.defaults = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p}
        self.seed = seed
        self._calls = 0

    @property
    def tags(self) -> list[str]:
        """The fork tokens, in index order."""
        return list(self.module.fork_tokens)

    def prompt_ids(self, question: str | list[dict[str, str]]) -> list[int]:
        """The rendered prompt (a question string, or chat messages), ending where the tag goes."""
        messages = question if isinstance(question, list) else None
        record = QuestionRecord("q", None if messages else question, messages, None, [])
        return render_prompt_ids(self.module.tokenizer, record, self.prompt_template, self.system_prompt)

    def tag_policy(self, question: str | list[dict[str, str]]) -> list[float]:
        """The model's tag distribution pi(i | x) after the prompt (one forward pass), [N]."""
        prompt = torch.tensor(self.prompt_ids(question), device=self.module.device)
        return self.module.fork_policy_of([prompt]).exp()[0].tolist()

    def choose_tags(self, question, tags: str | list[int], n: int, seed: int) -> list[int]:
        """The tag of every completion to generate: ``n`` per tag for ``all``/``default``/a list, or ``n`` drawn from
        the model's tag distribution for ``policy``."""
        num_tags, default = len(self.tags), self.module.default_tag
        if tags == "all":  # the evaluation protocol's tag plans (forklight.evaluation.sample_tags)
            return sample_tags(num_tags, num_tags * n, "even", default)
        if tags == "default":
            return sample_tags(num_tags, n, "default", default)
        if tags == "policy":
            return sample_tags(num_tags, n, "policy", default, self.tag_policy(question), np.random.default_rng(seed))
        if isinstance(tags, (list, tuple)) and tags and all(isinstance(t, int) and 0 <= t < num_tags for t in tags):
            return [tag for tag in tags for _ in range(n)]
        raise ValueError(f"tags must be 'all', 'default', 'policy' or a list of tag indices in "
                         f"[0, {num_tags - 1}], got {tags!r}")

    def generate(self, question: str | list[dict[str, str]], tags: str | list[int] = "all", n: int = 1,
                 **sampling) -> dict[str, list[Completion]]:
        """Completions after the chosen tags, by tag name (in tag order): ``n`` per tag, or ``n`` in all for
        ``tags="policy"``. ``sampling``: ``max_new_tokens``, ``temperature``, ``top_p``, ``seed``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        options = {**self.defaults, **{k: v for k, v in sampling.items() if k != "seed"}}
        seed = sampling.get("seed", self.seed * 1_000_003 + self._calls)
        self._calls += 1
        chosen = self.choose_tags(question, tags, n, seed)
        prompt = self.prompt_ids(question)
        settings = self.module.sampling_settings(options["temperature"], options["top_p"], options["max_new_tokens"],
                                                 seed=seed)
        completions = self.module.generation_engine().generate(
            [prompt + [self.module.fork_token_ids[tag]] for tag in chosen], settings)
        by_tag: dict[str, list[Completion]] = {}
        for tag, completion in sorted(zip(chosen, completions), key=lambda pair: pair[0]):
            by_tag.setdefault(self.tags[tag], []).append(completion)
        return by_tag

    def solve(self, question: str | list[dict[str, str]], k: int | None = None, tags: str | list[int] = "all",
              **sampling) -> Solution:
        """One completion per tag (``k`` > N: ``ceil(k / N)`` per tag, the first ``k`` in tag-interleaved order
        vote), or ``k`` tags drawn from the policy (``tags="policy"``); returns the majority answer and its votes."""
        num_tags = len(self.tags)
        k = k or num_tags
        if tags == "policy":
            by_tag = self.generate(question, "policy", n=k, **sampling)
        else:
            chosen = num_tags if tags == "all" else len(tags) if isinstance(tags, (list, tuple)) else 1
            by_tag = self.generate(question, tags, n=-(-k // chosen), **sampling)  # ceil(k / tags) per tag
        extract = self.module.extract_answer
        answers = {name: [extract(c.text) for c in completions] for name, completions in by_tag.items()}
        rounds = max(len(a) for a in answers.values())
        voting = [row[r] for r in range(rounds) for row in answers.values() if r < len(row)][:k]  # interleaved
        same = getattr(self.module.verifier, "same_answer", None) or operator.eq
        groups = answer_groups(voting, same)
        winner = majority_vote(groups)
        counts = Counter(group for group in groups if group is not None)
        first = {group: voting[groups.index(group)] for group in counts}
        return Solution(answer=voting[winner] if winner is not None else None,
                        votes={first[group]: count for group, count in counts.items()},
                        completions=by_tag, answers=answers)

"""``ForkModule``: what every forklight method shares.

Model and tokenizer setup (any Hugging Face causal LM, or a tiny Llama-style model built from a
config), the forking tokens, the optimiser and schedule, and the evaluation loop of DESIGN.md §2:
for every question and every tag, ``n_per_tag`` samples, scored by the verifier, reported per tag
and overall (pass@1, pass@k, cons@N, purity, length, distinctness). Methods (SSFT, GFPO, GRPO)
subclass it and add their ``training_step``. Under FSDP2 (``configs/strategies/fsdp2.yaml``)
``configure_model`` shards the model's transformer blocks (DESIGN.md §7, ``forklight/sharding.py``).
"""

from __future__ import annotations

import math
import random
from collections import Counter

import lightning as L
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info

from forklight.data.records import RecordError
from forklight.data.rendering import TraceSetBatch, end_of_turn_id, load_tokenizer
from forklight.evaluation import QuestionEvaluation, choose_tags, evaluation_metrics, used_tags
from forklight.forking import add_fork_tokens, fork_log_policy, fork_token_names, init_fork_embeddings
from forklight.models import DTYPES, apply_lora, build_causal_lm, check_gguf, keep_master_weights, lora_settings
from forklight.rewards import gold_answer_parser, resolve_callable, resolve_verifier, run_verifier
from forklight.rollout import generate_completions
from forklight.sharding import fully_shard_model
from forklight.starting import resolve_init_from, tokenizer_name

FORK_POLICIES = ("learned", "argmax", "coverage", "fixed", "uniform")
ON_NONFINITE = ("error", "skip")
PREDICT_TAGS = ("all", "policy")


class ForkModule(L.LightningModule):
    # Whether training optimises the tag distribution pi(i | x) itself (GFPO): monitors show its views.
    learns_tag_policy: bool = False

    def __init__(
        self,
        init_from: str | None = None,
        name_or_path: str | None = None,
        gguf_file: str | None = None,
        model_config: dict | None = None,
        tokenizer: str | None = None,
        dtype: str | None = None,
        trust_remote_code: bool = False,
        gradient_checkpointing: bool = False,
        lora: dict | None = None,
        shard_block_classes: list[str] | None = None,
        num_fork_tokens: int = 6,
        fork_token_format: str = "<think{i}>",
        fork_init_noise: float = 0.1,
        end_token: str | None = None,
        learning_rate: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.1,
        n_per_tag: int = 1,
        eval_temperature: float = 1.0,
        eval_top_p: float = 1.0,
        max_new_tokens: int = 256,
        generation_batch_size: int = 256,
        pass_k: int | None = None,
        fork_policy: str = "coverage",
        fixed_tag: int = 0,
        predict_tags: str = "all",
        verifier: str | dict | list[str | dict] = "exact_integer",
        reward_timeout_s: float | None = 60.0,
        strategy_classifier: str | None = None,
        on_nonfinite: str = "error",
        seed: int = 0,
    ) -> None:
        """Shared model setup and evaluation.

        Args:
            init_from: start from a forklight run: an HF export dir (with ``forklight.json``), a
                ``.ckpt``, or a glob of either (newest match, e.g. ``runs/ssft/version_*/export``); it
                fixes the model, tokenizer, fork tokens and default tag, and loads the weights.
            name_or_path: Hugging Face model id, local dir, or ``.gguf`` file; unset builds a fresh model from
                ``model_config``.
            gguf_file: a GGUF file inside ``name_or_path`` (dequantised to a plain model; needs ``gguf``).
            model_config: ``AutoConfig`` keyword arguments (with ``model_type``) of a fresh model (toy, tests).
            tokenizer: tokenizer name or path; default ``name_or_path``, or ``toy`` (character tokenizer).
            dtype: weight dtype (``float32``, ``bfloat16``, ``float16``); unset keeps the checkpoint's. In ``fit``
                under ``trainer.precision: bf16-mixed`` the trainable weights train as float32 master weights
                (:func:`~forklight.models.keep_master_weights`) and exports are written in this dtype.
            trust_remote_code: run a model repository's own code (off unless you trust it).
            gradient_checkpointing: recompute activations in backward to save memory (non-reentrant: works
                under DDP, FSDP and FSDP2).
            lora: train LoRA adapters instead of all weights: ``{r, alpha, dropout, target_modules}``
                (defaults 8, 16, 0.0, ``all-linear``); the fork tokens' embedding and output rows train
                too, every other weight is frozen, and the export merges the adapters (needs ``peft``).
            shard_block_classes: class names of the transformer blocks that FSDP2 (and the FSDP wrap policy)
                shard one by one; default the Hugging Face model's ``_no_split_modules``.
            num_fork_tokens: N, the number of forking tokens ``<think1>..<thinkN>``.
            fork_token_format: name of fork token i (1-based), must contain ``{i}``.
            fork_init_noise: std of the seeded perturbation of new fork embeddings, relative to the rows' std.
            end_token: token that ends an answer (default: the tokenizer's EOS); generation stops there.
            learning_rate: peak AdamW learning rate.
            weight_decay: AdamW weight decay.
            warmup_steps: linear warm-up steps, then cosine decay to ``min_lr_ratio * learning_rate``.
            min_lr_ratio: final learning rate as a fraction of the peak.
            n_per_tag: evaluation samples per question and tag.
            eval_temperature: evaluation sampling temperature (0 = greedy).
            eval_top_p: evaluation nucleus sampling threshold.
            max_new_tokens: longest evaluation completion.
            generation_batch_size: sequences per ``generate`` call.
            pass_k: k of ``val/pass@k`` and ``val/cons@{k}`` (default: all samples of a question, N * n_per_tag).
            fork_policy: single-shot tag choice for ``val/pass@1``: ``learned`` (sample from the model's tag
                distribution), ``argmax`` (its most likely tag), ``coverage`` (default tag), ``fixed``, ``uniform``.
            fixed_tag: tag index (0-based) used by ``fork_policy: fixed``.
            predict_tags: ``forklight predict`` writes ``n_per_tag`` completions after every tag (``all``), or
                ``n_per_tag`` per question after tags chosen by ``fork_policy`` (``policy``).
            verifier: ``exact_integer``, ``math`` (math-verify), ``package.module:function``,
                ``{class_path, init_args, weight}``, or a list of these (weighted sum of scores).
            reward_timeout_s: seconds a verifier call may take (a user verifier runs in a worker thread);
                a call that raises or runs past it scores 0 for its samples and is counted
                (``rollout/reward_errors``, ``rollout/reward_timeouts``, ``val/...``). null = no limit.
            strategy_classifier: ``package.module:function`` naming the strategy of a completion (enables purity).
            on_nonfinite: a NaN/inf training loss ``error`` (stop, naming the step and the questions) or
                ``skip`` (no update for that step, counted in ``train/nonfinite_skipped``).
            seed: seed of the fork-token initialisation, fresh weights, matching and sampling.
        """
        super().__init__()
        self._init_source = resolve_init_from(init_from) if init_from else None
        self._hparam_overrides = {"tokenizer": tokenizer_name(tokenizer, name_or_path, gguf_file=gguf_file)}
        if self._init_source is not None:
            identity = self._init_source["identity"]
            start_tags = identity.get("num_fork_tokens", 6)
            if num_fork_tokens != start_tags:
                raise ValueError(
                    f"model.num_fork_tokens={num_fork_tokens} but model.init_from={self._init_source['path']} has "
                    f"{start_tags} fork tokens; set model.init_args.num_fork_tokens={start_tags}"
                )
            # The starting point fixes the model; its resolved path is saved, so a resume finds the same one.
            self._hparam_overrides = {**identity, "init_from": self._init_source["path"]}
            self._hparam_overrides["tokenizer"] = tokenizer_name(
                identity.get("tokenizer"), identity.get("name_or_path"), gguf_file=identity.get("gguf_file"))
        # The checkpoint's hyperparameters: the arguments of every constructor of the chain, this one's and the
        # subclass's (SSFTModule's matching, ...), which Lightning reads off the call stack; then what was resolved.
        self.save_hyperparameters()
        self.save_hyperparameters({**self.hparams, **self._hparam_overrides})  # a dict: the logged initial ones too
        hp = self.hparams  # read the identity from here: init_from may have fixed it
        self._check_ranges()
        self.lora = lora_settings(lora)
        if hp.name_or_path is not None:
            check_gguf(hp.name_or_path, hp.gguf_file)
        self.tokenizer = load_tokenizer(hp.tokenizer, trust_remote_code)
        self._vocab_before_fork_tokens = len(self.tokenizer)
        self.fork_tokens = fork_token_names(hp.num_fork_tokens, hp.fork_token_format)
        self.fork_token_ids, self._new_fork_token_ids = add_fork_tokens(self.tokenizer, self.fork_tokens)
        self.stop_ids = sorted({end_of_turn_id(self.tokenizer, hp.end_token), self.tokenizer.eos_token_id} - {None})
        self.verifier, self.extract_answer = resolve_verifier(verifier)
        self.classify_strategy = (
            resolve_callable(strategy_classifier, {}, "model.strategy_classifier") if strategy_classifier else None
        )
        # Traces matched to each tag over training; argmax = the default tag (stored in checkpoints).
        self.register_buffer("tag_coverage", torch.zeros(hp.num_fork_tokens, dtype=torch.float64))
        metadata = self._init_source["metadata"] if self._init_source else {}
        if metadata.get("tag_coverage"):  # an export's default tag carries over
            self.tag_coverage.copy_(torch.tensor(metadata["tag_coverage"], dtype=self.tag_coverage.dtype))
        self.model = None
        self.fault_counts: Counter[str] = Counter()  # reward_errors, reward_timeouts, nonfinite_skipped (saved)
        self._evaluation_faults: Counter[str] = Counter()  # reward faults of the running evaluation
        self._evaluations: list[QuestionEvaluation] = []
        self.last_evaluation: list[QuestionEvaluation] = []  # read by callbacks (samples, views)

    def _check_ranges(self) -> None:
        hp = self.hparams
        if hp.num_fork_tokens < 1:
            raise ValueError(f"model.num_fork_tokens must be >= 1, got {hp.num_fork_tokens}")
        if hp.name_or_path is None and hp.model_config is None:
            raise ValueError("set model.name_or_path (HF model id or dir) or model.model_config (fresh model)")
        if hp.dtype is not None and hp.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {hp.dtype!r}")
        if hp.fork_policy not in FORK_POLICIES:
            raise ValueError(f"model.fork_policy must be one of {FORK_POLICIES}, got {hp.fork_policy!r}")
        if hp.predict_tags not in PREDICT_TAGS:
            raise ValueError(f"model.predict_tags must be one of {PREDICT_TAGS}, got {hp.predict_tags!r}")
        if not 0 <= hp.fixed_tag < hp.num_fork_tokens:
            raise ValueError(f"model.fixed_tag must be in [0, {hp.num_fork_tokens - 1}], got {hp.fixed_tag}")
        for key in ("n_per_tag", "max_new_tokens", "generation_batch_size"):
            if hp[key] < 1:
                raise ValueError(f"model.{key} must be >= 1, got {hp[key]}")
        if hp.learning_rate <= 0:
            raise ValueError(f"model.learning_rate must be > 0, got {hp.learning_rate}")
        if hp.reward_timeout_s is not None and hp.reward_timeout_s <= 0:
            raise ValueError(f"model.reward_timeout_s must be > 0 seconds or null, got {hp.reward_timeout_s}")
        if hp.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"model.on_nonfinite must be one of {ON_NONFINITE}, got {hp.on_nonfinite!r}")
        samples = hp.num_fork_tokens * hp.n_per_tag
        if hp.pass_k is not None and not 1 <= hp.pass_k <= samples:
            raise ValueError(f"model.pass_k must be in [1, num_fork_tokens * n_per_tag = {samples}], got {hp.pass_k}")

    # ---- input validation (DESIGN.md §3: before any training step) -------------------------
    GOLD_ANSWER_SPLITS: tuple[str, ...] = ("val", "test")  # splits whose answers the verifier scores

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        validation = getattr(datamodule, "validation", None)
        if not hasattr(datamodule, "datasets"):  # not a ForkDataModule: nothing forklight can check
            return
        self.check_gold_answers(datamodule)
        if validation and self.trainer.logger is not None and self.trainer.is_global_zero:
            counts = {f"data/{split}/questions": report.questions for split, report in validation.items()}
            counts |= {f"data/{split}/skipped/{reason}": n for split, report in validation.items()
                       for reason, n in report.skipped.items()}
            self.trainer.logger.log_metrics(counts, step=0)

    def check_gold_answers(self, datamodule) -> None:
        """Every gold answer of the splits the verifier scores must be readable by it.

        Missing or unparseable answers raise, naming the question and its file:line, or under
        ``data.on_bad_record: skip`` are dropped and counted (``missing_answer``, ``unparseable_answer``).
        A user verifier without an ``extract_answer`` method is not checked.
        """
        parse = gold_answer_parser(self.verifier, self.extract_answer)
        if parse is None:
            return
        skip = datamodule.hparams.get("on_bad_record", "error") == "skip"
        for split in self.GOLD_ANSWER_SPLITS:
            dataset = datamodule.datasets.get(split)
            if dataset is None:
                continue
            kept, bad = [], Counter()
            for question in dataset.questions:
                reason = "missing_answer" if question.answer is None else (
                    "unparseable_answer" if parse(question.answer) is None else None)
                if reason is None:
                    kept.append(question)
                    continue
                if not skip:
                    what = ("has no gold answer" if question.answer is None
                            else f"has a gold answer {question.answer!r} that model.verifier cannot parse")
                    raise RecordError(f"{question.location or split}: question '{question.id}' ({split} split) {what}; "
                                      "fix the answer, choose a model.verifier that reads it, or set "
                                      "data.on_bad_record=skip", reason)
                bad[reason] += 1
            if bad:
                dataset.questions[:] = kept
                if split in getattr(datamodule, "validation", {}):
                    datamodule.validation[split].skipped.update(bad)
                    datamodule.validation[split].questions = len(kept)
                rank_zero_info(f"forklight data validation: {split}: skipped "
                               + ", ".join(f"{n} {reason}" for reason, n in sorted(bad.items())))

    # ---- faults in training ----------------------------------------------------------------
    def score(self, batch: TraceSetBatch, completions: list[str], sizes: list[int]) -> tuple[list, str]:
        """Verifier scores of ``completions``, ``sizes[q]`` of them per question q of ``batch`` in order
        (``model.reward_timeout_s``; a failure scores 0), and the outcome counted."""
        answers = [answer for answer, size in zip(batch.answers, sizes, strict=True) for _ in range(size)]
        keys = batch.columns[0] if batch.columns else {}
        columns = {key: [row.get(key) for row, size in zip(batch.columns, sizes) for _ in range(size)] for key in keys}
        scores, outcome = run_verifier(self.verifier, completions, answers, columns, self.hparams.reward_timeout_s)
        if outcome != "ok":
            key = "reward_errors" if outcome == "error" else "reward_timeouts"
            self.fault_counts[key] += len(completions)
        return scores, outcome

    def skip_nonfinite(self, loss: torch.Tensor, batch: TraceSetBatch, batch_idx: int) -> bool:
        """True when this step must be skipped: the loss is NaN/inf on some rank and ``model.on_nonfinite``
        is ``skip``; under ``error`` it raises, naming the step, the batch and its questions."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        if self._trainer is not None:  # every rank decides the same, so no rank waits in a collective
            bad = self.trainer.strategy.reduce_boolean_decision(bad, all=False)
        if not bad:
            return False
        if self.hparams.on_nonfinite == "error":
            raise FloatingPointError(
                f"non-finite training loss ({loss.detach().float().cpu().tolist()}) at step {self.global_step}, "
                f"batch {batch_idx} (question ids {list(batch.ids)}); lower model.learning_rate, check these "
                "questions, or set model.on_nonfinite=skip to skip such steps"
            )
        self.fault_counts["nonfinite_skipped"] += 1
        rank_zero_info(f"forklight: non-finite loss at step {self.global_step}, batch {batch_idx} (questions "
                       f"{list(batch.ids)}): update skipped ({self.fault_counts['nonfinite_skipped']} so far)")
        return True

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Reseed the global RNGs from (seed, step, rank): randomness forklight does not seed itself
        (dropout, a user's code) then repeats exactly in a run resumed from a checkpoint."""
        seed = (self.hparams.seed * 1_000_003 + self.global_step * 7919 + self.global_rank * 104_729 + 17) % 2**32
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    # ---- model ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the model once (Lightning calls this before training, loading and sharding)."""
        if self.model is not None:
            return
        hp = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            model = build_causal_lm(
                hp.name_or_path, hp.model_config, self.tokenizer, hp.dtype, hp.trust_remote_code, hp.get("gguf_file"))
        if self._new_fork_token_ids:
            init_fork_embeddings(model, self._new_fork_token_ids, self._vocab_before_fork_tokens, hp.seed, hp.fork_init_noise)
        model.config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.eos_token_id = self.stop_ids
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model = model.train()  # from_pretrained returns eval mode; Lightning switches modes itself
        if self._init_source is not None and self._init_source["kind"] == "checkpoint":
            self._load_start_checkpoint(self._init_source["path"])
        if self.lora is not None:
            self.model = apply_lora(self.model, self.lora, self.fork_token_ids)
        self.on_model_built()
        if self._trainer is not None and self.trainer.state.fn == "fit":
            keep_master_weights(self.model, hp.dtype, str(self.trainer.precision), hp.learning_rate,
                                sharded=self.device_mesh is not None)
        self._matrix_names = {name for name, p in self.named_parameters() if p.ndim >= 2}
        self.model = self.shard(self.model)

    def on_model_built(self) -> None:
        """Called by ``configure_model`` once the model is built and its starting weights loaded,
        before it is sharded: where a method changes the model (freezing, a frozen copy)."""

    def shard(self, model):
        """FSDP2 (``ModelParallelStrategy`` gives the module a device mesh): ``fully_shard`` each
        transformer block, then the whole model. Without a mesh (one device, DDP, FSDP) unchanged."""
        mesh = self.device_mesh
        if mesh is None:
            return model
        if self.lora is not None:
            raise ValueError("model.lora is not supported with FSDP2 (ModelParallelStrategy) yet; use DDP "
                             "(configs/strategies/ddp.yaml) or full fine-tuning without model.lora")
        if mesh["tensor_parallel"].size() > 1:
            raise ValueError(
                f"ModelParallelStrategy has tensor_parallel_size={mesh['tensor_parallel'].size()}, but forklight "
                "shards with FSDP2 only: set trainer.strategy.init_args.tensor_parallel_size=1 and "
                "data_parallel_size = trainer.num_nodes * trainer.devices (configs/strategies/fsdp2.yaml)"
            )
        return fully_shard_model(model, mesh["data_parallel"], self.hparams.shard_block_classes)

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the data-parallel ranks (a copy; ``value`` itself on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value.detach().clone(), reduce_op="sum")

    def _load_start_checkpoint(self, path: str) -> None:
        """Model weights and tag coverage of a forklight ``.ckpt`` (a resume then loads over them)."""
        state = torch.load(path, weights_only=True, map_location="cpu", mmap=True)["state_dict"]
        wanted = {key: value for key, value in state.items() if key.startswith("model.") or key == "tag_coverage"}
        missing = [key for key in self.state_dict() if key.startswith("model.") and key not in wanted]
        if any("lora_" in key for key in wanted):
            raise ValueError(f"model.init_from={path} is a checkpoint of a LoRA run; start from its export "
                             "(merged weights: runs/<name>/version_<k>/export) instead")
        if missing:
            raise ValueError(f"model.init_from={path} lacks {len(missing)} model weights (e.g. {missing[:3]}); "
                             "is it a checkpoint of this model?")
        self.load_state_dict(wanted, strict=False)

    @torch.no_grad()
    def fork_policy_of(self, prompt_ids) -> torch.Tensor:
        """The model's tag distribution log pi(i | x) for each prompt, [B, N] (no gradient)."""
        was_training = self.model.training
        self.model.eval()
        try:
            return fork_log_policy(self.model, prompt_ids, self.fork_token_ids, self.tokenizer.pad_token_id)
        finally:
            self.model.train(was_training)

    @property
    def default_tag(self) -> int:
        """Index of the tag matched to the most traces in training ("coverage"); 0 before training."""
        return int(torch.argmax(self.tag_coverage).item()) if self.tag_coverage.sum() > 0 else 0

    def weight_decay(self) -> float:
        """AdamW weight decay of the matrices (``model.weight_decay``; a method may turn it off)."""
        return self.hparams.weight_decay

    def configure_optimizers(self):
        hp = self.hparams
        # Matrices decay. FSDP flattens parameters into 1-D shards, so they are told by name (without
        # its wrapper prefixes) from the shapes configure_model saw.
        matrices = getattr(self, "_matrix_names", None)
        parameters = [(name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", ""), p)
                      for name, p in self.named_parameters() if p.requires_grad]
        # A LoRA run's fork-token rows are deltas on the pretrained rows: they do not decay.
        decays = {name: (name in matrices if matrices is not None else p.ndim >= 2) and "trainable_tokens_delta" not in name
                  for name, p in parameters}
        decay = [p for name, p in parameters if decays[name]]
        no_decay = [p for name, p in parameters if not decays[name]]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": self.weight_decay()}, {"params": no_decay, "weight_decay": 0.0}],
            lr=hp.learning_rate,
        )
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))

        def schedule(step: int) -> float:  # linear warm-up, then cosine to min_lr_ratio
            if step < hp.warmup_steps:
                return (step + 1) / hp.warmup_steps
            progress = min(1.0, (step - hp.warmup_steps) / max(1, total_steps - hp.warmup_steps))
            return hp.min_lr_ratio + (1 - hp.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["forklight"] = {
            "fork_tokens": self.fork_tokens,
            "fork_token_ids": self.fork_token_ids,
            "default_tag": self.default_tag,
            "tokenizer_json": self.tokenizer.backend_tokenizer.to_str() if self.tokenizer.is_fast else None,
            "chat_template": getattr(self.tokenizer, "chat_template", None),
        }
        checkpoint["forklight_faults"] = dict(self.fault_counts)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.fault_counts = Counter(checkpoint.get("forklight_faults", {}))

    # ---- evaluation (DESIGN.md §2) ---------------------------------------------------------
    def _sampling_seed(self, batch_idx: int) -> int:
        """Reproducible from the seed; differs per step, batch and rank."""
        return (self.hparams.seed * 1_000_003 + self.global_step * 7919 + batch_idx * 131 + self.global_rank) % 2**63

    def sample_completions(self, batch: TraceSetBatch, tags: list[list[int]], batch_idx: int = 0,
                           policy: list[list[float]] | None = None):
        """Generate one completion per entry of ``tags[q]`` (tag indices) after question q's prompt, and
        score them: ``(completions, scores, policy)``; ``policy`` [B][N] is the model's tag distribution
        (computed here unless the caller already has it)."""
        hp = self.hparams
        prefixes = [prompt.tolist() + [self.fork_token_ids[tag]]
                    for prompt, question_tags in zip(batch.prompt_ids, tags) for tag in question_tags]
        device = self.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(self._sampling_seed(batch_idx))
            completions = generate_completions(
                self.model, self.tokenizer, prefixes, self.stop_ids, hp.max_new_tokens,
                hp.eval_temperature, hp.eval_top_p, hp.generation_batch_size,
                progress=getattr(self, "generation_progress", None),  # set by callbacks.GenerationProgress
                suppress_ids=self.fork_token_ids,
            )
            if policy is None:
                policy = self.fork_policy_of(batch.prompt_ids).exp().tolist()  # [B][N]
        scores, outcome = self.score(batch, [c.text for c in completions], [len(t) for t in tags])
        if outcome != "ok":
            self._evaluation_faults["reward_errors" if outcome == "error" else "reward_timeouts"] += len(completions)
        return completions, scores, policy

    def evaluate_batch(self, batch: TraceSetBatch, batch_idx: int = 0) -> list[QuestionEvaluation]:
        """Sample ``n_per_tag`` completions per (question, tag) and score them."""
        num_tags, n = len(self.fork_token_ids), self.hparams.n_per_tag
        every_tag = [tag for tag in range(num_tags) for _ in range(n)]  # ordered [tag, sample]
        completions, scores, policy = self.sample_completions(batch, [every_tag] * len(batch), batch_idx)
        texts = [completion.text for completion in completions]
        results = []
        per_question = num_tags * n
        for q, question_id in enumerate(batch.ids):
            block = slice(q * per_question, (q + 1) * per_question)

            def grid(values):  # flat [N * n] -> [N][n]
                values = list(values)
                return [values[t * n : (t + 1) * n] for t in range(num_tags)]

            results.append(
                QuestionEvaluation(
                    id=question_id,
                    answer=batch.answers[q],
                    scores=grid(scores[block]),
                    answers=grid(self.extract_answer(text) for text in texts[block]),
                    lengths=grid(completion.length for completion in completions[block]),
                    texts=grid(texts[block]),
                    strategies=grid(self.classify_strategy(text) for text in texts[block])
                    if self.classify_strategy else [],
                    policy=policy[q],
                )
            )
        return results

    def validation_step(self, batch: TraceSetBatch, batch_idx: int) -> None:
        self._evaluations.extend(self.evaluate_batch(batch, batch_idx))

    def test_step(self, batch: TraceSetBatch, batch_idx: int) -> None:
        self._evaluations.extend(self.evaluate_batch(batch, batch_idx))

    def predict_step(self, batch: TraceSetBatch, batch_idx: int) -> list[dict]:
        """One row per completion: its question, tag, text, extracted answer and verifier score.

        ``predict_tags: all``: ``n_per_tag`` completions after every tag; ``policy``: ``n_per_tag``
        completions per question, each after a tag chosen by ``fork_policy`` (``learned`` samples
        the model's tag distribution).
        """
        hp, num_tags = self.hparams, len(self.fork_token_ids)
        policy = self.fork_policy_of(batch.prompt_ids).exp().tolist()  # [B][N]
        if hp.predict_tags == "all":
            tags = [[tag for tag in range(num_tags) for _ in range(hp.n_per_tag)] for _ in range(len(batch))]
        else:
            rng = np.random.default_rng(self._sampling_seed(batch_idx))
            tags = choose_tags(np.array(policy), hp.fork_policy, hp.n_per_tag, rng,
                               {"coverage": self.default_tag, "fixed": hp.fixed_tag}).tolist()  # [B][n]
        completions, scores, _ = self.sample_completions(batch, tags, batch_idx, policy)
        rows, position = [], 0
        for q, question_id in enumerate(batch.ids):
            for sample, tag in enumerate(tags[q]):
                completion, score = completions[position], scores[position]
                position += 1
                rows.append({
                    "id": question_id, "tag": self.fork_tokens[tag], "tag_index": tag,
                    "tag_prob": policy[q][tag], "chosen_by": "all" if hp.predict_tags == "all" else hp.fork_policy,
                    "sample": sample if hp.predict_tags == "policy" else sample % hp.n_per_tag,
                    "completion": completion.text, "answer": self.extract_answer(completion.text),
                    "gold": batch.answers[q], "score": score, "length": completion.length,
                    "default_tag": tag == self.default_tag,
                })
        return rows

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation("val")

    def on_test_epoch_end(self) -> None:
        self._log_evaluation("test")

    def _gather_evaluations(self) -> list[QuestionEvaluation]:
        local, self._evaluations = self._evaluations, []
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return local
        gathered: list[list[QuestionEvaluation]] = [None] * dist.get_world_size()  # type: ignore[list-item]
        dist.all_gather_object(gathered, local)
        seen, merged = set(), []
        for evaluation in (e for rank_list in gathered for e in rank_list):  # distributed samplers may pad
            if evaluation.id not in seen:
                seen.add(evaluation.id)
                merged.append(evaluation)
        return merged

    def evaluation_metrics(self, evaluations: list[QuestionEvaluation]) -> dict[str, float]:
        """Per-tag and overall metrics of DESIGN.md §2 (keys without the ``val/`` prefix)."""
        hp = self.hparams
        return evaluation_metrics(
            evaluations,
            num_tags=len(self.fork_token_ids),
            n_per_tag=hp.n_per_tag,
            k=hp.pass_k or len(self.fork_token_ids) * hp.n_per_tag,
            same_answer=getattr(self.verifier, "same_answer", None),  # votes group equal answers
            policy_tags={"coverage": self.default_tag, "fixed": hp.fixed_tag},
            fork_policy=hp.fork_policy,
            purity_tags=self.used_tags() if self.classify_strategy is not None else None,
        )

    def used_tags(self) -> list[int]:
        """Tags with at least half a uniform share of the training traces (all tags before training)."""
        return used_tags(self.tag_coverage.tolist())

    def _log_evaluation(self, stage: str) -> None:
        faults, self._evaluation_faults = self._evaluation_faults, Counter()
        for key in ("reward_errors", "reward_timeouts"):  # samples scored 0 because the verifier failed
            self.log(f"{stage}/{key}", float(faults[key]), sync_dist=True, reduce_fx="sum")
        evaluations = self._gather_evaluations()
        self.last_evaluation = evaluations
        if not evaluations:
            return
        for key, value in self.evaluation_metrics(evaluations).items():
            # Every rank holds the same gathered evaluations, hence the same value: max keeps it exactly.
            self.log(f"{stage}/{key}", value, sync_dist=True, reduce_fx="max")

"""``ForkModule``: what every forklight method shares.

Model and tokenizer setup (any Hugging Face causal LM, or a tiny Llama-style model built from a
config; ``init_from`` a forklight run: :mod:`forklight.starting`), the forking tokens, the
optimiser and schedule, checkpoint hooks, training faults (verifier failures, non-finite losses),
and the generation engine (``model.engine``, :mod:`forklight.rollout`) through which every
completion is sampled. Validation, test and predict run the evaluation loop of DESIGN.md §2
(:class:`~forklight.modules.evaluating.Evaluator`). SSFT subclasses it with its ``training_step``;
GFPO and GRPO subclass :class:`~forklight.modules.rl.RLModule`, which holds the RL training step,
and add how they roll out and what they optimise. Under FSDP2 (``configs/strategies/fsdp2.yaml``)
``configure_model`` builds the model on the meta device, shards its transformer blocks and fills each
rank's shards (DESIGN.md §7-8, ``forklight/sharding.py``, ``forklight/sharded_weights.py``).
"""

from __future__ import annotations

import random
from collections import Counter
from functools import partial

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from forklight.data.datamodule import ForkDataModule
from forklight.data.rendering import TraceSetBatch, end_of_turn_id, load_tokenizer
from forklight.evaluation import QuestionEvaluation
from forklight.errors import ConfigError
from forklight.forking import add_fork_tokens, fork_log_policy, fork_token_names, init_fork_embeddings
from forklight.head import HEAD_MODES, HeadPath, check_chunk_tokens, labels_nll, resolve_head
from forklight.models import (DTYPES, apply_lora, build_causal_lm, build_causal_lm_skeleton, check_gguf,
                              keep_master_weights, lora_settings, model_source, parameters_on_meta, probe_packing)
from forklight.modules.evaluating import Evaluator, check_evaluation_settings
from forklight.rewards import gold_answer_parser, resolve_callable, resolve_verifier, score_batch
from forklight.rollout import GenerationEngine, ModuleEngine, Progress, SamplingSettings, callback_progress, engine_class
from forklight.optimisation import parameter_groups, warmup_cosine
from forklight.sharded_weights import (ForkRows, ForkRowSpec, SafetensorsReader, StateDictReader, WeightReader,
                                       fill_from_rank0, load_sharded_checkpoint, materialize_shards, weights_directory)
from forklight.sharding import shard_on_mesh, shard_settings
from forklight.starting import resolve_init_from, tokenizer_name
from forklight.vllm_engine import vllm_settings
from forklight.vllm_server import vllm_server_settings

ON_NONFINITE = ("error", "skip")


class ForkModule(L.LightningModule):
    # Whether training optimises the tag distribution pi(i | x) itself (GFPO): monitors show its views.
    learns_tag_policy: bool = False
    updates_change_completions: bool = True  # can an optimiser step change a completion after a tag (sync vLLM)?

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
        num_fork_tokens: int | None = 6,
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
        engine: str = "hf",
        vllm: dict | None = None,
        vllm_server: dict | None = None,
        loss_head: str = "auto",
        loss_chunk_tokens: int = 512,
        attn_implementation: str | None = None,
        pack_rows: bool = True,
        pack_length: int | None = None,
        pass_k: int | list[int] | None = None,
        samples_per_question: int | None = None,
        eval_tag_sampling: str = "even",
        eval_output: str | None = None,
        eval_resume: bool = True,
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
            num_fork_tokens: N, the number of forking tokens ``<think1>..<thinkN>``; null: as many as ``init_from`` has
                (evaluation configs that take any export).
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
            engine: generation engine of every completion (evaluation, predict, RL rollouts): ``hf``
                (transformers' ``generate`` on the training model), ``vllm`` (optional; in this process, synced
                with training) or ``vllm-server`` (running ``vllm serve`` endpoints, fixed weights); docs/vllm.md.
            vllm: options of ``engine: vllm`` (:class:`~forklight.vllm_engine.VLLMSettings`: gpu_memory_utilization, ...).
            vllm_server: options of ``engine: vllm-server`` (:class:`~forklight.vllm_server.VLLMServerSettings`:
                endpoints, timeout_s, ...).
            loss_head: how training losses reach the LM head (:mod:`forklight.head`): ``chunked`` (from the
                hidden states of the scored positions, ``loss_chunk_tokens`` at a time: never ``[rows, T, V]``
                logits; the SSFT/SFT sum fused in PyTorch for a plain linear head, otherwise each chunk recomputed
                in backward), ``liger`` (Liger's fused kernel for the SSFT/SFT loss; CUDA), ``auto`` (liger where
                it runs, else chunked) or ``full`` (the model's full logits).
            loss_chunk_tokens: scored positions whose logits are alive at once under ``chunked``.
            attn_implementation: transformers' attention kernel (``sdpa``, ``eager``, ``flash_attention_2``,
                ``flex_attention``; unset: transformers' default). Packed rows need one that honours
                ``position_ids`` restarts (all of these do).
            pack_rows: the sequences of the SSFT/SFT loss (``[prompt | tag | trace]``) and of GRPO's updates
                (``[prompt | tag | completion]``) are packed end to end into rows with restarting ``position_ids``
                instead of each being padded to the longest (same loss; a model whose attention crosses packed
                sequences says so once and is padded).
            pack_length: tokens per packed row (default: the longest sequence's; with ``flash_attention_2``, whose
                varlen kernels need no mask, a large value packs a micro-batch into one row). With ``sdpa`` or
                ``eager`` a packed row's attention is dense over its length, so keep it near the longest sequence.
            pass_k: k of ``pass@{k}`` and ``cons@{k}``, or a list of them (default: all samples of a question);
                ``pass@k`` is the largest.
            samples_per_question: evaluation samples per question S (default: ``num_fork_tokens * n_per_tag``).
            eval_tag_sampling: the tags of those samples (:func:`~forklight.evaluation.sample_tags`): ``even`` (S split over
                the N tags, the remainder to the lowest: the paper's sot-N), ``default`` (all after the default tag)
                or ``policy`` (each drawn from the model's tag distribution, seeded per question).
            eval_output: directory where ``forklight test`` writes ``results.json``, ``results.md`` and the
                per-sample ``samples.jsonl`` (default: ``<log dir>/evaluation``); give a fixed one to resume.
            eval_resume: a ``forklight test`` whose ``eval_output`` holds samples of the same protocol and model
                re-uses its finished questions (a killed evaluation loses nothing); another protocol is an error.
            fork_policy: single-shot tag choice for ``val/pass@1``: ``learned`` (sample from the model's tag
                distribution), ``argmax`` (its most likely tag), ``coverage`` (default tag), ``fixed``, ``uniform``.
            fixed_tag: tag index (0-based) used by ``fork_policy: fixed``.
            predict_tags: ``forklight predict`` writes ``n_per_tag`` completions after every tag (``all``), or
                ``n_per_tag`` per question after tags chosen by ``fork_policy`` (``policy``).
            verifier: ``exact_integer``, ``math`` (math-verify), ``choice`` (option letters), ``code`` (programs run
                against the record's tests in a sandbox), ``think_format``, ``boxed_format``, ``code_block_format``,
                ``overlong_penalty``, ``package.module:function``, ``{class_path, init_args, weight}``, or a list of
                these (weighted sum of scores); docs/verifiers.md.
            reward_timeout_s: seconds a verifier call may take (a user verifier runs in a worker thread);
                a call that raises or runs past it scores 0 for its samples and is counted
                (``rollout/reward_errors``, ``rollout/reward_timeouts``, ``val/...``). null = no limit.
            strategy_classifier: ``package.module:function`` naming the strategy of a completion (enables purity).
            on_nonfinite: a NaN/inf training loss ``error`` (stop, naming the step and the questions) or
                ``skip`` (no update for that step, counted in ``train/nonfinite_skipped``).
            seed: seed of the fork-token initialisation, fresh weights, matching and sampling.
        """
        super().__init__()
        self.starting_point = resolve_init_from(init_from) if init_from else None  # a forklight run this one starts from
        self.restores_from: str | None = None  # a checkpoint Lightning restores after configure_model (the CLI sets it)
        self._hparam_overrides = {"tokenizer": tokenizer_name(tokenizer, name_or_path, gguf_file=gguf_file)}
        if self.starting_point is not None:  # it fixes the model
            self._hparam_overrides = self.starting_point.hyperparameters(num_fork_tokens)
        elif num_fork_tokens is None:
            raise ValueError("model.num_fork_tokens is null, which means 'as many as model.init_from has', but "
                             "init_from is unset; give a number (or init_from)")
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
        if self.starting_point is not None and self.starting_point.tag_coverage:  # an export's default tag carries over
            self.tag_coverage.copy_(torch.tensor(self.starting_point.tag_coverage, dtype=self.tag_coverage.dtype))
        self.model = None
        self._head_path: HeadPath | None = None  # resolved on first use (head_path)
        self._packing: bool | None = None  # probed on first use (packing)
        self._engine = ModuleEngine(hp.engine, hp)  # built on first use (generation_engine)
        self.fault_counts: Counter[str] = Counter()  # reward_errors, reward_timeouts, nonfinite_skipped (saved)
        self.evaluator = Evaluator(self)  # validation, test and predict (DESIGN.md §2)

    def _check_ranges(self) -> None:
        hp = self.hparams
        if hp.num_fork_tokens < 1:
            raise ValueError(f"model.num_fork_tokens must be >= 1, got {hp.num_fork_tokens}")
        if hp.name_or_path is None and hp.model_config is None:
            raise ValueError("set model.name_or_path (HF model id or dir) or model.model_config (fresh model)")
        if hp.dtype is not None and hp.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {sorted(DTYPES)}, got {hp.dtype!r}")
        engine_class(hp.engine)  # a known, installed engine
        vllm_settings(hp.get("vllm"))  # valid model.vllm options, whatever the engine
        vllm_server_settings(hp.get("vllm_server"))
        if hp.get("loss_head", "auto") not in HEAD_MODES:
            raise ConfigError(f"model.init_args.loss_head must be one of {HEAD_MODES}, got {hp.loss_head!r}")
        check_chunk_tokens(hp.get("loss_chunk_tokens", 512))
        check_evaluation_settings(hp)
        if hp.learning_rate <= 0:
            raise ValueError(f"model.learning_rate must be > 0, got {hp.learning_rate}")
        if hp.reward_timeout_s is not None and hp.reward_timeout_s <= 0:
            raise ValueError(f"model.reward_timeout_s must be > 0 seconds or null, got {hp.reward_timeout_s}")
        if hp.on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"model.on_nonfinite must be one of {ON_NONFINITE}, got {hp.on_nonfinite!r}")
        if hp.pack_length is not None and hp.pack_length < 1:
            raise ValueError(f"model.pack_length must be >= 1 or null, got {hp.pack_length}")

    # ---- input validation (DESIGN.md §3: before any training step) -------------------------
    GOLD_ANSWER_SPLITS: tuple[str, ...] = ("val", "test")  # splits whose answers the verifier scores

    def setup(self, stage: str) -> None:
        """Hand the verifier's gold-answer parser to a :class:`ForkDataModule`, which checks (or skips and
        counts) the answers of ``GOLD_ANSWER_SPLITS``, then log its validation counts (``data/...``)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if not isinstance(datamodule, ForkDataModule):  # another DataModule: nothing forklight can check
            return
        datamodule.check_gold_answers(gold_answer_parser(self.verifier, self.extract_answer), self.GOLD_ANSWER_SPLITS)
        counts = datamodule.validation_counts()
        if counts and self.trainer.logger is not None and self.trainer.is_global_zero:
            self.trainer.logger.log_metrics(counts, step=0)

    # ---- faults in training ----------------------------------------------------------------
    def score(self, batch: TraceSetBatch, completions: list[str], sizes: list[int]) -> tuple[list, str]:
        """Verifier scores of ``completions``, ``sizes[q]`` of them per question q of ``batch`` in order
        (``model.reward_timeout_s``; a failure scores 0), and the outcome counted."""
        scores, outcome = score_batch(self.verifier, batch.answers, batch.columns, completions, sizes,
                                      self.hparams.reward_timeout_s)
        if outcome != "ok":
            self.fault_counts["reward_errors" if outcome == "error" else "reward_timeouts"] += len(completions)
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

    def on_fit_start(self) -> None:
        """An engine that cannot follow the weights (``vllm-server``) is refused now when the steps change completions."""
        self._engine.check_fit(self.updates_change_completions)

    def on_train_batch_start(self, batch, batch_idx: int) -> None:
        """Reseed the global RNGs from (seed, step, rank): randomness forklight does not seed itself
        (dropout, a user's code) then repeats exactly in a run resumed from a checkpoint."""
        seed = (self.hparams.seed * 1_000_003 + self.global_step * 7919 + self.global_rank * 104_729 + 17) % 2**32
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    # ---- model ---------------------------------------------------------------------------
    def configure_model(self) -> None:
        """Build the model once (Lightning calls this before training, loading and sharding).

        Under FSDP2 with ``meta_init`` (the default, :class:`~forklight.sharding.FSDP2Strategy`) the model is built
        on the meta device, sharded, and then each rank's shards are filled (:meth:`fill_shards`): no rank holds
        the whole model. Otherwise it is built whole, its starting weights loaded, then sharded (if at all)."""
        if self.model is not None:
            return
        hp = self.hparams
        settings = shard_settings(self.trainer.strategy) if self.device_mesh is not None else None
        gguf = model_source(hp.name_or_path, hp.get("gguf_file"))[1] is not None
        # GGUF: dequantised whole; LoRA: refused under FSDP2 when sharding, with its own message
        self._fills_shards = settings is not None and settings.meta_init and not gguf and self.lora is None
        model = self.build_skeleton() if self._fills_shards else self.build_whole_model()
        model.config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.pad_token_id = self.tokenizer.pad_token_id
        model.generation_config.eos_token_id = self.stop_ids
        if hp.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.config.use_cache = False
        self.model = model.train()  # from_pretrained returns eval mode; Lightning switches modes itself
        if self.starting_point is not None and not self._fills_shards:
            self.starting_point.load_weights(self)  # a checkpoint's weights (an export's were built above)
        if self.lora is not None:
            self.model = apply_lora(self.model, self.lora, self.fork_token_ids)
        self.on_model_built()
        if self._trainer is not None and self.trainer.state.fn == "fit":
            keep_master_weights(self.model, hp.dtype, str(self.trainer.precision), hp.learning_rate,
                                sharded=self.device_mesh is not None,
                                sharded_mixed_precision=getattr(self.trainer.strategy, "master_dtype", None) is not None)
        self._matrix_names = {name for name, p in self.named_parameters() if p.ndim >= 2}
        self.model = self.fill_shards(self.shard(self.model))

    def build_whole_model(self):
        """The model with its starting weights (pretrained or fresh, seeded) and new fork-token rows, built whole."""
        hp = self.hparams
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hp.seed)
            model = build_causal_lm(
                hp.name_or_path, hp.model_config, self.tokenizer, hp.dtype, hp.trust_remote_code, hp.get("gguf_file"),
                hp.get("attn_implementation"))
        if self._new_fork_token_ids:
            init_fork_embeddings(model, self._new_fork_token_ids, self._vocab_before_fork_tokens, hp.seed, hp.fork_init_noise)
        return model

    def build_skeleton(self):
        """:meth:`build_whole_model`'s model with every parameter on the meta device (no weights yet; real buffers),
        resized for the new fork tokens as that one is."""
        hp = self.hparams
        model = build_causal_lm_skeleton(hp.name_or_path, hp.model_config, self.tokenizer, hp.dtype, hp.trust_remote_code,
                                         hp.get("attn_implementation"))
        self._load_dtype = next(model.parameters()).dtype  # the dtype a whole build loads the weights in
        needed = max(self.fork_token_ids) + 1
        if self._new_fork_token_ids and model.get_input_embeddings().weight.shape[0] < needed:
            with parameters_on_meta():
                model.resize_token_embeddings(needed, mean_resizing=False)
        return model

    def on_model_built(self) -> None:
        """Called by ``configure_model`` once the model is built and its starting weights loaded (under FSDP2's
        ``meta_init``: the skeleton, weights to come), before it is sharded: where a method changes the model
        (freezing, a frozen copy: shard it with :meth:`shard`, then :meth:`fill_shards`)."""

    def shard(self, model):
        """FSDP2 (``ModelParallelStrategy`` gives the module a device mesh): ``fully_shard`` each
        transformer block, then the whole model, with the strategy's options (mixed precision, offload,
        resharding). Without a mesh (one device, DDP, FSDP) unchanged."""
        if self.device_mesh is None:
            return model
        options = shard_settings(self.trainer.strategy).fully_shard_options
        return shard_on_mesh(model, self.device_mesh, self.hparams.shard_block_classes, lora=self.lora is not None,
                             options=options)

    def fill_shards(self, model, frozen_copy: bool = False):
        """Under FSDP2's ``meta_init``: allocate the sharded skeleton ``model``'s shards and fill them with the starting
        weights (:mod:`forklight.sharded_weights`): a sharded checkpoint, each rank its own slices; anything else read
        by rank 0 a group of tensors at a time and broadcast. Otherwise ``model`` already has them: unchanged.
        ``frozen_copy``: a copy of the starting model (GRPO's reference), which takes the weights only, not the
        checkpoint's tag coverage."""
        if not getattr(self, "_fills_shards", False):
            return model
        settings = shard_settings(self.trainer.strategy)
        offloaded = "offload_policy" in settings.fully_shard_options
        materialize_shards(model, torch.device("cpu") if offloaded else self.trainer.strategy.root_device)
        if not frozen_copy and self.restores_checkpoint():
            rank_zero_info(f"forklight: the shards are filled by the checkpoint Lightning restores "
                           f"({self.restores_from or self.trainer.ckpt_path}), not read from the starting weights")
            return model
        start = self.starting_point
        if start is not None and start.kind == "sharded":
            extra = {} if frozen_copy else {"tag_coverage": self.tag_coverage}
            load_sharded_checkpoint(model, start.path, self._load_dtype, extra=extra)
            return model
        if start is not None and start.kind == "checkpoint" and not frozen_copy:
            start.load_tag_coverage(self)
        what = f"model.init_from={start.path}" if start is not None else f"model.name_or_path={self.hparams.name_or_path}"
        fill_from_rank0(model, lambda: self.starting_weights_reader(model), what)
        return model

    def restores_checkpoint(self) -> bool:
        """Whether Lightning restores the weights from a checkpoint right after ``configure_model`` (``--ckpt_path``,
        which the CLI passes on as ``restores_from``; a library user's ``trainer.ckpt_path = ...`` before ``fit``):
        then reading the starting weights into the shards would be minutes of work thrown away at 32B."""
        return bool(self.restores_from or (self._trainer is not None and self.trainer.ckpt_path))

    def starting_weights_reader(self, model) -> WeightReader:
        """Rank 0's reader of the starting weights (:meth:`fill_shards`): a ``.ckpt``'s, the safetensors of
        ``name_or_path`` (a forklight export, a local dir or a hub id) with new fork-token rows added as a whole build
        adds them, or, when those cannot be streamed (a fresh model, no safetensors), a model built whole here."""
        hp, start = self.hparams, self.starting_point
        if start is not None and start.kind == "checkpoint":
            return StateDictReader(start.checkpoint_state(), self._load_dtype, prefix="model.")
        if hp.name_or_path is not None:
            try:
                reader = SafetensorsReader(weights_directory(hp.name_or_path), self._load_dtype)
                if self._new_fork_token_ids:
                    spec = ForkRowSpec.of(model, self._new_fork_token_ids, self._vocab_before_fork_tokens, hp.seed,
                                          hp.fork_init_noise)
                    reader = ForkRows(reader, spec)
                return reader
            except (OSError, ValueError) as error:
                rank_zero_warn(f"forklight: model.name_or_path={hp.name_or_path}: cannot stream its weights into the "
                               f"shards ({error}); rank 0 builds the whole model and broadcasts it")
        return StateDictReader(self.build_whole_model().state_dict(), self._load_dtype)

    def sum_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` summed over the data-parallel ranks (a copy; ``value`` itself on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return value
        return self.trainer.strategy.reduce(value.detach().clone(), reduce_op="sum")

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
        groups = parameter_groups(self.named_parameters(), getattr(self, "_matrix_names", None), self.weight_decay())
        optimizer = torch.optim.AdamW(groups, lr=hp.learning_rate)
        optimizer.register_step_post_hook(lambda *_: self._engine.weights_changed(self.updates_change_completions))
        total_steps = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, partial(warmup_cosine, warmup_steps=hp.warmup_steps, total_steps=total_steps, min_lr_ratio=hp.min_lr_ratio))
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

    # ---- generation and evaluation (DESIGN.md §2) -------------------------------------------
    def _sampling_seed(self, batch_idx: int) -> int:
        """Reproducible from the seed; differs per step, batch and rank."""
        return (self.hparams.seed * 1_000_003 + self.global_step * 7919 + batch_idx * 131 + self.global_rank) % 2**63

    def sampling_settings(self, temperature: float, top_p: float, max_new_tokens: int, seed: int) -> SamplingSettings:
        """Sampling after a tag: ends at ``stop_ids``, never emits a fork token, ``generation_batch_size``
        sequences per call, seeded with ``seed``."""
        return SamplingSettings(temperature, top_p, max_new_tokens, stop_ids=self.stop_ids,
                                suppress_ids=self.fork_token_ids, seed=seed, batch_size=self.hparams.generation_batch_size)

    def head_path(self) -> HeadPath:
        """How this module's losses reach the LM head (``model.loss_head``), decided once on the built model; a
        model that cannot take the chunked path says why once and uses its full logits (:mod:`forklight.head`)."""
        if self._head_path is None:
            self._head_path = resolve_head(self.hparams.get("loss_head", "auto"), self.model)
            if self._head_path.reason:
                rank_zero_warn(f"model.loss_head={self.hparams.get('loss_head', 'auto')}: {self._head_path.reason}")
        return self._head_path

    def packing(self) -> bool:
        """Whether losses pack their sequences (``pack_rows``), probed once: a model whose attention crosses packed
        sequences (:func:`~forklight.models.probe_packing`) says why once and pads instead."""
        if self._packing is None:
            self._packing = bool(self.hparams.get("pack_rows", True))
            if self._packing:
                why = probe_packing(self.model)
                if why:
                    rank_zero_warn(f"model.pack_rows is on, but {type(self.model).__name__} cannot take packed rows: "
                                   f"{why}; rows are padded instead (same loss, more padding)")
                    self._packing = False
        return self._packing

    def supervised_nll(self, model, labels: torch.Tensor, temperature: float = 1.0, **inputs) -> torch.Tensor:
        """NLL [K] of every supervised token of ``labels`` [R, T] from one forward of ``model`` (row-major order),
        through :meth:`head_path` (:func:`~forklight.head.labels_nll`)."""
        return labels_nll(model, self.head_path(), labels, self.hparams.get("loss_chunk_tokens", 512), temperature,
                          **inputs)

    def generation_engine(self) -> GenerationEngine:
        """The engine of every completion (``model.engine``): built on first use, synced after steps (ModuleEngine)."""
        return self._engine.get(self.model, self.tokenizer)

    def close_generation_engine(self) -> None:
        """Shut the generation engine down now (``engine: vllm``: frees its device memory and lets another engine
        start in this process); the next generation builds it again."""
        self._engine.close()

    def generation_progress(self) -> Progress | None:
        """``progress(done, total)`` for the engine, reported to the trainer's callbacks (:func:`~forklight.rollout.callback_progress`)."""
        return callback_progress(self._trainer, self)

    @property
    def last_evaluation(self) -> list[QuestionEvaluation]:
        """The last validation's or test's evaluations, every rank's (read by callbacks: samples, views)."""
        return self.evaluator.last

    def validation_step(self, batch: TraceSetBatch, batch_idx: int) -> None:
        self.evaluator.collect(batch, batch_idx)

    def test_step(self, batch: TraceSetBatch, batch_idx: int) -> None:
        self.evaluator.collect(batch, batch_idx)

    def predict_step(self, batch: TraceSetBatch, batch_idx: int) -> list[dict]:
        """One row per completion (:meth:`Evaluator.predict_rows <forklight.modules.evaluating.Evaluator.predict_rows>`)."""
        return self.evaluator.predict_rows(batch, batch_idx)

    def on_validation_epoch_end(self) -> None:
        self.evaluator.log("val")

    def on_test_epoch_end(self) -> None:
        self.evaluator.log("test")

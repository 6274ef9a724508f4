"""A forklight GFPO (and GRPO) step against a TRL ``GRPOTrainer`` step (``python -m benchmarks.vs_trl --parts rl``).

The protocol is in :mod:`benchmarks.vs_trl`: the same starting export, the same toy questions in
the same order, ``G`` completions at temperature 1, the same reward, DAPO loss, no KL, one
iteration; each step's generation (rollouts + rewards + advantages) is timed on its own too.

``--engine vllm``: both sides generate with vLLM in this process, forklight with ``engine: vllm``
(:class:`~forklight.vllm_engine.VLLMEngine`), TRL with ``use_vllm=True, vllm_mode="colocate"``, on engines
with the same settings: ``--vllm-dtype`` (default bfloat16, what vLLM makes of an fp32 checkpoint when TRL
leaves it the choice), compiled unless ``--vllm-eager`` (TRL's default: it has no option for either, so
both are passed to its ``vllm.LLM`` here), at most ``B*G`` sequences at once (TRL's ``max_num_seqs``), on
CPU a 1 GiB KV cache (``VLLM_CPU_KVCACHE_SPACE=1``, forklight's CPU default; TRL's would be 0.9 of the
machine's memory), on GPU 0.3 of its memory each. Each run starts its own engine (in its first, untimed
step for forklight; before training for TRL), and the weights are synced before every step's generation.
On vLLM's CPU backend TRL's colocate sync fails as it is (:func:`cpu_sync_weights` says why), so there TRL
syncs through vLLM's ``reload_weights``, as forklight does.
"""

from __future__ import annotations

import contextlib
import functools
import os
import statistics
import sys
import tempfile

import torch

from benchmarks.timing import Clock, alternate, fastest_step, hf_step_timer, lightning_step_timer, median_of_runs
from benchmarks.timing import step_seconds, synchronize
from benchmarks.workloads import lightning_trainer, starting_point


def rl_datamodule(start: str, questions: int, steps: int):
    from forklight.data.datamodule import ForkDataModule, ToyTask

    datamodule = ForkDataModule(toy=ToyTask(num_train=questions * (steps + 2), num_val=0, num_test=0), tokenizer=start,
                                batch_size=questions, max_length=256, seed=1)
    datamodule.setup("fit")
    return datamodule


VLLM_GPU_MEMORY = 0.3  # each side's engine on a GPU (forklight's default); runs alternate in this process


def rl_common(args, start: str) -> dict:
    from forklight.starting import resolve_init_from

    common = {"init_from": start, "num_fork_tokens": resolve_init_from(start).identity.get("num_fork_tokens", 6),
              "group_size": args.group_size, "max_completion_tokens": args.max_new_tokens, "rollout_temperature": 1.0,
              "rollout_top_p": 1.0, "num_iterations": 1, "clip_eps": 0.2, "kl_coef": 0.0, "scale_rewards": "group",
              "max_grad_norm": 1.0, "learning_rate": args.learning_rate, "verifier": "exact_integer",
              "generation_batch_size": args.questions * args.group_size}
    if args.engine == "vllm":
        common["engine"] = "vllm"
        common["vllm"] = {"dtype": args.vllm_dtype, "enforce_eager": args.vllm_eager,
                          "max_num_seqs": args.questions * args.group_size,
                          "gpu_memory_utilization": VLLM_GPU_MEMORY}
    return common


def vllm_environment() -> None:
    """``--engine vllm``, before the first engine starts: vLLM in this process; on CPU bound to this process's cores,
    none kept back for vLLM, and a 1 GiB KV cache for every engine (unless already set in the environment)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if not torch.cuda.is_available():
        cores = sorted(os.sched_getaffinity(0))
        if cores == list(range(len(cores))):
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{len(cores) - 1}")
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def cpu_sync_weights(self) -> None:
    """TRL's colocate ``VLLMGeneration.sync_weights`` on vLLM's CPU backend, where TRL's own fails: TRL (1.16,
    trl/generation/vllm_generation.py:511) copies each weight with
    ``llm.llm_engine.model_executor.driver_worker.model_runner.model.load_weights([(name, param)])``, but on CPU
    vLLM repacks every linear layer's weight once loaded (vllm/model_executor/layers/linear.py:216,
    ``dispatch_cpu_unquantized_gemm(layer, remove_weight=True)``) and leaves an empty ``Parameter`` without a
    ``weight_loader`` in its place, so the first sync raises ``AttributeError: 'Parameter' object has no attribute
    'weight_loader'``. The same weights go through vLLM's ``reload_weights`` here, which redoes the repacking."""
    weights = ((name, tensor.detach()) for name, tensor in self._iter_named_params())
    self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    self.llm.reset_prefix_cache()


def shutdown_vllm(llm) -> None:
    """Stop an in-process ``vllm.LLM`` now, at the end of its run. vLLM stops it when the engine is collected (a
    finalizer), which can come late (``EngineCore.__init__`` calls ``gc.freeze()``) and, here, in the middle of the
    next run's engine start: the stop tears down vLLM's process-wide parallel groups and torch.distributed, which the
    new engine shares ("AssertionError: pipeline model parallel group is not initialized")."""
    llm.llm_engine.engine_core.shutdown()


@contextlib.contextmanager
def trl_vllm_engine(dtype: str, enforce_eager: bool):
    """While open, TRL's colocated ``vllm.LLM`` gets ``dtype`` and ``enforce_eager`` (as forklight's engine does), and
    on CPU syncs with :func:`cpu_sync_weights`."""
    try:
        from trl.generation import vllm_generation
    except ImportError as error:
        sys.exit(f"--engine vllm needs TRL's trl.generation.vllm_generation (TRL >= 1.0): {error}")
    llm, sync = vllm_generation.LLM, vllm_generation.VLLMGeneration.sync_weights
    vllm_generation.LLM = functools.partial(llm, dtype=dtype, enforce_eager=enforce_eager)
    if not torch.cuda.is_available():
        vllm_generation.VLLMGeneration.sync_weights = cpu_sync_weights
    try:
        yield
    finally:
        vllm_generation.LLM, vllm_generation.VLLMGeneration.sync_weights = llm, sync


def run_forklight_rl(kind: str, common: dict, datamodule, steps: int, warmup_steps: int, bf16: bool,
                     clock: Clock) -> dict:
    """One Lightning fit of GFPO (``trainable: head``) or GRPO; per step: seconds, generation seconds, tokens."""
    from forklight.modules.gfpo import GFPOModule
    from forklight.modules.grpo import GRPOModule

    module = GFPOModule(**common, trainable="head") if kind == "gfpo" else GRPOModule(**common, loss_type="dapo")
    generate_s, completion_tokens = [], []
    prepare, rollouts = module.prepare_update, module.rollouts

    def timed_prepare(batch, batch_idx):  # tag policy (GFPO), rollouts, rewards, advantages
        started = clock()
        update = prepare(batch, batch_idx)
        synchronize()
        generate_s.append(clock() - started)
        return update

    def counted_rollouts(batch, tags, batch_idx):
        groups = rollouts(batch, tags, batch_idx)
        completion_tokens.append(sum(c.length for group in groups for c in group.completions))
        return groups

    module.prepare_update, module.rollouts = timed_prepare, counted_rollouts
    timer = lightning_step_timer(clock)
    lightning_trainer(warmup_steps + steps, bf16, timer).fit(module, datamodule=datamodule)
    if common.get("engine") == "vllm":
        module.close_generation_engine()  # before the next run's engine starts (one in-process engine at a time)
    return rl_result(step_seconds(timer, warmup_steps), generate_s[warmup_steps:], completion_tokens[warmup_steps:])


def rl_result(seconds: list[float], generate_s: list[float], tokens: list[int]) -> dict:
    step, generate = statistics.median(seconds), statistics.median(generate_s)
    return {"step_s": step, "generate_s": generate, "update_s": step - generate, "generate_share": generate / step,
            "completion_tokens": float(statistics.mean(tokens)), "step_s_all": seconds, "generate_s_all": generate_s}


def trl_prompts(start: str, datamodule, questions: int, steps: int) -> tuple[list[dict], int]:
    """forklight's first ``steps`` batches as TRL rows: prompt text (chat template + the default tag) and answer."""
    from itertools import islice

    from transformers import AutoTokenizer

    from forklight.starting import resolve_init_from

    source = resolve_init_from(start)
    if source.kind != "export":
        sys.exit(f"--init-from {start}: TRL loads the model with from_pretrained, so give a forklight export dir")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    metadata = source.metadata
    tag_id = metadata["fork_token_ids"][metadata.get("default_tag_index", 0)]
    rows = []
    for batch in islice(iter(datamodule.train_dataloader()), steps):
        for prompt, answer in zip(batch.prompt_ids, batch.answers):
            ids = prompt.tolist() + [tag_id]
            text = tokenizer.decode(ids, skip_special_tokens=False)
            assert tokenizer(text=[text])["input_ids"][0] == ids, "TRL would tokenise the prompt differently"
            rows.append({"prompt": text, "answer": answer})
    return rows, tag_id


def run_trl_grpo(start: str, rows: list[dict], args, steps: int, warmup_steps: int, clock: Clock) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PrinterCallback
    from trl import GRPOConfig, GRPOTrainer

    from forklight.rewards import exact_integer

    generate_s, completion_tokens = [], []

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):  # generation, rewards, advantages (per optimiser step here)
            started = clock()
            output = super()._generate_and_score_completions(inputs)
            synchronize()
            generate_s.append(clock() - started)
            completion_tokens.append(int(output["completion_mask"].sum()))
            return output

    def toy_reward(prompts, completions, answer, **kwargs):
        return exact_integer(completions, answer)

    total = warmup_steps + steps
    engine = ({"use_vllm": True, "vllm_mode": "colocate", "vllm_gpu_memory_utilization": VLLM_GPU_MEMORY}
              if args.engine == "vllm" else {})
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="forklight-vs-trl-"),
        per_device_train_batch_size=args.questions * args.group_size, num_generations=args.group_size,
        max_completion_length=args.max_new_tokens, temperature=1.0, top_p=1.0, max_steps=total,
        learning_rate=args.learning_rate, beta=0.0, loss_type="dapo", scale_rewards="group", num_iterations=1,
        epsilon=0.2, max_grad_norm=1.0, optim="adamw_torch", weight_decay=0.0, bf16=args.bf16,
        use_cpu=not torch.cuda.is_available(), shuffle_dataset=False, logging_steps=10**6, save_strategy="no",
        report_to="none", disable_tqdm=True, log_completions=False, seed=0, **engine,
    )
    timer = hf_step_timer(clock)
    model = AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32)
    vllm = trl_vllm_engine(args.vllm_dtype, args.vllm_eager) if args.engine == "vllm" else contextlib.nullcontext()
    with vllm:
        trainer = TimedGRPOTrainer(model=model, reward_funcs=toy_reward, args=config,
                                   train_dataset=Dataset.from_list(rows[: args.questions * total]),
                                   processing_class=AutoTokenizer.from_pretrained(start), callbacks=[timer])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
    if args.engine == "vllm":
        shutdown_vllm(trainer.vllm_generation.llm)
    seconds = step_seconds(timer, warmup_steps)
    return rl_result(seconds, generate_s[warmup_steps:total], completion_tokens[warmup_steps:total])


def compare_rl(args, clock: Clock) -> dict:
    if args.engine == "vllm":
        vllm_environment()
    start = starting_point(args.init_from)
    total = args.warmup_steps + args.rl_steps
    datamodule = rl_datamodule(start, args.questions, total)
    common = rl_common(args, start)
    rows, tag_id = trl_prompts(start, datamodule, args.questions, total)
    print(f"  RL: start {start}; B={args.questions} questions x G={args.group_size} completions of <= "
          f"{args.max_new_tokens} tokens; GRPO tag id {tag_id}; {'bf16-mixed' if args.bf16 else 'fp32'}; "
          f"generation: {engine_description(args)}", flush=True)

    def side(kind):
        def run(warmup: bool) -> dict:
            steps = 1 if warmup else args.rl_steps
            if kind == "trl-grpo":
                return run_trl_grpo(start, rows, args, steps, args.warmup_steps, clock)
            return run_forklight_rl(kind, common, datamodule, steps, args.warmup_steps, args.bf16, clock)
        return run

    sides = {"gfpo": side("gfpo")}
    if not args.skip_forklight_grpo:
        sides["grpo"] = side("grpo")
    sides["trl-grpo"] = side("trl-grpo")
    runs = alternate(sides, args.repeats)
    summary = {name: {key: median_of_runs(method_runs, key) for key in
                      ("step_s", "generate_s", "update_s", "generate_share", "completion_tokens")}
               for name, method_runs in runs.items()}
    for name, method_runs in runs.items():
        summary[name]["step_s_min"] = fastest_step(method_runs)
    trl_step, trl_fastest = summary["trl-grpo"]["step_s"], summary["trl-grpo"]["step_s_min"]
    for values in summary.values():
        values["over_trl_grpo"] = values["step_s"] / trl_step
        values["over_trl_grpo_fastest"] = values["step_s_min"] / trl_fastest
        values["s_per_1k_completion_tokens"] = 1000 * values["step_s"] / max(values["completion_tokens"], 1.0)
    return {"start": start, "questions": args.questions, "group_size": args.group_size,
            "max_new_tokens": args.max_new_tokens, "precision": "bf16-mixed" if args.bf16 else "fp32",
            "engine": engine_description(args),
            "gfpo_over_trl_grpo": summary["gfpo"]["over_trl_grpo"],
            "gfpo_over_trl_grpo_fastest": summary["gfpo"]["over_trl_grpo_fastest"], "methods": summary, "runs": runs}


def engine_description(args) -> str:
    if args.engine != "vllm":
        return "hf (transformers generate)"
    return f"vllm in-process ({args.vllm_dtype}, {'eager' if args.vllm_eager else 'compiled'})"


def print_rl(result: dict) -> None:
    print(f"\nRL step, whole training loop (B={result['questions']} x G={result['group_size']}, <= "
          f"{result['max_new_tokens']} new tokens, {result['precision']}, generation: "
          f"{result.get('engine', 'hf (transformers generate)')}; generate = rollouts + rewards + advantages)")
    print(f"{'method':28s} {'step s':>8s} {'generate s':>10s} {'update s':>9s} {'gen share':>9s} "
          f"{'compl tok':>9s} {'s/1k tok':>8s} {'/ TRL GRPO':>10s} {'fastest s':>9s} {'/ TRL':>6s}")
    names = {"gfpo": "forklight GFPO (head)", "grpo": "forklight GRPO", "trl-grpo": "TRL GRPOTrainer"}
    for name, values in result["methods"].items():
        print(f"{names[name]:28s} {values['step_s']:8.3f} {values['generate_s']:10.3f} {values['update_s']:9.3f} "
              f"{values['generate_share']:9.1%} {values['completion_tokens']:9.0f} "
              f"{values['s_per_1k_completion_tokens']:8.3f} {values['over_trl_grpo']:10.3f} "
              f"{values['step_s_min']:9.3f} {values['over_trl_grpo_fastest']:6.3f}")
    print(f"GFPO step / TRL GRPO step: {result['gfpo_over_trl_grpo']:.3f} median, "
          f"{result['gfpo_over_trl_grpo_fastest']:.3f} fastest steps (target <= 0.5)")

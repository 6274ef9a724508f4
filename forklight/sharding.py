"""What Lightning's strategies shard, and the full weights of a sharded run (DESIGN.md §7).

forklight has no distribution code of its own: ``ddp``, ``FSDPStrategy`` (FSDP) and
``ModelParallelStrategy`` (FSDP2) do the work. This file says *what* they shard, the model's
transformer blocks (by class name: ``model.shard_block_classes``, else the Hugging Face model's
``_no_split_modules``), and gathers full weights for an export:

- FSDP2: :func:`fully_shard_model`, called from ``ForkModule.configure_model`` when the strategy
  gives the module a device mesh: ``fully_shard`` on each block, then on the whole model, with the
  options of :class:`FSDP2Strategy` (``configs/strategies/fsdp2.yaml``: mixed precision, CPU offload,
  resharding, and whether the model is built on the meta device and filled shard by shard,
  :mod:`forklight.sharded_weights`);
- FSDP: :class:`TransformerBlockWrapPolicy`, the ``auto_wrap_policy`` (and
  ``activation_checkpointing_policy``) of ``configs/strategies/fsdp.yaml``;
- :func:`forward_is_collective`: under either, every forward pass all-gathers parameters, so
  every rank must run the same number of them (generation keeps going until all ranks finish).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FULL_PRECISION = ("32-true", "32", "64-true", "64")  # trainer.precision values that neither cast nor autocast


def block_class_names(model: nn.Module, names: list[str] | None = None) -> set[str]:
    """Class names of ``model``'s transformer blocks: ``names``, else every ``_no_split_modules``
    its Hugging Face (sub)models declare (e.g. ``{"LlamaDecoderLayer"}``)."""
    if names:
        return set(names)
    found: set[str] = set()
    for module in model.modules():
        found.update(getattr(module, "_no_split_modules", None) or [])
    return found


def transformer_blocks(model: nn.Module, names: list[str] | None = None) -> list[nn.Module]:
    """The modules of ``model`` whose class is a transformer block (see :func:`block_class_names`)."""
    wanted = block_class_names(model, names)
    blocks = [module for module in model.modules() if unsharded_class_name(module) in wanted]  # sharded or not
    if not blocks:
        raise ValueError(
            f"found no transformer block to shard in {type(model).__name__} (looked for classes {sorted(wanted)}); "
            "set model.init_args.shard_block_classes to the class names of its blocks, e.g. ['LlamaDecoderLayer']"
        )
    return blocks


@dataclass(frozen=True)
class ShardSettings:
    """How ``configure_model`` shards under FSDP2 (the options of :class:`FSDP2Strategy`; Lightning's plain
    ``ModelParallelStrategy`` gets these defaults)."""

    meta_init: bool = True  # build on the meta device, shard, then fill the shards (forklight.sharded_weights)
    fully_shard_options: dict = field(default_factory=dict)  # mp_policy, offload_policy, reshard_after_forward


def shard_settings(strategy) -> ShardSettings:
    """The :class:`ShardSettings` of ``strategy`` (defaults unless it is an :class:`FSDP2Strategy`)."""
    return strategy.shard_settings() if isinstance(strategy, FSDP2Strategy) else ShardSettings()


def fully_shard_model(model: nn.Module, mesh, names: list[str] | None = None, options: dict | None = None) -> nn.Module:
    """FSDP2: ``fully_shard`` every transformer block, then the root (embeddings, final norm, head).

    Each block's parameters are gathered only around its own forward and backward; ``mesh`` is the
    data-parallel device mesh of Lightning's ``ModelParallelStrategy``; ``options``: ``fully_shard``'s
    keyword arguments (:attr:`ShardSettings.fully_shard_options`). Parameters on the meta device stay
    there (``to_empty`` then materialises only each rank's shard).
    """
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(model, names):
        fully_shard(block, mesh=mesh, **(options or {}))
    fully_shard(model, mesh=mesh, **(options or {}))
    return model


def shard_on_mesh(model: nn.Module, device_mesh, names: list[str] | None = None, lora: bool = False,
                  options: dict | None = None) -> nn.Module:
    """:func:`fully_shard_model` on the data-parallel dimension of Lightning's ``ModelParallelStrategy``
    mesh, after refusing what forklight does not support there (LoRA, tensor parallelism)."""
    if lora:
        raise ValueError("model.lora is not supported with FSDP2 (ModelParallelStrategy) yet; use DDP "
                         "(configs/strategies/ddp.yaml) or full fine-tuning without model.lora")
    if device_mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            f"ModelParallelStrategy has tensor_parallel_size={device_mesh['tensor_parallel'].size()}, but forklight "
            "shards with FSDP2 only: set trainer.strategy.init_args.tensor_parallel_size=1 and "
            "data_parallel_size = trainer.num_nodes * trainer.devices (configs/strategies/fsdp2.yaml)"
        )
    return fully_shard_model(model, device_mesh["data_parallel"], names, options)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` (FSDP2) with the options of forklight's sharding
    (``configs/strategies/fsdp2.yaml``). They live here, with the overlay that turns FSDP2 on, not on
    the module: they say how to shard, not what to train, and a run config stays the same on one GPU.
    """

    def __init__(
        self,
        data_parallel_size: Literal["auto"] | int = "auto",
        tensor_parallel_size: Literal["auto"] | int = "auto",
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
        meta_init: bool = True,
        param_dtype: str | None = None,
        reduce_dtype: str | None = "float32",
        cpu_offload: bool = False,
        reshard_after_forward: bool | None = None,
    ) -> None:
        """Args (the first five are ``ModelParallelStrategy``'s):
            data_parallel_size: processes that shard the model (num_nodes x devices; tensor parallelism is not used).
            tensor_parallel_size: must be 1.
            save_distributed_checkpoint: checkpoints are directories with one shard file per rank (DCP).
            process_group_backend: ``gloo`` on CPU, ``nccl`` on GPUs by default.
            timeout: how long a rank waits in a collective for the others (``"h:m:s"``; PyTorch's default 0:30:00).
            meta_init: build the model on the meta device, shard it, then fill each rank's shard from the
                starting weights (rank 0 reads and broadcasts, or each rank reads its slices of a DCP checkpoint):
                no rank holds the whole model. False: every rank builds the whole model, then shards it (the old way).
            param_dtype: FSDP2 mixed precision (``bfloat16``): parameters are all-gathered and computed in this dtype
                over float32 master shards (weights, gradients and AdamW state stay float32); needs
                ``trainer.precision: 32-true`` (FSDP2 casts; Lightning must not). null: compute in the weights' dtype.
            reduce_dtype: dtype of the gradient reduce-scatter under ``param_dtype`` (float32: no precision lost
                summing the ranks' gradients).
            cpu_offload: keep the parameter, gradient and optimiser shards in host memory (FSDP2's ``CPUOffloadPolicy``;
                the optimiser steps on the CPU); GPUs only.
            reshard_after_forward: free a block's gathered parameters after its forward (gathered again for backward:
                less memory, one more all-gather); null: PyTorch's default (True for the blocks, False for the root).
        """
        super().__init__(data_parallel_size, tensor_parallel_size, save_distributed_checkpoint, process_group_backend,
                         timeout)
        for key, value in (("param_dtype", param_dtype), ("reduce_dtype", reduce_dtype)):
            if value is not None and value not in DTYPE_NAMES:
                raise ValueError(f"trainer.strategy.init_args.{key} must be one of {sorted(DTYPE_NAMES)} or null, "
                                 f"got {value!r}")
        self.meta_init = meta_init
        self.param_dtype = param_dtype
        self.reduce_dtype = reduce_dtype
        self.cpu_offload = cpu_offload
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        precision = str(self.precision_plugin.precision)
        if self.param_dtype is not None and precision not in FULL_PRECISION:
            raise ValueError(
                f"trainer.strategy.init_args.param_dtype={self.param_dtype} computes in {self.param_dtype} over float32 "
                f"master weights itself, but trainer.precision={precision} would "
                + ("make the masters half precision" if precision.endswith("-true") else "autocast on top of it")
                + ": set --trainer.precision=32-true")
        if self.cpu_offload and self.root_device.type == "cpu":
            raise ValueError("trainer.strategy.init_args.cpu_offload=true moves shards from GPU memory to host memory, "
                             "but this run is on the CPU (the shards are in host memory already): set it to false")
        super().setup_environment()

    def shard_settings(self) -> ShardSettings:
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy

        options: dict = {}
        if self.param_dtype is not None:
            reduce = DTYPE_NAMES[self.reduce_dtype] if self.reduce_dtype is not None else None
            options["mp_policy"] = MixedPrecisionPolicy(param_dtype=DTYPE_NAMES[self.param_dtype], reduce_dtype=reduce)
        if self.cpu_offload:
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        if self.reshard_after_forward is not None:
            options["reshard_after_forward"] = self.reshard_after_forward
        return ShardSettings(meta_init=self.meta_init, fully_shard_options=options)

    @property
    def master_dtype(self) -> torch.dtype | None:
        """float32 when FSDP2 mixed precision computes in ``param_dtype`` over float32 master shards, else None."""
        return torch.float32 if self.param_dtype is not None else None

    def model_to_device(self) -> None:
        """As Lightning's, except under ``cpu_offload``: the parameter shards stay in host memory (``fully_shard``
        put the blocks' buffers on the device); the module's own buffers move."""
        if not self.cpu_offload:
            return super().model_to_device()
        for module in self.model.modules():
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(self.root_device)


def is_fsdp2_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` (FSDP2) was applied to ``model`` or a module inside it."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(module, FSDPModule) for module in model.modules())


def forward_is_collective(model: nn.Module) -> bool:
    """Whether a forward pass of ``model`` all-gathers parameters across ranks (FSDP2 or FSDP units
    inside, more than one rank): then all ranks must call it equally often or they deadlock."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules())


def full_state_dict(trainer, pl_module) -> dict[str, torch.Tensor] | None:
    """Under FSDP (``fsdp.yaml``): the full weights of ``pl_module.model`` (keys as its own ``state_dict``), gathered
    onto rank 0's CPU; ``None`` otherwise (``save_pretrained`` reads the model then; an FSDP2 export is streamed:
    :func:`forklight.sharded_weights.write_streamed_export`).

    Every rank must call it (the gather is a collective); other ranks get an empty dict. It is
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` of Lightning's root FSDP unit (the whole
    LightningModule), keeping the keys under ``model.``.
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not isinstance(trainer.strategy, FSDPStrategy):
        return None
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(trainer.strategy.model, options=options)
    return {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}


def unsharded_class_name(model: nn.Module) -> str:
    """The model's own class name (FSDP2 swaps in a subclass named ``FSDP<name>``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(cls for cls in type(model).__mro__ if not issubclass(cls, FSDPModule)).__name__


class TransformerBlockWrapPolicy(ModuleWrapPolicy):
    """FSDP policy: wrap (or checkpoint) every transformer block of the model being wrapped.

    A ``ModuleWrapPolicy`` whose classes are found when it is applied, so one YAML serves any
    Hugging Face model: ``block_classes`` (class names), else the model's ``_no_split_modules``.
    """

    def __init__(self, block_classes: list[str] | None = None) -> None:
        """Args:
        block_classes: class names of the blocks (default: the model's ``_no_split_modules``).
        """
        super().__init__(())
        self.block_classes = block_classes

    def _resolve(self, root: nn.Module) -> None:
        self._module_classes = {type(block) for block in transformer_blocks(root, self.block_classes)}
        self._module_classes_str = str(self._module_classes)

    def _run_policy(self, root_module, ignored_modules, root_kwargs):
        self._resolve(root_module)
        return super()._run_policy(root_module, ignored_modules, root_kwargs)

    def __call__(self, module, recurse, *args, **kwargs):
        if recurse and not self._module_classes:  # FSDP's recursive wrap asks about the root first
            self._resolve(module)
        return super().__call__(module, recurse, *args, **kwargs)

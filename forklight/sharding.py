"""What Lightning's strategies shard, and the full weights of a sharded run (DESIGN.md §7).

forklight has no distribution code of its own: ``ddp``, ``FSDPStrategy`` (FSDP) and
``ModelParallelStrategy`` (FSDP2) do the work. This file says *what* they shard, the model's
transformer blocks (by class name: ``model.shard_block_classes``, else the Hugging Face model's
``_no_split_modules``), and gathers full weights for an export:

- FSDP2: :func:`fully_shard_model`, called from ``ForkModule.configure_model`` when the strategy
  gives the module a device mesh: ``fully_shard`` on each block, then on the whole model;
- FSDP: :class:`TransformerBlockWrapPolicy`, the ``auto_wrap_policy`` (and
  ``activation_checkpointing_policy``) of ``configs/strategies/fsdp.yaml``;
- :func:`forward_is_collective`: under either, every forward pass all-gathers parameters, so
  every rank must run the same number of them (generation keeps going until all ranks finish).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp.wrap import ModuleWrapPolicy


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
    blocks = [module for module in model.modules() if type(module).__name__ in wanted]
    if not blocks:
        raise ValueError(
            f"found no transformer block to shard in {type(model).__name__} (looked for classes {sorted(wanted)}); "
            "set model.init_args.shard_block_classes to the class names of its blocks, e.g. ['LlamaDecoderLayer']"
        )
    return blocks


def fully_shard_model(model: nn.Module, mesh, names: list[str] | None = None) -> nn.Module:
    """FSDP2: ``fully_shard`` every transformer block, then the root (embeddings, final norm, head).

    Each block's parameters are gathered only around its own forward and backward; ``mesh`` is the
    data-parallel device mesh of Lightning's ``ModelParallelStrategy``.
    """
    from torch.distributed.fsdp import fully_shard

    for block in transformer_blocks(model, names):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def shard_on_mesh(model: nn.Module, device_mesh, names: list[str] | None = None, lora: bool = False) -> nn.Module:
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
    return fully_shard_model(model, device_mesh["data_parallel"], names)


def forward_is_collective(model: nn.Module) -> bool:
    """Whether a forward pass of ``model`` all-gathers parameters across ranks (FSDP2 or FSDP units
    inside, more than one rank): then all ranks must call it equally often or they deadlock."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return False
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    return any(isinstance(module, (FSDPModule, FullyShardedDataParallel)) for module in model.modules())


def full_state_dict(trainer, pl_module) -> dict[str, torch.Tensor] | None:
    """The full weights of ``pl_module.model`` (keys as its own ``state_dict``) when it is sharded,
    gathered onto rank 0's CPU; ``None`` when it is not (``save_pretrained`` reads the model then).

    Every rank must call it (the gather is a collective); other ranks get an empty dict. FSDP2:
    ``get_model_state_dict(full_state_dict=True, cpu_offload=True)`` of the model; FSDP: the same of
    Lightning's root FSDP unit (the whole LightningModule), keeping the keys under ``model.``.
    """
    from lightning.pytorch.strategies import FSDPStrategy
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    if isinstance(trainer.strategy, FSDPStrategy):
        state = get_model_state_dict(trainer.strategy.model, options=options)
        return {key[len("model."):]: value for key, value in state.items() if key.startswith("model.")}
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(module, FSDPModule) for module in pl_module.model.modules()):
        return get_model_state_dict(pl_module.model, options=options)
    return None


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

"""Weights into and out of an FSDP2-sharded model without the whole model on any rank (DESIGN.md §8).

In: ``ForkModule.configure_model`` builds the model on the meta device
(:func:`~forklight.models.build_causal_lm_skeleton`), shards it, and then

- :func:`materialize_shards` allocates each rank's shards (``to_empty``) and puts back the real
  buffers the skeleton was built with (rotary ``inv_freq``: in no checkpoint, so never refilled);
- :func:`fill_from_rank0`: rank 0 reads the starting weights a bounded group at a time (a
  :class:`WeightReader`: a safetensors checkpoint, a Lightning ``.ckpt``, or a model it built whole
  when nothing can be streamed) and ``set_model_state_dict(full_state_dict=True,
  broadcast_from_rank0=True)`` sends each tensor to every rank, which keeps its own slice;
- :func:`load_sharded_checkpoint`: each rank reads only its own slices of a sharded (DCP)
  checkpoint directory, the format FSDP2 runs save.

New fork-token rows are computed from the checkpoint's embedding rows by the same function as a
model built whole (:func:`~forklight.forking.fork_token_rows`, :class:`ForkRows`), so both give the
same values. Weights are read in the dtype a whole build loads them in (``model.dtype``, else the
checkpoint's) and then cast to the shard's (float32 masters), as a whole build casts them.

Out: :func:`write_streamed_export` gathers one parameter at a time (``full_tensor``) and rank 0
writes ``save_pretrained``'s layout (safetensors shards of at most ``max_shard_bytes`` plus
``model.safetensors.index.json``) as they fill: no rank holds more than one shard file's tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import nn

from forklight.checkpointing import load_sharded, refuse_lora_checkpoint, refuse_missing_weights, sharded_contents
from forklight.forking import fork_token_rows

FILL_GROUP_BYTES = 64 * 2**20  # rank 0 reads at most this much (or one larger tensor) before broadcasting it
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"


def is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


# ---- the keys of a model -------------------------------------------------------------------
def distinct_state_keys(model: nn.Module) -> list[str]:
    """``model.state_dict()``'s keys in order, each tied parameter once: its source (``lm_head.weight`` tied to
    ``model.embed_tokens.weight`` is dropped), as ``save_pretrained`` writes them."""
    tied_targets = set(getattr(model, "all_tied_weights_keys", None) or {})
    names_by_tensor: dict[int, list[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_by_tensor.setdefault(id(parameter), []).append(name)
    dropped = set()
    for names in names_by_tensor.values():
        if len(names) > 1:
            kept = next((name for name in names if name not in tied_targets), names[0])
            dropped.update(name for name in names if name != kept)
    return [key for key in model.state_dict(keep_vars=True) if key not in dropped]


def block_groups(keys: list[str], block_prefixes: list[str]) -> list[list[str]]:
    """``keys`` in order, grouped by the transformer block they belong to (``block_prefixes``, e.g.
    ``model.layers.3``); a key outside every block is a group of its own."""
    groups: list[list[str]] = []
    current = None
    for key in keys:
        prefix = next((p for p in block_prefixes if key.startswith(p + ".")), None)
        if prefix is None or prefix != current:
            groups.append([])
        groups[-1].append(key)
        current = prefix
    return groups


# ---- readers: the starting weights, read on rank 0 ----------------------------------------------
def weights_directory(name_or_path: str) -> str:
    """The local directory of ``name_or_path``'s safetensors: itself, or a hub id's snapshot (only the weights and
    their index are fetched; ``from_pretrained`` would fetch the same files)."""
    if os.path.isdir(name_or_path):
        return name_or_path
    from huggingface_hub import snapshot_download

    return snapshot_download(name_or_path, allow_patterns=["*.safetensors", SAFETENSORS_INDEX])


class WeightReader(Protocol):
    def keys(self) -> set[str]:
        """The model keys it can read."""

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        """Full tensors of ``keys`` (CPU, in the dtype a whole build loads them in)."""


def load_cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` as a whole build loads it: floating tensors in ``dtype``, others as they are."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


class SafetensorsReader:
    """A Hugging Face checkpoint directory (``model.safetensors`` or an index of shards), read a group of tensors at
    a time: each file is opened (memory-mapped) for one group and closed again, so no file stays mapped."""

    def __init__(self, directory: str, dtype: torch.dtype) -> None:
        from safetensors import safe_open

        self.directory, self.dtype = directory, dtype
        index = os.path.join(directory, SAFETENSORS_INDEX)
        if os.path.isfile(index):
            with open(index) as handle:
                self.file_of = dict(json.load(handle)["weight_map"])
        elif os.path.isfile(os.path.join(directory, SAFETENSORS_SINGLE)):
            with safe_open(os.path.join(directory, SAFETENSORS_SINGLE), framework="pt") as handle:
                self.file_of = dict.fromkeys(handle.keys(), SAFETENSORS_SINGLE)
        else:
            raise FileNotFoundError(f"{directory} has no {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX}")

    def keys(self) -> set[str]:
        return set(self.file_of)

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        tensors = {}
        for file in sorted({self.file_of[key] for key in keys}):
            with safe_open(os.path.join(self.directory, file), framework="pt") as handle:
                for key in keys:
                    if self.file_of[key] == file:
                        tensors[key] = load_cast(handle.get_tensor(key), self.dtype)
        return tensors


class StateDictReader:
    """Tensors of a state dict (a Lightning ``.ckpt`` opened with ``mmap``, keys under ``prefix``; or a model built
    whole on rank 0)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], dtype: torch.dtype, prefix: str = "") -> None:
        self.state_dict, self.dtype, self.prefix = state_dict, dtype, prefix

    def keys(self) -> set[str]:
        return {key[len(self.prefix):] for key in self.state_dict if key.startswith(self.prefix)}

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        return {key: load_cast(self.state_dict[self.prefix + key], self.dtype) for key in keys}


@dataclass(frozen=True)
class ForkRowSpec:
    """The new fork-token rows a whole build adds (:func:`~forklight.forking.init_fork_embeddings`)."""

    token_ids: list[int]  # the new fork tokens' ids
    num_old_tokens: int  # the tokenizer's vocabulary before them (the rows their mean is taken over)
    seed: int
    noise_std: float
    num_rows: int  # rows of the resized matrices (max fork id + 1, or the checkpoint's when larger)
    matrix_keys: list[str]  # the input embedding's key, then the output layer's when it is not tied

    @classmethod
    def of(cls, model: nn.Module, token_ids: list[int], num_old_tokens: int, seed: int, noise_std: float) -> ForkRowSpec:
        """The spec of ``model`` (a skeleton, sharded or not, already resized as a whole build resizes)."""
        inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
        names = {module: name for name, module in model.named_modules()}
        keys = [f"{names[inputs]}.weight"]
        if outputs is not None and outputs.weight is not inputs.weight:
            keys.append(f"{names[outputs]}.weight")
        return cls(list(token_ids), num_old_tokens, seed, noise_std, int(inputs.weight.shape[0]), keys)


class ForkRows:
    """A reader whose embedding and output matrices get the new fork-token rows, as a whole build gives them:
    resized to ``spec.num_rows``, rows from one generator seeded with ``spec.seed``, input matrix first.

    The rows are computed when it is made (each matrix read once, then released), so reading the matrices
    later in any group order gives the same values."""

    def __init__(self, reader: WeightReader, spec: ForkRowSpec) -> None:
        self.reader, self.spec = reader, spec
        generator = torch.Generator().manual_seed(spec.seed)
        self.rows = {}
        for key in spec.matrix_keys:
            weight = reader.read([key])[key]  # [V_checkpoint, D]
            new_rows = set(range(weight.shape[0], spec.num_rows))
            if not new_rows <= set(spec.token_ids):
                raise ValueError(f"resizing {key} from {weight.shape[0]} to {spec.num_rows} rows adds rows that are "
                                 "not fork tokens (randomly initialised in a whole build)")
            self.rows[key] = fork_token_rows(weight, len(spec.token_ids), spec.num_old_tokens, generator, spec.noise_std)

    def keys(self) -> set[str]:
        return self.reader.keys()

    def read(self, keys: list[str]) -> dict[str, torch.Tensor]:
        tensors = self.reader.read(keys)
        for key in keys:
            if key in self.rows:
                weight = tensors[key]  # [V_checkpoint, D]
                if weight.shape[0] < self.spec.num_rows:
                    weight = torch.cat([weight, weight.new_zeros(self.spec.num_rows - weight.shape[0], weight.shape[1])])
                weight[torch.tensor(self.spec.token_ids)] = self.rows[key]
                tensors[key] = weight  # [V, D]
        return tensors


# ---- in: fill a sharded skeleton ----------------------------------------------------------------
def materialize_shards(model: nn.Module, device: torch.device) -> nn.Module:
    """Allocate ``model``'s meta parameters (after ``fully_shard``: each rank's shards only) on ``device`` and put
    back the buffers it was built with, which ``to_empty`` would leave uninitialised."""
    buffers = [(module, name, buffer) for module in model.modules() for name, buffer in module._buffers.items()
               if buffer is not None]
    model.to_empty(device=device)
    for module, name, buffer in buffers:
        if not buffer.is_meta:
            module._buffers[name] = buffer.to(device)
    return model


def agree_on_rank0(make: Callable[[], object]) -> object:
    """``make()`` on rank 0 (None elsewhere). An error there is raised there and, naming it, on every other rank,
    instead of leaving them waiting in the next collective."""
    result, failure = None, None
    if is_rank_zero():
        try:
            result = make()
        except Exception as error:  # noqa: BLE001 - re-raised below, after the other ranks hear of it
            failure = error
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        message = [f"{type(failure).__name__}: {failure}" if failure is not None else None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is not None and failure is None:
            raise RuntimeError(f"rank 0 could not read the starting weights: {message[0]}")
    if failure is not None:
        raise failure
    return result


def fill_from_rank0(model: nn.Module, make_reader: Callable[[], WeightReader], what: str,
                    group_bytes: int = FILL_GROUP_BYTES) -> None:
    """Fill every shard of ``model`` (materialised: :func:`materialize_shards`) from the full tensors rank 0 reads
    (``make_reader()``, called there only). Groups of at most ``group_bytes`` (or one larger tensor) are read and
    broadcast in turn (``set_model_state_dict(full_state_dict=True, broadcast_from_rank0=True)``); each rank keeps its
    slice, cast to its shard's dtype. ``what``: the starting weights, for the error when some are missing."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    keys = distinct_state_keys(model)

    def checked_reader() -> WeightReader:
        reader = make_reader()
        refuse_missing_weights(what, [key for key in keys if key not in reader.keys()])
        return reader

    reader = agree_on_rank0(checked_reader)
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True, strict=False)
    state = model.state_dict(keep_vars=True)
    for group in byte_groups(keys, state, group_bytes):
        tensors = reader.read(group) if reader is not None else {}
        set_model_state_dict(model, tensors, options=options)
        del tensors


def byte_groups(keys: list[str], state: dict[str, torch.Tensor], group_bytes: int) -> Iterator[list[str]]:
    """``keys`` in order, in runs of at most ``group_bytes`` (a larger tensor alone)."""
    group, size = [], 0
    for key in keys:
        tensor = state[key]
        tensor_bytes = tensor.numel() * tensor.element_size()
        if group and size + tensor_bytes > group_bytes:
            yield group
            group, size = [], 0
        group.append(key)
        size += tensor_bytes
    if group:
        yield group


@torch.no_grad()
def load_sharded_checkpoint(model: nn.Module, path: str, dtype: torch.dtype, extra: dict[str, torch.Tensor] | None = None,
                            prefix: str = "model.") -> None:
    """Load ``model``'s weights from a Lightning sharded (DCP) checkpoint directory ``path``, where they are
    ``state_dict.<prefix><key>``; ``extra``: more of the module's tensors to load in place (``tag_coverage``).

    Sharded (DTensor) weights: each rank reads only its own slices. Plain weights (one device, DDP): each
    process reads them whole. Floating weights are rounded through ``dtype`` (how a whole build loads them,
    e.g. bfloat16 before becoming float32 masters)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from torch.distributed.tensor import DTensor

    state = get_model_state_dict(model)
    wanted = {f"{prefix}{key}": value for key, value in state.items()} | dict(extra or {})
    available = {key.removeprefix("state_dict.") for key in sharded_contents(path)}
    refuse_lora_checkpoint(path, available)  # before the missing weights: a LoRA run's keys are all renamed
    refuse_missing_weights(f"model.init_from={path}", sorted(set(wanted) - available))
    load_sharded({"state_dict": wanted}, path, no_dist=not (dist.is_available() and dist.is_initialized()))
    for value in state.values():
        local = value.to_local() if isinstance(value, DTensor) else value
        if local.is_floating_point() and local.dtype != dtype:
            local.copy_(local.to(dtype))
    set_model_state_dict(model, {key: wanted[f"{prefix}{key}"] for key in state})


# ---- out: a streamed export ----------------------------------------------------------------------
def write_streamed_export(model: nn.Module, directory: str, dtype: torch.dtype | None, max_shard_bytes: int,
                          block_prefixes: list[str]) -> list[str]:
    """Write ``model``'s (FSDP2-sharded) weights into ``directory`` as ``save_pretrained`` lays them out; every rank
    calls it (each parameter is all-gathered in turn), rank 0 writes. Returns the files written (rank 0).

    Parameters are gathered one at a time and collected per transformer block (``block_prefixes``), where
    transformers' renaming back to the checkpoint format (``revert_weight_conversion``) is applied, as
    ``save_pretrained`` does per shard when weights are offloaded. A shard file is written as soon as the next
    block would take it past ``max_shard_bytes``: rank 0 holds at most one shard's tensors (plus one block)."""
    from safetensors.torch import save_file
    from torch.distributed.tensor import DTensor
    from transformers.core_model_loading import revert_weight_conversion

    rank_zero = is_rank_zero()
    state = model.state_dict()
    keys = distinct_state_keys(model)
    written: list[tuple[str, list[str]]] = []  # (temporary file, its keys)
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total_bytes = 0
    if rank_zero:
        os.makedirs(directory, exist_ok=True)
        for name in os.listdir(directory):  # a previous export's weights, which the new index would not list
            if name.startswith("model") and (name.endswith(".safetensors") or name == SAFETENSORS_INDEX):
                os.remove(os.path.join(directory, name))

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            path = os.path.join(directory, f".shard-{len(written):05d}.safetensors")
            save_file(shard, path, metadata={"format": "pt"})
            written.append((path, list(shard)))
        shard, shard_bytes = {}, 0

    for group in block_groups(keys, block_prefixes):
        gathered = {}
        for key in group:
            value = state[key]
            full = value.full_tensor() if isinstance(value, DTensor) else value  # a collective: every rank
            if rank_zero:
                full = full.detach().to("cpu")
                gathered[key] = (full.to(dtype) if dtype is not None and full.is_floating_point() else full).contiguous()
            del full
        if not rank_zero:
            continue
        gathered = revert_weight_conversion(model, gathered)
        group_bytes = sum(tensor.numel() * tensor.element_size() for tensor in gathered.values())
        if shard and shard_bytes + group_bytes > max_shard_bytes:
            flush()
        shard.update(gathered)
        shard_bytes += group_bytes
        total_bytes += group_bytes
    if not rank_zero:
        return []
    flush()
    if len(written) == 1:
        os.replace(written[0][0], os.path.join(directory, SAFETENSORS_SINGLE))
        return [SAFETENSORS_SINGLE]
    names, weight_map = [], {}
    for index, (path, shard_keys) in enumerate(written):
        name = f"model-{index + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(path, os.path.join(directory, name))
        names.append(name)
        weight_map.update(dict.fromkeys(shard_keys, name))
    with open(os.path.join(directory, SAFETENSORS_INDEX), "w") as handle:
        json.dump({"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}, handle,
                  indent=2)
    return names

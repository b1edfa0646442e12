"""Blocks: the unit the ZO engine perturbs and the learned optimizer assigns a sigma to.

A block is one trainable parameter tensor, as in ZO Fine-tuner (its "291 blocks for LLaMA-8B").
Tied weights (an lm_head sharing the embedding matrix) are one block: we de-duplicate by tensor
identity and by storage, never by model or parameter name.

Sharded parameters (FSDP2's ``fully_shard``: a ``DTensor`` sharded on dim 0) are blocks too. The process
holds and updates rows [r0, r1) only: ``Block.local`` is that shard, and ``Block.span`` places it in the
flattened full tensor, so that z, defined over the full tensor, is regenerated for the local entries only
(``l2zo.engine.seeding``).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from l2zo.errors import L2ZOError

ParamsLike = nn.Module | Iterable[tuple[str, torch.Tensor]] | Iterable[torch.Tensor]


@dataclass(frozen=True, eq=False)
class Block:
    """One parameter tensor under ZO optimisation.

    Attributes:
        index: position in the block list; part of the z seed, so it must be stable.
        name: the parameter's name in the model, e.g. "model.layers.0.self_attn.q_proj.weight".
        param: the tensor itself, updated in place.
    """

    index: int
    name: str
    param: torch.Tensor

    @property
    def numel(self) -> int:
        """Entries of the full parameter (for a sharded one: of all shards together)."""
        return self.param.numel()

    @property
    def local(self) -> torch.Tensor:
        """The entries this process holds and updates in place: ``param.data``, or a sharded ``DTensor``'s local
        shard (a view of the storage FSDP all-gathers from; read afresh each time, as FSDP may re-point it)."""
        if _is_dtensor(self.param):
            with torch.no_grad():
                return self.param.to_local()
        return self.param.data

    @property
    def span(self) -> tuple[int, int]:
        """``(offset, total)``: ``local.view(-1)`` is entries [offset, offset + local numel) of the flattened full
        parameter of ``total`` entries; ``(0, numel)`` for an ordinary tensor."""
        if _is_dtensor(self.param):
            return shard_span(self.param)
        return 0, self.param.numel()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def is_matrix(self) -> bool:
        """Matrices (and higher) get weight decay; biases and norm gains (1-D) do not, as in MeZO."""
        return self.param.dim() >= 2


_DTENSOR: tuple[type, ...] | None = None  # (DTensor,), or () where torch.distributed is absent; imported on first use


def _is_dtensor(t: torch.Tensor) -> bool:
    global _DTENSOR
    if _DTENSOR is None:
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor

            _DTENSOR = (DTensor,)
        else:
            _DTENSOR = ()
    return isinstance(t, _DTENSOR)


def shard_span(param: torch.Tensor) -> tuple[int, int]:
    """``(offset, total)`` of a ``DTensor``'s local shard in its flattened global tensor (see ``Block.span``).

    Only row shards (``Shard(0)`` and ``Replicate`` placements, as FSDP2 makes) are contiguous ranges of the
    flattened tensor; other layouts (tensor parallelism) are refused.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if any(not isinstance(p, Replicate) and not (isinstance(p, Shard) and p.dim == 0) for p in param.placements):
        raise L2ZOError(
            f"a parameter is sharded as {tuple(param.placements)}; ZO perturbs row shards only "
            "(FSDP2's Shard(0), as --strategy fsdp makes): drop tensor parallelism"
        )
    shape = tuple(param.shape)
    _, offset = compute_local_shape_and_global_offset(shape, param.device_mesh, param.placements)
    row = 1
    for d in shape[1:]:
        row *= d
    return (offset[0] * row if shape else 0), param.numel()


def _named(params: ParamsLike) -> list[tuple[str, torch.Tensor]]:
    if isinstance(params, nn.Module):
        # named_parameters() already skips repeated Parameter objects (tied weights).
        return list(params.named_parameters())
    items = list(params)
    if items and isinstance(items[0], dict):
        raise L2ZOError("ZO optimizers take a model, (name, param) pairs or params, not param groups")
    named = []
    for i, item in enumerate(items):
        if isinstance(item, tuple):
            named.append((str(item[0]), item[1]))
        else:
            named.append((f"param{i}", item))
    return named


def _compile(patterns: str | Sequence[str] | None) -> list[re.Pattern[str]]:
    if patterns is None:
        return []
    if isinstance(patterns, str):
        patterns = [patterns]
    try:
        return [re.compile(p) for p in patterns]
    except re.error as exc:
        raise L2ZOError(
            f"bad block pattern: {exc}. Patterns are Python regular expressions matched with re.search"
        ) from exc


def partition(
    params: ParamsLike,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> list[Block]:
    """Split trainable parameters into blocks, tied weights counted once.

    Args:
        params: a module, ``named_parameters()`` pairs, or bare tensors (named ``param{i}``).
        include: regexes; if given, keep only names matching one of them (``re.search``).
        exclude: regexes; drop names matching any of them (applied after ``include``).

    Returns:
        Blocks in model order, indexed 0..B-1.
    """
    inc, exc = _compile(include), _compile(exclude)
    seen_ids: set[int] = set()
    seen_storage: set[tuple[int, int, tuple[int, ...]]] = set()
    blocks: list[Block] = []
    for name, p in _named(params):
        if not p.requires_grad:
            continue
        if inc and not any(r.search(name) for r in inc):
            continue
        if any(r.search(name) for r in exc):
            continue
        # Two Parameter objects over the same storage are one tensor for ZO purposes: perturbing
        # both would apply z twice.
        held = p.to_local() if _is_dtensor(p) else p  # a shard's storage is its local tensor's
        key = (held.untyped_storage().data_ptr(), held.storage_offset(), tuple(p.shape))
        if id(p) in seen_ids or (p.numel() > 0 and key in seen_storage):
            continue
        seen_ids.add(id(p))
        seen_storage.add(key)
        if not held.is_contiguous():
            raise L2ZOError(f"parameter {name} is not contiguous; call .contiguous() on the model's weights first")
        blocks.append(Block(index=len(blocks), name=name, param=p))
    if not blocks:
        raise L2ZOError("no trainable parameters selected: check requires_grad and the include/exclude patterns")
    return blocks


def fingerprint(blocks: Sequence[Block]) -> str:
    """Architecture fingerprint: sha256 over block names and shapes (not weights, not dtypes).

    A derivative (same architecture, other weights, e.g. an Instruct variant) has the same
    fingerprint; a model with another layer count or width does not.
    """
    h = hashlib.sha256()
    for b in blocks:
        h.update(f"{b.name}:{'x'.join(map(str, b.shape))};".encode())
    return "sha256:" + h.hexdigest()


ADAPTER_NAME = "default"  # the name l2zo gives a peft adapter; peft puts it in its tensors' names


def block_permutation(num_blocks: int, seed: int, groups: Sequence[str] | None = None) -> torch.Tensor:
    """[num_blocks] int64: a fixed shuffle of block indices from ``seed`` (the permutation controls of an allocation:
    the same sigmas on other blocks). The same seed gives the same shuffle on every machine (a CPU generator).

    With ``groups`` ([num_blocks] labels, e.g. each block's ``block_kind``) blocks move only within their group: the
    control that keeps what a group gets (a q_proj's sigma stays on a q_proj) and shuffles which one gets it.
    """
    gen = torch.Generator().manual_seed(int(seed))
    if groups is None:
        return torch.randperm(num_blocks, generator=gen)
    if len(groups) != num_blocks:
        raise L2ZOError(f"block_permutation: {len(groups)} group labels for {num_blocks} blocks")
    perm = torch.arange(num_blocks)
    for label in sorted(set(groups)):  # sorted: the same shuffle whatever order the groups come in
        idx = torch.tensor([i for i, g in enumerate(groups) if g == label])
        perm[idx] = idx[torch.randperm(len(idx), generator=gen)]
    return perm


def block_kind(name: str) -> str:
    """A coarse role for a block from its name, for summaries and role embeddings.

    Returns the last module name before ``.weight``/``.bias`` ("q_proj", "down_proj", "embed_tokens",
    "input_layernorm", ...) with a ``.bias`` suffix for biases; generic, no model-specific table. A PEFT
    adapter's tensor (its name holds the adapter name) is the adapted module and the adapter's part:
    "q_proj.lora_A", "prompt_encoder.embedding".
    """
    parts = name.split(".")
    leaf = parts[-1]
    owners = [p for p in parts[:-1] if not p.isdigit() and p != ADAPTER_NAME]
    if ADAPTER_NAME in parts and len(owners) >= 2:
        return ".".join(owners[-2:]) + (".bias" if leaf == "bias" else "")
    owner = owners[-1] if owners else leaf
    return f"{owner}.bias" if leaf == "bias" else owner


def block_depth(name: str) -> int | None:
    """The first integer component of a block name (the layer index), or None (embeddings, final norm)."""
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None

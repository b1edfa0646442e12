"""Learned-optimizer artifacts: a folder bound to one base-model architecture.

    <dir>/variance_net.safetensors   the net's learned tensors (stacked; no pickle)
    <dir>/l2zo_artifact.json         the manifest (sorted keys): versions, base model, net spec, normalisation, ...
    <dir>/meta_config.yaml           the resolved config that produced it

Loading never unpickles (safetensors, json, yaml.safe_load), checks the weights' sha256 and the
architecture fingerprint (names and shapes of the blocks). The same fingerprint under another model
name (a fine-tuned derivative) warns and loads; another architecture is refused, naming the first
block that differs, unless ``partial=True`` (blocks matched by name and shape; the rest get sigma 1).

An artifact meta-trained with a PEFT adapter (``--peft``) records it as ``base_model.adapter`` (scheme, layout,
the base model's own fingerprint); its blocks are the adapter's tensors. It binds to that base architecture plus
that adapter: a full fine-tuning artifact is refused on an adapter run and vice versa (``check_adapter``).
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import subprocess
import warnings
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
import yaml
from torch import Tensor, nn

import l2zo
from l2zo.engine.blocks import Block, block_kind, fingerprint
from l2zo.errors import L2ZOError
from l2zo.learned.features import (
    FEATURE_NAMES,
    FEATURES_VERSION,
    KNOWN_FEATURES,
    FeatureExtras,
    FeatureRef,
    build_features,
    weight_stats,
)
from l2zo.learned.net import NetSpec, VarianceNet
from l2zo.learned.normalization import block_weights, normalize_sigma
from l2zo.utils.io import atomic_dir
from l2zo.utils.runstatus import one_line

log = logging.getLogger("l2zo")

FORMAT_VERSION = 1
KIND = "per_block_variance_net"
WEIGHTS_FILE = "variance_net.safetensors"
MANIFEST_FILE = "l2zo_artifact.json"
CONFIG_FILE = "meta_config.yaml"
# Manifest keys every reader relies on, and the type each must have.
REQUIRED_KEYS: dict[str, type] = {"format_version": int, "kind": str, "base_model": dict, "net": dict,
                                  "normalization": dict, "weights_sha256": str}  # fmt: skip


class ArtifactWarning(UserWarning):
    """An artifact loads, but something about it deserves attention (e.g. another model name)."""


@dataclass
class LoadedArtifact:
    """A loaded artifact, its net re-mapped to the target blocks' order.

    Attributes:
        net: the variance net, one row per target block.
        manifest: the parsed l2zo_artifact.json.
        unmatched: names of target blocks the artifact has no MLP for (partial loads only).
        sigma_fallback: [B] True for the unmatched blocks (the optimizer gives them raw sigma 1).
    """

    net: VarianceNet
    manifest: dict[str, Any]
    unmatched: list[str] = field(default_factory=list)
    sigma_fallback: list[bool] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def l2zo_version() -> str:
    """``l2zo.__version__``, plus ``+g<short sha>`` when l2zo runs from a git checkout (failure-tolerant)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(l2zo.__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        rev = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        rev = ""
    return f"{l2zo.__version__}+g{rev}" if rev else l2zo.__version__


def architecture_record(blocks: Sequence[Block]) -> dict[str, Any]:
    """``{"fingerprint": ..., "blocks": [[name, shape], ...]}`` for the manifest."""
    return {"fingerprint": fingerprint(blocks), "blocks": [[b.name, list(b.shape)] for b in blocks]}


def sigma_by_kind(block_names: Sequence[str], sigma: Tensor) -> dict[str, float]:
    """Mean of a [B] sigma over the blocks of each kind (``block_kind``), sorted by kind."""
    groups: dict[str, list[float]] = defaultdict(list)
    for name, s in zip(block_names, sigma.detach().double().cpu().tolist(), strict=True):
        groups[block_kind(name)].append(s)
    return {k: sum(v) / len(v) for k, v in sorted(groups.items())}


@torch.no_grad()
def evaluate_sigma(
    net: VarianceNet,
    stats: Tensor,
    n: Tensor,
    *,
    loss: float,
    rule: str = "numel",
    steps: int = 1,
    numel: Tensor | None = None,
) -> Tensor:
    """Effective sigma [B] of ``net`` at fixed weights and L+ = L- = ``loss``, without a model.

    Iterates the sigma_prev recurrence ``steps`` times from sigma_prev = 1 (the paper's start), then
    normalises with ``n`` (rule "none": raw). With ``normalize`` features, ``loss`` is read as relative
    to the first loss and the weights as the initial ones. The weights are the starting ones (drift 0)
    and no step was taken (grad_rms 0).

    Args:
        stats: [B, 2] weight stats; n: [B] block weights; numel: [B] block sizes (log_numel, weight_norm).
    """
    spec = net.spec.features
    ref = FeatureRef(loss0=1.0, var0=stats[:, 1].float()) if spec.normalize else None
    extras = FeatureExtras(numel=numel, drift=torch.zeros(net.num_blocks) if spec.drift else None,
                           static_curvature=getattr(net, "static_curvature", None))  # fmt: skip
    sigma_prev = torch.ones(net.num_blocks)
    for _ in range(max(1, steps)):
        sigma_prev = net(build_features(stats, loss, loss, sigma_prev, spec, ref, extras))
    return sigma_prev if rule == "none" else normalize_sigma(sigma_prev, n)[1]


def artifact_digest(path: str | Path | None) -> str | None:
    """The weights' sha256 that an artifact folder's manifest records (None: no artifact, or not a readable one).

    Runs record it so that a run made with another artifact at the same path is told apart (compare --resume)."""
    if path is None or not Path(path).is_dir():
        return None
    try:
        digest = read_manifest(path).get("weights_sha256")
    except L2ZOError:
        return None
    return digest if isinstance(digest, str) else None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_weights(tensors: dict[str, Tensor], path: Path) -> None:
    # A module-level function so tests can make the save fail midway.
    safetensors.torch.save_file(tensors, str(path))


def save_artifact(
    path: str | Path,
    net: VarianceNet,
    blocks: Sequence[Block],
    *,
    base_model: dict[str, Any],
    meta_config: dict[str, Any],
    meta_record: dict[str, Any],
    normalization: dict[str, Any],
    extra: dict[str, Any] | None = None,
    sigma: Tensor | None = None,
    stats: Tensor | None = None,
    model: nn.Module | None = None,
    overwrite: bool = False,
) -> Path:
    """Write an artifact folder atomically (a temp folder beside ``path``, renamed when complete).

    Args:
        path: the folder to create.
        net: the trained net, one row per block of ``blocks``.
        blocks: the base model's blocks (names and shapes are recorded; their weights give ``weight_stats``).
        base_model: at least ``name``; ``revision`` recommended. Fingerprint and block list are added here.
        meta_config: the resolved meta-training config (written to meta_config.yaml).
        meta_record: tasks, steps, seed, objective, final_meta_loss, wall_time_s, ...
        normalization: ``{"rule": ..., "batch_size": ...}``.
        extra: more top-level manifest keys (may not shadow the standard ones).
        sigma: [B] effective sigma at the end of meta-training, for ``sigma_by_kind``; default: the net
            evaluated once on the base weights with zero losses, normalised with ``normalization``.
        stats: [B, 2] base-model weight stats; default computed from ``blocks`` now.
        model: the base model; with it the block weights n_b of the rule are stored (``l2zo inspect``).
        overwrite: replace an existing folder (only after the new one is complete).
    """
    names = [b.name for b in blocks]
    if net.block_names != names:
        raise L2ZOError("save_artifact: the net's block names differ from the blocks given")
    rule = str(normalization.get("rule", "numel"))
    batch_size = int(normalization.get("batch_size", 16))
    stats = weight_stats(blocks, device="cpu") if stats is None else stats.detach().float().cpu()
    if sigma is None:
        # Without the model the "paper" embedding weights are unknown; numel is the close stand-in for a summary.
        summary_rule = "numel" if rule == "paper" and model is None else rule
        n = block_weights(blocks, summary_rule, model=model, batch_size=batch_size)
        numel = torch.tensor([float(b.numel) for b in blocks])
        sigma = evaluate_sigma(net, stats, n, loss=0.0, rule=rule, numel=numel)
    norm = {**normalization, "rule": rule, "batch_size": batch_size}
    if model is not None:
        norm["block_weights"] = block_weights(blocks, rule, model=model, batch_size=batch_size).tolist()
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "l2zo_version": l2zo_version(),
        "kind": KIND,
        "base_model": {**base_model, **architecture_record(blocks), "num_blocks": len(blocks)},
        "net": {
            **net.spec.to_dict(),
            "feature_names": list(net.spec.features.names()),
            "features_version": FEATURES_VERSION,
            "num_inputs": net.spec.num_inputs,
        },  # fmt: skip
        "normalization": norm,
        "meta_training": dict(meta_record),
        "sigma_by_kind": sigma_by_kind(names, sigma),
        "weight_stats": stats.tolist(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    clash = sorted(set(extra or {}) & (set(manifest) | {"weights_sha256"}))
    if clash:
        raise L2ZOError(f"save_artifact: extra keys {clash} would overwrite standard manifest keys")
    manifest.update(extra or {})
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in net.state_dict().items()}
    with atomic_dir(path, overwrite=overwrite) as tmp:
        _write_weights(tensors, tmp / WEIGHTS_FILE)
        manifest["weights_sha256"] = _sha256(tmp / WEIGHTS_FILE)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump(meta_config, sort_keys=False), encoding="utf-8")
    return Path(path)


def read_manifest(path: str | Path) -> dict[str, Any]:
    """Parse and check the manifest of an artifact folder (format_version, kind); no weights read."""
    path = Path(path)
    file = path / MANIFEST_FILE
    if not file.is_file():
        raise L2ZOError(f"{path} is not an l2zo artifact: {MANIFEST_FILE} not found")
    try:
        manifest = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise L2ZOError(f"{file} is not valid JSON ({exc}); re-export the artifact") from None
    if not isinstance(manifest, dict):
        raise L2ZOError(f"{file} is not a JSON object but a {type(manifest).__name__}; re-export the artifact")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise L2ZOError(
            f"{path}: unknown artifact format_version {version!r}; this l2zo ({l2zo.__version__}) reads "
            f"format_version {FORMAT_VERSION}. Use the l2zo version that wrote it ({manifest.get('l2zo_version', '?')})"
        )
    if manifest.get("kind") != KIND:
        raise L2ZOError(f"{path}: artifact kind {manifest.get('kind')!r} is not {KIND!r}")
    bad = [k for k, tp in REQUIRED_KEYS.items() if not isinstance(manifest.get(k), tp)]
    base, norm = manifest.get("base_model"), manifest.get("normalization")
    if isinstance(base, dict):
        bad += [
            f"base_model.{k}" for k, tp in (("blocks", list), ("fingerprint", str)) if not isinstance(base.get(k), tp)
        ]
        if not isinstance(base.get("adapter") or {}, dict):
            bad.append("base_model.adapter")
    if isinstance(norm, dict) and not isinstance(norm.get("rule"), str):
        bad.append("normalization.rule")
    if bad:
        raise L2ZOError(f"{file} lacks or mistypes the key(s) {', '.join(bad)}: it is incomplete or was edited by "
                        "hand; re-export the artifact")  # fmt: skip
    return manifest


def read_artifact(path: str | Path) -> tuple[VarianceNet, dict[str, Any]]:
    """The net on the artifact's own blocks, and the manifest; checks format and the weights' sha256."""
    path = Path(path)
    manifest = read_manifest(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        raise L2ZOError(f"{path}: {WEIGHTS_FILE} not found")
    if _sha256(weights) != manifest.get("weights_sha256"):
        raise L2ZOError(
            f"{weights}: sha256 does not match the manifest; the file is corrupted or was modified. "
            "Re-download or re-export the artifact"
        )
    spec = spec_from_manifest(manifest, path)
    try:
        net = VarianceNet(spec, [n for n, _ in manifest["base_model"]["blocks"]])
    except (TypeError, ValueError, KeyError) as exc:
        raise L2ZOError(
            f"{path}: the manifest's net spec is not valid ({one_line(exc)}); re-export the artifact"
        ) from None
    try:
        tensors = safetensors.torch.load_file(str(weights))
        net.load_state_dict(tensors, strict=True)
    except (safetensors.SafetensorError, RuntimeError, OSError, ValueError) as exc:
        # A sha256 that matches bad weights: the manifest was re-hashed over a broken file.
        raise L2ZOError(f"{weights} is not a valid variance net ({one_line(exc)}); re-export the artifact") from None
    return net, manifest


def spec_from_manifest(manifest: Mapping[str, Any], path: str | Path) -> NetSpec:
    """The net spec an artifact records, refused unless this l2zo computes exactly its ordered feature list.

    Artifacts written before the feature list was versioned record no ``features_version`` and read as version 1
    (the paper's five features; with them they behave as they always did).
    """
    net_d = dict(manifest["net"])
    names = net_d.pop("feature_names", list(FEATURE_NAMES))
    version = net_d.pop("features_version", 1)
    net_d.pop("num_inputs", None)
    written = f"the l2zo version that wrote it ({manifest.get('l2zo_version', '?')})"
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= FEATURES_VERSION:
        raise L2ZOError(f"{path}: unknown features_version {version!r} (this l2zo knows 1 to {FEATURES_VERSION}); "
                        f"use {written}, or re-meta-train the artifact with this one")  # fmt: skip
    if not isinstance(names, list) or not all(isinstance(x, str) for x in names):
        raise L2ZOError(f"{path}: net.feature_names is not a list of names; re-export the artifact")
    unknown = [x for x in names if x not in KNOWN_FEATURES]
    if unknown:
        raise L2ZOError(f"{path}: the net was trained on feature(s) {', '.join(unknown)} that this l2zo does not "
                        f"compute; use {written}, or re-meta-train the artifact with this one")  # fmt: skip
    try:
        spec = NetSpec.from_dict(net_d)
    except (TypeError, ValueError, KeyError) as exc:
        raise L2ZOError(
            f"{path}: the manifest's net spec is not valid ({one_line(exc)}); re-export the artifact"
        ) from None
    if list(names) != list(spec.features.names()):
        raise L2ZOError(f"{path}: the net was trained on features {names}, but its spec gives {list(spec.features.names())}"
                        f" in this l2zo; use {written}, or re-meta-train the artifact with this one")  # fmt: skip
    return spec


def _first_difference(src: Sequence[tuple[str, tuple[int, ...]]], dst: Sequence[Block]) -> str:
    for i in range(max(len(src), len(dst))):
        a = src[i] if i < len(src) else None
        b = (dst[i].name, dst[i].shape) if i < len(dst) else None
        if a != b:
            fmt = lambda x: "nothing" if x is None else f"{x[0]!r} {list(x[1])}"  # noqa: E731
            return f"block {i}: the artifact has {fmt(a)}, this model has {fmt(b)}"
    return "no block differs (fingerprint collision?)"


def adapter_text(adapter: Mapping[str, Any] | None) -> str:
    """'full fine-tuning', 'a lora adapter (r=8 on q_proj,v_proj)', 'a prefix adapter (5 virtual tokens)'."""
    if not adapter:
        return "full fine-tuning"
    if adapter.get("peft") == "lora":
        targets = adapter.get("target_modules")
        shown = ",".join(targets) if isinstance(targets, list) else str(targets)
        return f"a lora adapter (r={adapter.get('r')} on {shown})"
    return f"a {adapter.get('peft')} adapter ({adapter.get('num_virtual_tokens')} virtual tokens)"


def _peft_flags(adapter: Mapping[str, Any] | None) -> str:
    """'with' the flags that give a run ``adapter``'s layout, or 'without --peft'."""
    if not adapter:
        return "without --peft"
    if adapter.get("peft") == "lora":
        targets = adapter.get("target_modules")
        shown = ",".join(targets) if isinstance(targets, list) else str(targets)
        return f"with --peft lora --peft-rank {adapter.get('r')} --peft-target-modules {shown}"
    return f"with --peft {adapter.get('peft')} --peft-virtual-tokens {adapter.get('num_virtual_tokens')}"


LAYOUT_KEYS = ("peft", "r", "target_modules", "num_virtual_tokens")  # an adapter's tensors follow from these


def check_adapter(path: str | Path, manifest: Mapping[str, Any], adapter: Mapping[str, Any] | None,
                  partial: bool = False) -> None:  # fmt: skip
    """Refuse an artifact meta-trained for another adapter scheme (full fine-tuning included) or, with an adapter,
    on another base architecture; without ``partial``, also for another adapter layout (rank, target modules,
    virtual tokens). ``adapter``: the run's ``model.l2zo_adapter`` record (None: full fine-tuning)."""
    base = manifest["base_model"]
    theirs = base.get("adapter") or None
    name = base.get("name", "?")
    scheme = lambda a: a.get("peft") if a else None  # noqa: E731
    if scheme(theirs) != scheme(adapter):
        raise L2ZOError(f"artifact {path} was meta-trained for {adapter_text(theirs)} of {name}; this run uses "
                        f"{adapter_text(adapter)}: run {_peft_flags(theirs)}, or meta-train an artifact "
                        f"{_peft_flags(adapter)}")  # fmt: skip
    if adapter is None:
        return
    if theirs.get("base_fingerprint") != adapter.get("base_fingerprint"):
        raise L2ZOError(f"artifact {path} was meta-trained for {adapter_text(theirs)} on {name}, a base model of "
                        "another architecture than this run's; meta-train one on this model")  # fmt: skip
    differs = [k for k in LAYOUT_KEYS if theirs.get(k) != adapter.get(k)]
    if differs and not partial:
        raise L2ZOError(f"artifact {path} was meta-trained for {adapter_text(theirs)}; this run trains "
                        f"{adapter_text(adapter)}: run {_peft_flags(theirs)}")  # fmt: skip


def load_artifact(
    path: str | Path,
    blocks: Sequence[Block],
    *,
    model_name: str | None = None,
    partial: bool = False,
    adapter: Mapping[str, Any] | None = None,
) -> LoadedArtifact:
    """Load an artifact for ``blocks`` (the target model's blocks, in optimizer order).

    ``adapter``: the run's PEFT adapter record (``l2zo.models.adapters``; None: full fine-tuning). An artifact is
    bound to its adapter scheme, and with an adapter to the base architecture and the adapter's layout
    (``check_adapter``), then to the blocks' names and shapes (the fingerprint).

    Raises:
        L2ZOError: unknown format, bad checksum, another adapter, or another architecture without ``partial``.
    """
    net, manifest = read_artifact(path)
    check_adapter(path, manifest, adapter, partial)
    base = manifest["base_model"]
    src = [(str(n), tuple(int(d) for d in s)) for n, s in base["blocks"]]
    if fingerprint(blocks) == base["fingerprint"]:
        if model_name and base.get("name") and model_name != base["name"]:
            warnings.warn(
                f"artifact {path} was meta-trained on {base['name']!r}; using it on {model_name!r}, which has the "
                "same architecture (fingerprint match)",
                ArtifactWarning,
                stacklevel=2,
            )
        return LoadedArtifact(net=net, manifest=manifest, unmatched=[], sigma_fallback=[False] * len(blocks))
    if not partial:
        raise L2ZOError(
            f"artifact {path} was meta-trained for another architecture ({base.get('name', '?')}, {len(src)} blocks; "
            f"this model has {len(blocks)}): {_first_difference(src, blocks)}. To use the blocks that match by name "
            "and shape (the others get sigma 1), pass partial=True (`--opt-args partial=true` on the CLI)"
        )
    index = {name: (i, shape) for i, (name, shape) in enumerate(src)}
    pairs, unmatched = [], []
    for j, b in enumerate(blocks):
        hit = index.get(b.name)
        if hit is not None and hit[1] == b.shape:
            pairs.append((hit[0], j))
        else:
            unmatched.append(b.name)
    if not pairs:
        raise L2ZOError(f"artifact {path}: no block of this model matches one of the artifact by name and shape")
    target = VarianceNet(net.spec, [b.name for b in blocks])
    target.copy_rows_from(net, pairs)
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f", ... (+{len(unmatched) - 5})" if len(unmatched) > 5 else "")
        log.warning(
            "partial artifact load: %d of %d blocks unmatched, given sigma 1: %s", len(unmatched), len(blocks), shown
        )
    matched = {j for _, j in pairs}
    fallback = [j not in matched for j in range(len(blocks))]
    return LoadedArtifact(net=target, manifest=manifest, unmatched=unmatched, sigma_fallback=fallback)


def stored_stats(manifest: Mapping[str, Any]) -> Tensor:
    """The base model's [B, 2] weight stats recorded in the manifest."""
    return torch.tensor(manifest["weight_stats"], dtype=torch.float32)

"""``l2zo inspect DIR``: what a learned-optimizer artifact is, and what sigma it gives each block kind.

No model is needed: the net is evaluated on the base model's weight stats stored in the manifest,
with L+ = L- = L for a few representative loss levels, iterating its sigma_prev recurrence a few
steps from 1 (the released ZO Fine-tuner nets change markedly with the loss level, reference §7).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from l2zo.cli.parser import CommandParser, command_parser
from l2zo.engine.blocks import block_kind

LOSS_LEVELS: tuple[float, ...] = (0.0, 0.7, 2.0)
RECURRENT_STEPS = 10


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "-"
    return "-" if value is None else str(value)


def _print_summary(manifest: dict[str, Any]) -> None:
    from l2zo.learned.artifact import adapter_text

    base, net, norm = manifest["base_model"], manifest["net"], manifest["normalization"]
    meta = manifest.get("meta_training", {})
    rows = {
        "format": f"{manifest['format_version']} ({manifest['kind']}), "
        f"written by l2zo {manifest.get('l2zo_version', '?')} on {manifest.get('created', '?')}",
        "base model": f"{base.get('name', '?')} @ {base.get('revision') or '-'}, {base['num_blocks']} blocks, "
        f"fingerprint {base['fingerprint'][:19]}...",
        "adapter": adapter_text(base.get("adapter")),
        "net": ", ".join(f"{k}={v}" for k, v in net.items() if k not in ("feature_names",)),
        "features": _fmt(net.get("feature_names")),
        "normalization": f"{norm['rule']} (batch_size {norm.get('batch_size', '?')})",
    }
    for key in ("tasks", "steps", "seed", "objective", "final_meta_loss", "wall_time_s"):
        if key in meta:
            rows[f"meta {key}"] = _fmt(meta[key])
    width = max(map(len, rows))
    for k, v in rows.items():
        print(f"{k:<{width}}  {v}")


def sigma_table(net: Any, manifest: dict[str, Any]) -> dict[str, list[float]]:
    """Mean effective sigma per block kind at each of ``LOSS_LEVELS``: ``{kind: [sigma at L, ...]}``."""
    from l2zo.learned.artifact import evaluate_sigma, stored_stats

    stats = stored_stats(manifest)
    norm = manifest["normalization"]
    # The n_b of the "paper" rule need the model (embeddings); an artifact saved without it falls back to numel.
    weights = norm.get("block_weights") or [
        float(torch.tensor(shape).prod()) / 1e6 for _, shape in manifest["base_model"]["blocks"]
    ]
    n = torch.tensor(weights, dtype=torch.float64)
    numel = torch.tensor([float(torch.tensor(shape).prod()) for _, shape in manifest["base_model"]["blocks"]])
    kinds = [block_kind(name) for name in net.block_names]
    table: dict[str, list[float]] = defaultdict(list)
    for loss in LOSS_LEVELS:
        sigma = evaluate_sigma(net, stats, n, loss=loss, rule=norm["rule"], steps=RECURRENT_STEPS, numel=numel).tolist()
        groups: dict[str, list[float]] = defaultdict(list)
        for kind, s in zip(kinds, sigma, strict=True):
            groups[kind].append(s)
        for kind, values in groups.items():
            table[kind].append(sum(values) / len(values))
    return dict(sorted(table.items()))


def run_inspect(path: str) -> int:
    from l2zo.learned.artifact import read_artifact

    net, manifest = read_artifact(path)  # checks format_version and the weights' sha256
    print(f"artifact {path}")
    _print_summary(manifest)
    table = sigma_table(net, manifest)
    recorded = manifest.get("sigma_by_kind", {})
    counts: dict[str, int] = defaultdict(int)
    for name in net.block_names:
        counts[block_kind(name)] += 1
    print(
        f"\nsigma by block kind: mean effective sigma (c * sigma), net on the stored weight stats, L+ = L- = L, "
        f"{RECURRENT_STEPS} recurrent steps from sigma_prev = 1; 'meta' = recorded at the end of meta-training"
    )
    # a --kind-scale net also shows its learned table: the factor exp(kind_log_scale) on the untrained-shape output
    scale = dict(zip(net.kinds, net.kind_log_scale.detach().exp().tolist(), strict=True)) if net.spec.kind_scale else {}
    header = ["kind", "blocks", *(f"L={loss:g}" for loss in LOSS_LEVELS), "meta", *(["table"] if scale else [])]
    width = max(len(header[0]), *(len(k) for k in table))
    print(f"{header[0]:<{width}}  " + "  ".join(f"{h:>8}" for h in header[1:]))
    for kind, values in table.items():
        meta = recorded.get(kind)
        meta_cell = f"{meta:>8.4g}" if meta is not None else f"{'-':>8}"
        cells = [f"{counts[kind]:>8d}", *(f"{v:>8.4g}" for v in values), meta_cell]
        cells += [f"{scale[kind]:>8.4g}"] if scale else []
        print(f"{kind:<{width}}  " + "  ".join(cells))
    return 0


def register(cli: CommandParser) -> None:
    text = "summarise a learned-optimizer artifact and its sigma per block kind"
    p = command_parser(description=text)
    p.add_argument("dir", type=str, help="the artifact folder (with l2zo_artifact.json)")
    cli.add_command("inspect", p, lambda args: run_inspect(args.dir), help=text)

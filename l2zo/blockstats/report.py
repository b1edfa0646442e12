"""Markdown tables and files of a ``run_probe`` result: per block, per allocation, per block kind."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from l2zo.utils.io import atomic_dir, write_json_atomic, write_text_atomic


def _g(x: float) -> str:
    return "nan" if isinstance(x, float) and math.isnan(x) else f"{x:.3g}"


def _pm(x: float, se: float) -> str:
    return _g(x) if math.isnan(se) else f"{_g(x)} ± {_g(se)}"


def blocks_table(result: dict[str, Any]) -> str:
    """One row per block: n_b, G_b, noise, tau_b (± standard errors), G_b / tau_b and every allocation's s_b."""
    names = list(result["sigma"])
    head = ["block", "kind", "n_b", "G_b", "noise", "tau_b (H)", "F_b", "G_b/F_b", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["blocks"]:
        ratio = row["G"] / row["fisher"] if row["fisher"] > 0 else math.nan
        sig = [_g(result["sigma"][a][row["name"]]) for a in names]
        lines.append("| " + " | ".join([row["name"], row["kind"], str(row["n"]), _pm(row["G"], row["G_se"]),
                                        _pm(row["noise"], row["noise_se"]), _pm(row["tau"], row["tau_se"]),
                                        _pm(row["fisher"], row["fisher_se"]), _g(ratio), *sig]) + " |")  # fmt: skip
    return "\n".join(lines)


def allocations_table(result: dict[str, Any]) -> str:
    """One row per allocation: A and V; T, Bq and R with the Hessian (Hutchinson) and with the Fisher, pooled and
    per state; the K-step prediction (in the curvature the oracles used)."""
    alloc = result["allocations"]
    states = list(alloc["per_state"])
    fisher = bool(alloc["fisher"])
    head = ["allocation", "A", "V", "T (H)", "Bq (H)", "R (H)", *[f"R (H) @{s}" for s in states]]
    if fisher:
        head += ["T (F)", "Bq (F)", "R (F)", *[f"R (F) @{s}" for s in states]]
    head += [f"eta_K (K={result['config']['horizon']})", "f_K / f_0", "R_K"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, p in alloc["hessian"].items():
        row = [f"`{name}`", _g(p["A"]), _g(p["V"]), _g(p["T"]), _g(p["Bq"]), f"**{p['R']:.3g}**",
               *[_g(alloc["per_state"][s][name]["R"]) for s in states]]  # fmt: skip
        if fisher:
            f = alloc["fisher"][name]
            row += [_g(f["T"]), _g(f["Bq"]), f"**{f['R']:.3g}**",
                    *[_g(alloc["per_state_fisher"][s][name]["R"]) for s in states]]  # fmt: skip
        k = alloc["kstep"][name]
        row += [_g(k["eta"]), _g(k["fK"] / k["f0"]) if k["f0"] > 0 else "nan", f"{k['R_K']:.3g}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def kinds_table(result: dict[str, Any]) -> str:
    """Mean s_b per block kind for every allocation (which kinds an allocation favours, per element)."""
    kinds: dict[str, list[str]] = defaultdict(list)
    for row in result["blocks"]:
        kinds[row["kind"]].append(row["name"])
    names = list(result["sigma"])
    head = ["kind", "blocks", "mean n_b", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    n_of = {row["name"]: row["n"] for row in result["blocks"]}
    for kind, members in sorted(kinds.items()):
        means = [_g(sum(result["sigma"][a][m] for m in members) / len(members)) for a in names]
        mean_n = sum(n_of[m] for m in members) / len(members)
        lines.append("| " + " | ".join([kind, str(len(members)), f"{mean_n:.0f}", *means]) + " |")
    return "\n".join(lines)


def zo_section(result: dict[str, Any]) -> list[str]:
    """The forward-only G (``--zo-probes``): its cost and its agreement with the backprop G; [] without it."""
    zo = result.get("zo")
    if zo is None:
        return []
    return [
        "## Forward-only G",
        "",
        (f"G_b from block-restricted antithetic probes ({zo['probes']} per block and batch pair, {zo['pairs']} pairs): "
         f"{zo['forwards']} forwards in all ({zo['forwards_per_pair']} a pair). Correlation of its log gradient "
         f"shares with the backprop G's: {zo['share_corr']:+.2f}. `gsl-zo` is the GS-L oracle with this G and the "
         "probe's own curvature."
         + (f" The same probes at labels drawn from the model give tr(F_bb) forward-only (log per-element correlation "
            f"with the backprop Fisher's: {zo['fisher']['corr']:+.2f}); `gsl-zo-fisher` is the oracle from both "
            "forward-only halves." if zo.get("fisher") else "")),
        "",
    ]  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    cfg = result["config"]
    states = ", ".join(result["states"])
    losses = ", ".join(f"{s}: {v['loss']:.4f}" for s, v in result["states"].items())
    return "\n".join([
        f"# probe-blocks: `{cfg['model']}` on `{result['task']}`",
        "",
        (f"States (MeZO steps at lr {cfg['mezo_lr']:g}): {states}; minibatch loss {losses}. "
         f"{cfg['pairs']} batch pairs of {cfg['batch_size']} per state, {cfg['probes']} Hutchinson probes, "
         f"{cfg['gHg_probes']} gHg probes and {cfg['fisher_samples']} Fisher samples per batch pair; "
         f"{result['num_blocks']} blocks; {result['wall_time_s']:.0f} s."),
        "",
        "## Allocations",
        "",
        "R = A²/(2((A+V)T+2Bq)) over MeZO's, each at its own one-step optimal eta, on the statistics pooled over the "
        "states (and per state @step), with the curvature T, Bq from the Hessian (H: Hutchinson, unbiased but "
        "unresolved on most blocks) or from the Fisher (F: positive). f_K/f_0 and R_K: the two-scale block-separable "
        f"quadratic (gradient direction at curvature rho_b, bulk at tau_b/n_b) fitted to the pooled statistics "
        f"({result['curvature']} curvature), {cfg['horizon']} steps, eta re-tuned per allocation (eta_K); R_K = its "
        "predicted loss decrease over MeZO's. The oracles use the "
        f"{result['curvature']} curvature: "
        + "; ".join(f"{k} {', '.join(f'{p}={v:.3g}' for p, v in ps.items())}" for k, ps in result["oracle_params"].items())
        + ".",
        "",
        allocations_table(result),
        "",
        *zo_section(result),
        "## Mean s_b per block kind",
        "",
        kinds_table(result),
        "",
        "## Blocks (pooled over states; ± one standard error)",
        "",
        blocks_table(result),
        "",
    ])  # fmt: skip


def write_outputs(result: dict[str, Any], folder: str | Path) -> Path:
    """probe.json, probe.md and sigma/<allocation>.json (``fixed-sigma`` files) into ``folder``, each file whole:
    the sigma folder first (replaced as one), probe.json last, so a probe.json present means all of it is there."""
    folder = Path(folder)
    with atomic_dir(folder / "sigma", overwrite=True) as tmp:
        for name, mapping in result["sigma"].items():
            write_json_atomic(tmp / f"{name}.json", mapping)
    write_text_atomic(folder / "probe.md", markdown(result))
    write_json_atomic(folder / "probe.json", result)
    return folder

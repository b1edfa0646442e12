"""Does one per-block allocation serve several tasks? The GS-L oracle of each probed task, its split-half
reliability, and the correlations between tasks (``l2zo.blockstats.transfer``).

    python scripts/allocation_transfer.py runs/probe/synth-size runs/probe/synth-category ... [--out transfer.md]

Each argument is the --output folder of a finished `l2zo probe-blocks` of one model (its pairs/ and probe.json).
Exit 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from l2zo.blockstats.allocations import permute_sigma
from l2zo.blockstats.transfer import (
    VARIANTS,
    agreement,
    cross_gain,
    decompose_gain,
    kstep_scorer,
    leave_one_out_consensus,
    leave_one_out_gain,
    leave_one_out_kstep,
    leave_one_out_variants,
    log_curvature,
    log_gradient_share,
    oracle_log_s,
    pooled_stats,
    read_pairs,
    read_zo,
    split_half,
    zo_budget_gain,
)
from l2zo.errors import L2ZOError
from l2zo.optim.methods.fixed_sigma import write_sigma_file
from l2zo.utils.io import write_text_atomic

ZO_BUDGETS = (1, 2, 4, 8, 16, 48)


def saved_log_s(folder: Path, label: str, names: list[str], floor: float = 1e-3) -> torch.Tensor:
    """log s_b of an allocation the probe wrote (sigma/<label>.json: block name -> s_b), in block order. [B]"""
    path = folder / "sigma" / f"{label}.json"
    if not path.is_file():
        have = sorted(p.stem for p in (folder / "sigma").glob("*.json"))
        raise L2ZOError(f"{folder} has no allocation {label!r}; it has {', '.join(have) or 'none'}")
    s = json.loads(path.read_text())
    return torch.log(torch.tensor([float(s[n]) for n in names], dtype=torch.float64).clamp_min(floor))


def matrix(title: str, labels: list[str], m: torch.Tensor, fmt: str = "+.2f") -> list[str]:
    return [title, "", "| | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 1),
            *[f"| {t} | " + " | ".join(f"{float(m[i, j]):{fmt}}" for j in range(len(labels))) + " |"
              for i, t in enumerate(labels)], ""]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probes", nargs="+", type=Path, help="probe-blocks output folders, one per task")
    ap.add_argument("--temperature", type=float, default=0.5, help="GS-L temperature T: s^2 ~ (G/tau)^(1/T)")
    ap.add_argument("--curvature", choices=("fisher", "hessian"), default="fisher")
    ap.add_argument("--horizon", type=int, default=300, help="K of the K-step scores R_K (the fine-tune's steps)")
    ap.add_argument("--allocation", action="append", default=[], metavar="LABEL",
                    help="also correlate across tasks an allocation the probes wrote (sigma/LABEL.json, e.g. "
                         "learned-1); repeat for several")  # fmt: skip
    ap.add_argument("--kstep-opt", metavar="TASKS", default="",
                    help="comma-separated tasks (as probe-blocks named them, or 'all'): for each, the allocation that "
                         "maximises R_K on its own statistics (kopt-own) and the one that maximises the mean log R_K "
                         "over the other probes' (kopt-others, a static allocation learned without the task); about "
                         "a minute per task and probe on one core")  # fmt: skip
    ap.add_argument("--kstep-iters", type=int, default=300, help="gradient steps of each --kstep-opt allocation")
    ap.add_argument("--out", type=Path, help="also write the tables (markdown) here")
    ap.add_argument("--write-sigma", type=Path, metavar="DIR",
                    help="write each task's oracle (DIR/oracle-<task>.json) and the consensus of the other tasks' "
                         "oracles (DIR/consensus-<task>.json) and the task's G with the other tasks' curvature "
                         "(DIR/own-g-<task>.json; with a forward-only G, DIR/zo-g-<task>.json and zo-own-<task>.json too; "
                         "with --kstep-opt, DIR/kopt-own-, kopt-others- and kopt-permuted-<task>.json) "
                         "as fixed-sigma files "
                         "(block name -> s_b)")  # fmt: skip
    a = ap.parse_args(argv)
    kw = {"temperature": a.temperature, "curvature": a.curvature}
    log_s, reliability, stats, names_of, task_of = {}, {}, {}, None, {}
    zo: dict[str, list] = {}  # task -> its forward-only G per batch pair (probe-blocks --zo-probes), if measured
    saved: dict[str, dict[str, torch.Tensor]] = {label: {} for label in a.allocation}
    try:
        for folder in a.probes:
            meta = folder / "probe.json"
            if not meta.is_file():
                raise L2ZOError(f"{folder} holds no probe.json: pass the --output folder of a finished probe-blocks")
            probe = json.loads(meta.read_text())
            names = [b["name"] for b in probe["blocks"]]
            if names_of is not None and names != names_of:
                raise L2ZOError(f"{folder} probes other blocks than {a.probes[0]}: compare probes of one model")
            names_of = names
            numels = [int(b["n"]) for b in probe["blocks"]]
            label = f"{probe['task']} @ {Path(str(probe['model_name_or_path'])).name}"
            if label in log_s:
                raise L2ZOError(f"two probes of {label}: pass one probe per task and model")
            task_of[label] = str(probe["task"])
            if a.write_sigma and list(task_of.values()).count(task_of[label]) > 1:
                raise L2ZOError(f"two probes of task {task_of[label]}: --write-sigma names its files by task; "
                                "pass the probes of one model")  # fmt: skip
            pairs = read_pairs(folder / "pairs", len(names))
            log_s[label] = oracle_log_s(names, numels, [p for *_, p in pairs], **kw)  # type: ignore[arg-type]
            reliability[label] = split_half(names, numels, pairs, **kw)
            stats[label] = pooled_stats(names, numels, [p for *_, p in pairs], a.curvature)
            if found := [e for *_, e in read_zo(folder / "pairs", len(names))]:
                zo[label] = found
            for alloc in a.allocation:
                saved[alloc][label] = saved_log_s(folder, alloc, names)
    except L2ZOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    labels = list(log_s)
    wanted = [t for t in a.kstep_opt.split(",") if t]
    if wanted == ["all"]:
        wanted = list(task_of.values())
    kopt = {}
    try:
        by_task = {task_of[t]: t for t in labels}
        missing = [t for t in wanted if t not in by_task]
        if missing:
            raise L2ZOError(f"--kstep-opt names task(s) not probed here: {', '.join(missing)} (probed: "
                            f"{', '.join(by_task)})")  # fmt: skip
        if wanted:
            kopt = leave_one_out_kstep(stats, a.horizon, [by_task[t] for t in wanted], a.kstep_iters)
    except L2ZOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    lines = [f"GS-L oracle (T = {a.temperature}, {a.curvature} curvature), log s_b per block.", "",
             "| task | split-half r (even vs odd batch pairs) |", "|---|---|",
             *[f"| {t} | {reliability[t]:.2f} |" for t in labels], "",
             *matrix("Correlation between the tasks' oracles:", labels, agreement(log_s))]  # fmt: skip
    loo = leave_one_out_gain(log_s, stats) if len(labels) > 1 else {}
    lines += matrix("R over MeZO of the row task's oracle on the column task's statistics (diagonal: the task's own):",
                    labels, cross_gain(log_s, stats), ".2f")  # fmt: skip
    if loo:
        lines += ["R over MeZO of the consensus of the other tasks' oracles (exp of their mean log s_b), on each task:",
                  "", "| task | R |", "|---|---|", *[f"| {t} | {r:.2f} |" for t, r in loo.items()], ""]  # fmt: skip
    zo_G = {t: torch.stack([e.G for e in v]).mean(dim=0) for t, v in zo.items()}
    zo_F = {t: torch.stack([e.fisher for e in v]).mean(dim=0) for t, v in zo.items()
            if a.curvature == "fisher" and all(e.fisher is not None for e in v)}  # fmt: skip
    if len(labels) > 1:
        parts = decompose_gain(stats, a.temperature, measured_G=zo_G, horizon=a.horizon, measured_F=zo_F)
        lines += ["Which half of the oracle is the task's: R over MeZO on each task of GS-L with the task's own G and",
                  "curvature, its own G with the other tasks' consensus curvature (own-G), the consensus gradient",
                  "shares with its own curvature (own-curvature), both from the other tasks (neither), and own-G",
                  "with the G measured by forward passes alone (zo-G; probe-blocks --zo-probes, all pairs):", "",
                  "| task | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|",
                  *[f"| {t} | " + " | ".join(f"{r[k]:.2f}" if k in r else "-" for k in VARIANTS)
                    + " |" for t, r in parts.items()], "",
                  f"The same allocations scored by R_K, the {a.horizon}-step expected loss decrease over MeZO's under",
                  "the two-scale block-quadratic model of the task's statistics (the probe's K-step prediction; it",
                  "sees a block's gradient deplete as the steps spend it, which the one-step R does not):", "",
                  "| task | " + " | ".join(VARIANTS) + " |", "|---" * (len(VARIANTS) + 1) + "|",
                  *[f"| {t} | " + " | ".join(f"{r[k + '@K']:.2f}" if k + "@K" in r else "-" for k in VARIANTS)
                    + " |" for t, r in parts.items()], ""]  # fmt: skip
        if zo:
            budgets = zo_budget_gain(stats, zo, ZO_BUDGETS, a.temperature, horizon=a.horizon)
            lines += ["The forward-only allocations from the first P batch pairs of the probe (state 0 first: what a",
                      "fine-tune would measure at its start): zo-G (forward-only G, the other tasks' curvature) and,",
                      "where the Fisher was measured, zo-own (both halves forward-only); R / R_K, and the forwards:", "",
                      "| task | variant | " + " | ".join(f"P = {p}" for p in ZO_BUDGETS) + " |",
                      "|---|---" + "|---" * len(ZO_BUDGETS) + "|"]  # fmt: skip
            for t, b in budgets.items():
                for name in ("zo-G", "zo-own"):
                    if not any(name in row for row in b.values()):
                        continue
                    cells = [f"{b[p][name]:.2f} / {b[p][name + '@K']:.2f} ({b[p]['forwards']:.0f} fwd)"
                             if p in b and name in b[p] else "-" for p in ZO_BUDGETS]  # fmt: skip
                    lines.append(f"| {t} | {name} | " + " | ".join(cells) + " |")
            lines.append("")
        lines += matrix("Correlation between the tasks of the per-element curvature (log tau_b / n_b):", labels,
                        agreement({t: log_curvature(s) for t, s in stats.items()}))  # fmt: skip
        lines += matrix("Correlation between the tasks of the gradient shares (log G_b / sum G):", labels,
                        agreement({t: log_gradient_share(s) for t, s in stats.items()}))  # fmt: skip
    if kopt:
        lines += [f"The allocations that maximise R_K ({a.horizon} steps) directly (l2zo.blockstats.kstep_opt): on the",
                  "task's own statistics (kopt-own), and on the other probes' together (kopt-others: the mean log R_K",
                  "over them, a static allocation that never saw the task), each scored by R_K on the task; beside",
                  "them, kopt-others' R_K on the tasks it was fitted to, its effective number of blocks",
                  "(1 / sum of squared energy shares n_b s_b^2 / sum n s^2), and the R_K on the task of the same",
                  "sigmas shuffled across blocks (kopt-permuted, seed 0: what the assignment to blocks is worth):", "",
                  "| task | kopt-own | kopt-others | kopt-others on the others (mean) | blocks (kopt-others) "
                  "| kopt-permuted |", "|---|---|---|---|---|---|"]  # fmt: skip
        for t, k in kopt.items():
            s_o = k["kopt-others"].s
            energy = stats[t].n * s_o**2 / float((stats[t].n * s_o**2).sum())
            fitted = sum(k["kopt-others"].ratios) / len(k["kopt-others"].ratios)
            score = kstep_scorer(stats[t], a.horizon)
            lines.append(
                f"| {t} | {k['kopt-own'].ratios[0]:.2f} | {score(s_o):.2f} | {fitted:.2f} | "
                f"{1 / float((energy**2).sum()):.1f} | {score(permute_sigma(s_o, stats[t].n)):.2f} |"
            )
        lines.append("")
    for alloc in a.allocation:
        lines += matrix(f"Correlation between the tasks of `{alloc}`'s allocation (log s_b):", labels,
                        agreement(saved[alloc]))  # fmt: skip
    text = "\n".join(lines)
    if a.write_sigma and len(labels) > 1:
        a.write_sigma.mkdir(parents=True, exist_ok=True)
        consensus = leave_one_out_consensus(log_s)
        own_g = leave_one_out_variants(stats, a.temperature, measured_G=zo_G, measured_F=zo_F)
        for t in labels:
            kinds = [("oracle", torch.exp(log_s[t])), ("consensus", consensus[t]), ("own-g", own_g[t]["own-G"])]
            kinds += [(k.lower(), own_g[t][k]) for k in ("zo-G", "zo-own") if k in own_g[t]]
            kinds += [(k, v.s) for k, v in kopt.get(t, {}).items()]
            if t in kopt:
                kinds.append(("kopt-permuted", permute_sigma(kopt[t]["kopt-others"].s, stats[t].n)))
            for kind, s in kinds:
                write_sigma_file(a.write_sigma / f"{kind}-{task_of[t]}.json", names_of or [], s)
    print(text, end="")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

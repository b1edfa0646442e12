"""Do the blocks' gradients remove one loss or several? The separable K-step model against the coupled one, on
allocations whose held-out runs were measured.

    python scripts/kstep_coupling.py runs/recipes/transfer-probes/derived-synth-color \\
        --gram runs/recipes/gram/synth-color.pt --horizon 300 \\
        --allocation gsl-own=runs/.../sigma/gsl.json --allocation kopt-meta=... \\
        --measured docs/results/oracle-tiny/summary.csv --out docs/results/oracle-tiny/coupling-synth-color.md

The first argument is the --output folder of a finished `l2zo probe-blocks` (its pairs give the bulk: n, the
Fisher curvature, the minibatch noise). The Hessian Gram of the block gradients (``l2zo.blockstats.probe_gram``:
one HVP per block and chunk of the train split, at the initial state) is measured once and kept in --gram.
Each allocation is scored by R_K under both models (eta re-tuned for each), beside the measured decrease of
its held-out runs over MeZO's, (dev loss at step 0 - final) / (the same for mezo), read from a compare's
summary.csv. --kstep-opt fits the allocation that maximises the coupled R_K: on PROBE's own task
(kopt-coupled-own), or with --fit-on on other tasks' probes and Grams (kopt-coupled-meta, the mean log R_K over
them: one static allocation learned from the meta-training tasks). Exit 2 with one line on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from l2zo.blockstats.allocations import permute_sigma
from l2zo.blockstats.coupled import CoupledModel, coupled_kstep
from l2zo.blockstats.coupling_stats import Gram
from l2zo.blockstats.gain import QuadraticModel, kstep, normalize
from l2zo.blockstats.kstep_opt import kstep_optimal
from l2zo.blockstats.probe import ProbeConfig, probe_gram
from l2zo.blockstats.stats import BlockStats
from l2zo.blockstats.transfer import pearson, pooled_stats, read_pairs
from l2zo.errors import L2ZOError
from l2zo.optim.methods.fixed_sigma import read_sigma_file, write_sigma_file
from l2zo.utils.io import write_text_atomic


def load_gram(path: Path, cfg: ProbeConfig, chunk: int, num_blocks: int) -> Gram:
    """The Gram saved at ``path``, or measured now and saved there (with the settings it was measured with)."""
    want = {"model": cfg.model, "task": cfg.task, "num_train": cfg.num_train, "data_seed": cfg.data_seed,
            "max_length": cfg.max_length, "chunk": chunk}  # fmt: skip
    if path.is_file():
        saved = torch.load(path, weights_only=True)
        if saved.get("settings") != json.dumps(want, sort_keys=True) or saved["gram"].shape != (num_blocks,) * 2:
            raise L2ZOError(f"{path} holds a Gram measured with other settings or blocks; remove it or pick another "
                            "--gram")  # fmt: skip
        return Gram(G=saved["G"], gram=saved["gram"], loss=float(saved["loss"]), chunks=int(saved["chunks"]))
    gram = probe_gram(cfg, chunk)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save({"G": gram.G, "gram": gram.gram, "loss": torch.tensor(gram.loss),
                "chunks": torch.tensor(gram.chunks), "settings": json.dumps(want, sort_keys=True)}, tmp)  # fmt: skip
    tmp.replace(path)
    return gram


def load_probe(folder: Path) -> tuple[dict, ProbeConfig, list[str], BlockStats]:
    """A finished probe-blocks folder: its probe.json, its config, its block names and pooled statistics."""
    meta = folder / "probe.json"
    if not meta.is_file():
        raise L2ZOError(f"{folder} holds no probe.json: pass the --output folder of a finished probe-blocks")
    probe = json.loads(meta.read_text())
    keys = set(ProbeConfig.__dataclass_fields__)
    cfg = ProbeConfig(**{k: v for k, v in probe["config"].items() if k in keys})
    names = [b["name"] for b in probe["blocks"]]
    numels = [int(b["n"]) for b in probe["blocks"]]
    stats = pooled_stats(names, numels, [p for *_, p in read_pairs(folder / "pairs", len(names))], "fisher")
    return probe, cfg, names, stats


def measured_ratios(path: Path, model: str, task: str) -> dict[str, float]:
    """run name -> (dev loss at step 0 - final mean) / mezo's, from a compare's summary.csv."""
    import csv

    rows = [r for r in csv.DictReader(path.open()) if r["model"] == model and r["task"] == task]
    drop = {r["run"]: float(r["dev_loss_initial"]) - float(r["dev_loss_final_mean"]) for r in rows
            if r["dev_loss_final_mean"] not in ("", "nan")}  # fmt: skip
    if "mezo" not in drop:
        raise L2ZOError(f"{path} has no finished mezo row for {model} x {task}: pass the compare that ran it")
    return {k: v / drop["mezo"] for k, v in drop.items()}


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation: Pearson's of the ranks (no ties expected among model predictions)."""
    return pearson(torch.tensor(a).argsort().argsort(), torch.tensor(b).argsort().argsort())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("probe", type=Path, help="the --output folder of a finished probe-blocks")
    ap.add_argument("--gram", type=Path, required=True, help="where the measured Gram is kept (.pt)")
    ap.add_argument("--chunk", type=int, default=100, help="examples per chunk of the train split (default 100)")
    ap.add_argument("--horizon", type=int, default=300)
    ap.add_argument("--allocation", action="append", default=[], metavar="LABEL=SIGMA_FILE",
                    help="an allocation to score (repeatable); mezo (s = 1) is always scored")  # fmt: skip
    ap.add_argument("--measured", type=Path, help="a compare's summary.csv with runs named as the labels")
    ap.add_argument("--out", type=Path, help="write the table here (markdown) as well as to stdout")
    ap.add_argument("--kstep-opt", action="store_true",
                    help="also fit the allocation that maximises the coupled R_K on this task (kopt-coupled-own; "
                         "l2zo.blockstats.kstep_opt with the Gram) and score it")  # fmt: skip
    ap.add_argument("--kstep-iters", type=int, default=300, help="gradient steps of --kstep-opt (default 300)")
    ap.add_argument("--write-sigma", type=Path, metavar="FILE", help="with --kstep-opt: write its sigma file here")
    ap.add_argument("--fit-on", action="append", default=[], metavar="PROBE=GRAM",
                    help="with --kstep-opt: fit on these tasks' probes and Grams (repeatable; a Gram not yet measured "
                         "is measured and kept there), not on PROBE's: one static allocation learned from other "
                         "tasks (kopt-coupled-meta), scored on PROBE")  # fmt: skip
    ap.add_argument("--permuted", action="append", default=[], metavar="LABEL=FILE",
                    help="score allocation LABEL (an --allocation or the fit) shuffled across blocks (seed 0, "
                         "renormalised) as LABEL-permuted, and write its sigma file to FILE: what the assignment "
                         "of the sigmas to blocks is worth")  # fmt: skip
    a = ap.parse_args(argv)
    if (a.write_sigma or a.fit_on) and not a.kstep_opt:  # refused before any Gram is measured
        print("error: --write-sigma and --fit-on are for the --kstep-opt allocation: pass --kstep-opt too",
              file=sys.stderr)  # fmt: skip
        return 2
    fit_label = ("kopt-coupled-meta" if a.fit_on else "kopt-coupled-own") if a.kstep_opt else None
    try:
        probe, cfg, names, stats = load_probe(a.probe)
        fit_on = []
        for item in a.fit_on:
            path, sep, gram_file = item.partition("=")
            if not sep or not path or not gram_file:
                raise L2ZOError(f"--fit-on {item!r} must be PROBE=GRAM (a probe-blocks folder and a .pt file)")
            _, other_cfg, other_names, other_stats = load_probe(Path(path))
            if other_names != names:
                raise L2ZOError(f"--fit-on {path} probed other blocks than {a.probe}: pass probes of one model")
            fit_on.append((other_stats, load_gram(Path(gram_file), other_cfg, a.chunk, len(names))))
        allocs = {"mezo": torch.ones(len(names), dtype=torch.float64)}
        for item in a.allocation:
            label, sep, file = item.partition("=")
            if not sep or not label or not file:
                raise L2ZOError(f"--allocation {item!r} must be LABEL=SIGMA_FILE")
            sigma = read_sigma_file(file)
            missing = [n for n in names if n not in sigma]
            if missing:
                raise L2ZOError(f"{file} has no sigma for {len(missing)} block(s) of the probe, e.g. {missing[0]}")
            allocs[label] = torch.tensor([sigma[n] for n in names], dtype=torch.float64)
        permuted = [item.partition("=") for item in a.permuted]
        for (label, sep, file), item in zip(permuted, a.permuted, strict=True):
            if not sep or not file or label not in [*allocs, fit_label]:
                raise L2ZOError(f"--permuted {item!r} must be LABEL=FILE with LABEL one of "
                                f"{', '.join(filter(None, [*allocs, fit_label]))}")  # fmt: skip
        measured = measured_ratios(a.measured, Path(str(probe["model_name_or_path"])).name, probe["task"]) \
            if a.measured else {}  # fmt: skip
        gram = load_gram(a.gram, cfg, a.chunk, len(names))
    except L2ZOError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    separable = QuadraticModel.from_stats(stats)
    coupled = CoupledModel.from_gram(stats, gram.G, gram.gram)
    if a.kstep_opt:
        try:
            on = fit_on or [(stats, gram)]
            fit = kstep_optimal([st for st, _ in on], a.horizon, iters=a.kstep_iters, grams=[g for _, g in on])
        except L2ZOError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        allocs[fit_label] = fit.s
        if a.write_sigma:
            write_sigma_file(a.write_sigma, names, fit.s)
    for label, _, file in permuted:
        allocs[f"{label}-permuted"] = permute_sigma(normalize(allocs[label], stats.n), stats.n)
        write_sigma_file(file, names, allocs[f"{label}-permuted"])
    rows, preds = [], {"separable": [], "coupled": [], "measured": []}
    base_sep = kstep(allocs["mezo"], separable, a.horizon)
    base_cpl = coupled_kstep(allocs["mezo"], coupled, a.horizon)
    if not (base_sep.decrease > 0 and base_cpl.decrease > 0):
        print(f"error: a model predicts no decrease for MeZO over {a.horizon} steps (no resolved gradient in "
              f"{a.probe}): probe more batch pairs", file=sys.stderr)  # fmt: skip
        return 2
    for label, s in allocs.items():
        s = normalize(s, stats.n)
        mezo = label == "mezo"  # scored above as the baseline
        sep = base_sep if mezo else kstep(s, separable, a.horizon)
        cpl = base_cpl if mezo else coupled_kstep(s, coupled, a.horizon)
        r_sep, r_cpl = sep.decrease / base_sep.decrease, cpl.decrease / base_cpl.decrease
        m = measured.get(label)
        share = stats.n * s * s / (stats.n * s * s).sum()  # each block's share of the perturbation energy
        top = int(share.argmax())
        rows.append(f"| {label} | {r_sep:.2f} | {sep.eta / base_sep.eta:.1f} | {r_cpl:.2f} | "
                    f"{cpl.eta / base_cpl.eta:.1f} | {cpl.decrease:.3f} | {'-' if m is None else f'{m:.2f}'} | "
                    f"{float(1 / (share**2).sum()):.1f} ({names[top]} {float(share[top]):.0%}) |")  # fmt: skip
        if m is not None:
            preds["separable"].append(r_sep)
            preds["coupled"].append(r_cpl)
            preds["measured"].append(m)
    diag = torch.diagonal(gram.gram)
    negative = int((torch.linalg.eigvalsh((gram.gram + gram.gram.T) / 2) < 0).sum())
    lines = [
        f"{probe['task']} @ {Path(str(probe['model_name_or_path'])).name}: the Hessian Gram of the block gradients at "
        f"the initial state, over {gram.chunks} chunks of {a.chunk} train examples (loss {gram.loss:.3f}).",
        "",
        f"- g^T H g over the sum of its diagonal blocks (1 = no coupling): {gram.coupling():.2f}",
        f"- loss the separable model credits to the blocks' gradient directions (sum G_b^2 / (2 g_b^T H_bb g_b), "
        f"positive blocks): {float((gram.G**2 / (2 * diag)).where(diag > 0, torch.zeros_like(diag)).sum()):.2f}",
        f"- the same with the probe's pooled statistics (the separable model used so far): "
        f"{float(separable.f0.sum()):.2f}",
        f"- eigenvalues of the (symmetrised) Gram below 0: {negative} of {len(names)} (set to 0 by the PSD projection)",
        f"- loss the block gradients' span can remove (coupled, PSD part): {coupled.reducible():.2f}",
        f"- predicted {a.horizon}-step decrease of MeZO: separable {base_sep.decrease:.3f} at eta "
        f"{base_sep.eta:.2e}, coupled {base_cpl.decrease:.3f} at eta {base_cpl.eta:.2e}",
        "",
        f"R_K ({a.horizon} steps, eta re-tuned for each allocation; eta x: its tuned eta over MeZO's; effective blocks: "
        "1 / the sum of the squared shares of the perturbation energy n_b s_b^2):",
        "",
        "| allocation | R_K separable | eta x | R_K coupled | eta x | coupled decrease | measured decrease / MeZO's | "
        "effective blocks (the largest share) |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if len(preds["measured"]) >= 3:
        lines += ["", f"Spearman with the measured ratios over {len(preds['measured'])} allocations: separable "
                  f"{spearman(preds['separable'], preds['measured']):+.2f}, coupled "
                  f"{spearman(preds['coupled'], preds['measured']):+.2f}"]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        write_text_atomic(a.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

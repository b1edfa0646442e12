"""The table of README.md: measured final dev loss per allocation (lr tuned on seed 0, then seeds 1 and 2 at that
lr) against the gains probe-blocks predicts. Reads compare/*/.../summary.json and probe-isotropic/probe.json here.

    PYTHONPATH=. python docs/results/probe-blocks/tiny/table.py
"""

import json
import math
import statistics
from pathlib import Path

import torch

from l2zo.blockstats import BlockStats, QuadraticModel, kstep, step_terms

HERE = Path(__file__).resolve().parent
CMP = HERE / "compare"
ISO = json.loads((HERE / "probe-isotropic" / "probe.json").read_text())


def runs(label_dirs):
    out = {}
    files = []
    for label_dir in label_dirs.split("|"):
        pattern = (
            f"{label_dir}/lr=*/seed*/summary.json" if "/" in label_dir else f"*/{label_dir}/lr=*/seed*/summary.json"
        )
        files += list(CMP.glob(pattern))
    for f in files:
        d = json.loads(f.read_text())
        lr = float(f.parent.parent.name.split("=")[1])
        seed = int(f.parent.name[4:])
        out.setdefault(lr, {})[seed] = d["dev_loss_final"]
    return out


ALLOC = {  # allocation -> compare label directory
    "mezo": "mezo",
    "learned-random": "learned-random",
    "learned": "learned",
    "per-block-const": "per-block-const",
    "learned-random (fixed)": "fixed-sigma@sigma_file=learned-random.json",
    "learned-random-permuted": None,
    "permuted (perm seed 1)": "fixed-sigma@sigma_file=learned-random-permuted-seed1.json",
    "permuted (perm seed 2)": "fixed-sigma@sigma_file=learned-random-permuted-seed2.json",
    "water-filling": "fixed-sigma@sigma_file=water-filling.json|s12c/fixed-sigma",
    "gsl": "fixed-sigma@sigma_file=gsl.json",
    "hizoo": "fixed-sigma@sigma_file=hizoo.json",
    "gsl (two-scale)": "o2g*/fixed-sigma",
    "hizoo (two-scale)": "o2h*/fixed-sigma",
}


def perm0():
    out = {}
    for f in (CMP / "p1").glob("fixed-sigma/lr=*/seed*/summary.json"):
        lr = float(f.parent.parent.name.split("=")[1])
        out.setdefault(lr, {})[0] = json.loads(f.read_text())["dev_loss_final"]
    for f in (CMP / "s12a").glob("fixed-sigma@sigma_file=learned-random-permuted.json/lr=*/seed*/summary.json"):
        lr = float(f.parent.parent.name.split("=")[1])
        out.setdefault(lr, {})[int(f.parent.name[4:])] = json.loads(f.read_text())["dev_loss_final"]
    return out


def stats_from(result):
    rows = result["blocks"]
    t = lambda k: torch.tensor([x[k] for x in rows], dtype=torch.float64)
    return BlockStats(
        names=tuple(x["name"] for x in rows),
        kinds=tuple(x["kind"] for x in rows),
        n=t("n"),
        G=t("G"),
        noise=t("noise"),
        tau=t("tau"),
        gHg=t("gHg"),
        G_se=t("G_se"),
        noise_se=t("noise_se"),
        tau_se=t("tau_se"),
        gHg_se=t("gHg_se"),
        fisher=t("fisher"),
        gFg=t("gFg"),
        fisher_se=t("fisher_se"),
        gFg_se=t("gFg_se"),
        loss=0.0,
        pairs=1,
        probes=1,
    )


def sigma_of(path):
    m = json.loads(Path(path).read_text())
    return torch.tensor([m[x["name"]] for x in ISO["blocks"]], dtype=torch.float64)


SIG = HERE / "probe-isotropic" / "sigma"
FILES = {
    "mezo": None,
    "learned-random": "learned-random.json",
    "learned-random (fixed)": "learned-random.json",
    "learned": "learned.json",
    "per-block-const": "per-block-const.json",
    "learned-random-permuted": "learned-random-permuted.json",
    "permuted (perm seed 1)": "learned-random-permuted-seed1.json",
    "permuted (perm seed 2)": "learned-random-permuted-seed2.json",
    "water-filling": "water-filling.json",
    "gsl": "gsl.json",
    "hizoo": "hizoo.json",
    "gsl (two-scale)": "../../probe/sigma/gsl.json",
    "hizoo (two-scale)": "../../probe/sigma/hizoo.json",
}


def ratio(s, stats):
    return float(step_terms(s, stats).gain() / step_terms(torch.ones_like(s), stats).gain())


st = stats_from(ISO)
F = st.with_fisher_curvature()
rows = []
ones = torch.ones(len(ISO["blocks"]), dtype=torch.float64)
q2 = QuadraticModel.from_stats(F)
qi = QuadraticModel.from_stats(F, two_scale=False)
base2, basei = kstep(ones, q2, 300), kstep(ones, qi, 300)
s0 = ISO["states"]["0"]["blocks"]
st0 = stats_from({"blocks": s0})
for name, label in ALLOC.items():
    data = perm0() if label is None else runs(label)
    if not data:
        continue
    f = FILES[name]
    if f is not None and not (SIG / f).exists():
        continue
    s = ones if f is None else sigma_of(SIG / f)
    # lr chosen on seed 0 (final dev loss); other seeds at that lr
    cands = {lr: v[0] for lr, v in data.items() if 0 in v}
    lr = min(cands, key=cands.get)
    losses = [data[lr][k] for k in sorted(data[lr])]
    k2, ki = kstep(s, q2, 300), kstep(s, qi, 300)
    rows.append(
        {
            "name": name,
            "lr": lr,
            "grid": sorted(cands),
            "seed0": cands[lr],
            "losses": losses,
            "mean": statistics.mean(losses),
            "sd": statistics.stdev(losses) if len(losses) > 1 else float("nan"),
            "RH0": ratio(s, st0),
            "RH": ratio(s, st),
            "RF": ratio(s, F),
            "RKi": ki.decrease / basei.decrease,
            "RK2": k2.decrease / base2.decrease,
        }
    )
MEZO = runs("mezo")[2e-4]
for r in rows:
    data = perm0() if ALLOC[r["name"]] is None else runs(ALLOC[r["name"]])
    per = data[r["lr"]]
    diffs = [per[k] - MEZO[k] for k in sorted(per) if k in MEZO]
    r["diff"] = statistics.mean(diffs)
    # paired 95% CI with Student t (2 dof: 4.303)
    r["ci"] = 4.303 * statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) == 3 else float("nan")
rows.sort(key=lambda r: r["mean"])
print(
    "| allocation | lr grid (seed 0) | tuned lr | final dev loss seed 0 | seeds | mean ± sd | - mezo (paired 95% CI) | R (H) @0 | R (H) | R (F) | R_K isotropic | R_K two-scale |"
)
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    print(
        f"| `{r['name']}` | {','.join(f'{x:g}' for x in r['grid'])} | {r['lr']:g} | {r['seed0']:.4f} | {len(r['losses'])} | "
        f"{r['mean']:.4f} ± {r['sd']:.4f} | {r['diff']:+.3f} ± {r['ci']:.3f} | {r['RH0']:.2f} | {r['RH']:.2f} | {r['RF']:.2f} | {r['RKi']:.2f} | {r['RK2']:.2f} |"
    )


def spearman(a, b):
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


neg = [-r["mean"] for r in rows]
mezo = next(r for r in rows if r["name"] == "mezo")
print()
for key in ("RH0", "RH", "RF", "RKi", "RK2"):
    signs = sum((r[key] > 1) == (r["mean"] < mezo["mean"]) for r in rows if r["name"] != "mezo")
    print(
        f"{key}: Spearman with -loss = {spearman([r[key] for r in rows], neg):+.2f}; sign vs mezo right for {signs}/{len(rows) - 1}"
    )

"""Regenerate BENCHMARKS.md, docs/bench/*.json and docs/bench/scaling.png: every `l2zo bench` configuration.

    python scripts/bench_all.py [--data-dir ../shared/data] [--only smollm2-135m-bf16-mixed ...] [--render-only]

Each configuration is one `l2zo bench` process (the same command lines BENCHMARKS.md lists), run one after
the other on an otherwise idle machine: 15-60 minutes on a 2-core CPU. --render-only rebuilds the markdown
and the plot from the JSON files already in docs/bench/. On a CUDA machine it runs the same configurations on
the GPU and writes them under docs/bench/gpu/, which fills BENCHMARKS.md's GPU section.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "bench"
MAIN_OPTS = "mezo,learned,zo-adam,fo-adam"
TARGETS = {"step_over_2fwd": 1.10, "learned_over_mezo": 1.03, "peak_over_inference": 1.05}


def configs(data_dir: str | None) -> dict[str, list[str]]:
    """name -> `l2zo bench` arguments."""
    data = ["--data-dir", data_dir] if data_dir else []
    out: dict[str, list[str]] = {}
    for prec in ("32", "bf16-mixed"):
        # bf16-mixed SmolLM2 with fewer rounds and rows: on a CPU without bf16 arithmetic its forwards are ~4x slower.
        steps, opts = ("5", MAIN_OPTS) if prec == "32" else ("3", "mezo,learned")
        out[f"smollm2-135m-{prec}"] = ["--model", "smollm2-135m", "--batch-size", "16", "--seq-len", "64", "--precision",
                                       prec, "--steps", steps, "--warmup", "1", "--optimizers", opts, "--cache-z", *data]  # fmt: skip
        out[f"tiny-{prec}"] = ["--model", "tiny", "--batch-size", "16", "--seq-len", "64", "--precision", prec,
                               "--steps", "20", "--warmup", "3", "--optimizers", MAIN_OPTS, "--cache-z"]  # fmt: skip
        for model in ("llama-10m", "llama-30m"):
            out[f"{model}-{prec}"] = ["--model", model, "--batch-size", "16", "--seq-len", "64", "--precision",
                                      prec, "--steps", "10", "--warmup", "2", "--optimizers", "mezo,learned"]  # fmt: skip
    return out


def run_all(names: list[str], data_dir: str | None, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in names:
        args = configs(data_dir)[name]
        cmd = [sys.executable, "-m", "l2zo.cli.main", "bench", *args, "--json", str(out_dir / f"{name}.json")]
        print("$", "l2zo bench", shlex.join(args), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)


def _load(out_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted(out_dir.glob("*.json"))}


def _f(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def table(rec: dict) -> str:
    lines = ["| row | median s | x 2 fwd | speed-up vs reference | peak MiB | x inference | note |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, r in rec["rows"].items():
        lines.append(f"| {name} | {r['median_s']:.3f} | {_f(r.get('step_over_2fwd'), '.2f')} | "
                     f"{_f(r.get('speedup_over_reference'), '.2f')} | {_f(r.get('peak_mb'), '.0f')} | "
                     f"{_f(r.get('peak_over_inference'), '.2f')} | {r.get('note', '')} |")  # fmt: skip
    return "\n".join(lines)


# The z paths the targets are read on: (mezo's row suffix, learned's row suffix, label). The learned optimizer has
# no two-pass step (its sigma reads the weights, which the merged pass would have to read perturbed), so its
# fastest path is the table with three passes.
PATHS = (("", "", "randn, 3 passes (default)"), ("+table", "+table", "noise table, 3 passes"),
         ("+table+two-pass", "+table", "noise table, 2 passes (learned: 3)"))  # fmt: skip


def targets(recs: dict[str, dict]) -> str:
    head = (
        "| configuration | z path | mezo x 2 fwd (<= 1.10) | learned / mezo (<= 1.03) | mezo peak x inference (<= 1.05) | "
        "learned peak x inference (<= 1.05) | mezo speed-up vs reference |"
    )
    lines = [head, "|---|---|---|---|---|---|---|"]

    def mark(v, limit):
        return "-" if v is None else f"{v:.2f} {'met' if v <= limit else 'MISSED'}"

    for name, rec in recs.items():
        rows = rec["rows"]
        for m_sfx, l_sfx, label in PATHS:
            m, le = rows.get("mezo" + m_sfx), rows.get("learned" + l_sfx)
            if m is None or le is None:
                continue
            lines.append(f"| {name} | {label} | {mark(m.get('step_over_2fwd'), 1.10)} | "
                         f"{mark(le['median_s'] / m['median_s'], 1.03)} | {mark(m.get('peak_over_inference'), 1.05)} | "
                         f"{mark(le.get('peak_over_inference'), 1.05)} | {_f(m.get('speedup_over_reference'), '.2f')} |")  # fmt: skip
    return "\n".join(lines)


def plot_scaling(recs: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    drawn = False
    for prec, style in (("32", "-"), ("bf16-mixed", "--")):
        pts = sorted((rec["model_params"], rec["rows"]) for name, rec in recs.items() if name.endswith("-" + prec))
        if not pts:
            continue
        drawn = True
        params = [p / 1e6 for p, _ in pts]
        axes[0].loglog(
            params, [r["inference"]["median_s"] * 2 for _, r in pts], "k" + style + "o", label=f"2 forwards ({prec})"
        )
        for opt in ("mezo", "learned", "mezo+table+two-pass"):
            if not all(opt in r for _, r in pts):  # a row older records lack
                continue
            axes[0].loglog(params, [r[opt]["median_s"] for _, r in pts], style + "o", label=f"{opt} step ({prec})")
            axes[1].semilogx(params, [r[opt]["step_over_2fwd"] for _, r in pts], style + "o", label=f"{opt} ({prec})")
        axes[2].loglog(params, [max(r["inference"].get("peak_mb", 0), 1) for _, r in pts], "k" + style + "o",
                       label=f"inference ({prec})")  # fmt: skip
        for opt in ("mezo", "learned"):
            axes[2].loglog(
                params, [max(r[opt].get("peak_mb", 0), 1) for _, r in pts], style + "o", label=f"{opt} ({prec})"
            )
    if not drawn:
        plt.close(fig)
        return
    axes[0].set(xlabel="parameters (M)", ylabel="seconds", title="step time (batch 16x2x64)")
    axes[1].axhline(1.10, color="r", ls=":", label="target 1.10")
    axes[1].set(xlabel="parameters (M)", ylabel="step / (2 x forward)", title="overhead over two forwards")
    axes[2].set(xlabel="parameters (M)", ylabel="peak MiB above the loaded model", title="peak memory")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)


def analysis_values(recs: dict[str, dict]) -> dict[str, str]:
    """The figures docs/bench/ANALYSIS.md quotes ({name} fields), computed from the SmolLM2 JSON files.

    Computed, not typed in, so the analysis stays true to the tables whenever the benchmarks are re-run.
    """
    from l2zo.engine.seeding import Z_CHUNK, ZSource

    r32 = recs["smollm2-135m-32"]["rows"]

    # bf16 figures: SmolLM2's where measured, else the largest config measured in both precisions.
    def same_machine(a: str, b: str) -> bool:
        return _machine_key(recs[a]["machine"]) == _machine_key(recs[b]["machine"])

    bf16_model = next((m for m in ("smollm2-135m", "llama-30m", "llama-10m", "tiny")
                       if f"{m}-bf16-mixed" in recs and f"{m}-32" in recs
                       and same_machine(f"{m}-bf16-mixed", f"{m}-32")), None)  # fmt: skip
    rbf = recs[f"{bf16_model}-bf16-mixed"]["rows"] if bf16_model else {}
    rbf32 = recs[f"{bf16_model}-32"]["rows"] if bf16_model else {}
    on_smollm2 = bf16_model == "smollm2-135m"

    def bf16_clause(figure: Callable[[], float]) -> str:
        """SmolLM2's bf16 figure beside the fp32 one; ``figure`` is only read where that config was measured."""
        return (
            f" and {figure():.2f}x in bf16-mixed"
            if on_smollm2
            else " (bf16-mixed on SmolLM2: not measured on this machine)"
        )

    params = recs["smollm2-135m-32"]["model_params"]
    step, fwd2, zpass = r32["mezo"]["median_s"], 2 * r32["inference"]["median_s"], r32["z-pass"]["median_s"]
    budget = 0.10 * fwd2
    rest = step - fwd2 - 3 * zpass
    workers = ZSource().workers
    # A cached pass: what the cached step spends beyond the forwards and the rest, over its three passes;
    # each reads theta and z and writes theta (3 x 4 bytes a parameter).
    cached_pass = (r32["mezo+cache-z"]["median_s"] - fwd2 - rest) / 3
    v = {
        "fwd2_32": f"{fwd2:.2f}", "fwd2_share_32": f"{fwd2 / step:.0%}",
        "zpass3_32": f"{3 * zpass:.2f}", "zpass3_share_32": f"{3 * zpass / step:.0%}",
        "rest_32": f"{rest:.2f}", "rest_share_32": f"{rest / step:.0%}",
        "rest_note": "" if rest >= 0 else ("The rest comes out negative: inside a step the passes ran faster than the "
                                           "isolated z-pass row, so this split is approximate (timing noise of a few "
                                           "percent on each row)."),
        "zpass_32": f"{zpass:.2f}", "zpass1_32": f"{r32['z-pass-1thread']['median_s']:.2f}",
        "cached_32": f"{r32['mezo+cache-z']['step_over_2fwd']:.2f}",
        "cached_bf16": bf16_clause(lambda: rbf["mezo+cache-z"]["step_over_2fwd"]),
        "cached_pass_32": f"{cached_pass:.2f}", "bandwidth_32": f"{12 * params / cached_pass / 1e9:.0f}",
        "cached_32_mib": f"{r32['mezo+cache-z'].get('peak_mb', float('nan')):.0f}",
        "budget_32": f"{budget:.2f}", "budget_pass_32": f"{budget / 3:.2f}",
        "gen_rate_needed": f"{params / (budget / 3) / 1e6:.0f}", "gen_speedup_needed": f"{zpass / (budget / 3):.1f}",
        "bf16_sentence": (f"In bf16-mixed the passes cost the same (theta and z stay fp32) while a forward takes "
                          f"{rbf['inference']['median_s'] / rbf32['inference']['median_s']:.2f}x its fp32 time on this "
                          f"CPU ({bf16_model}), so mezo's ratio there is {rbf['mezo']['step_over_2fwd']:.2f}x."
                          if rbf else "bf16-mixed was not measured on this machine."),
        "ns_per_number": f"{r32['z-pass-1thread']['median_s'] / params * 1e9:.1f}",
        "two_thread_speedup": f"{r32['z-pass-1thread']['median_s'] / zpass:.1f}",
        "ring_mib": f"{(workers + 1) * Z_CHUNK * 4 / 2**20:.0f}",
        "mezo_peak_32": f"{r32['mezo'].get('peak_over_inference', float('nan')):.2f}",
        "mezo_peak_bf16": bf16_clause(lambda: rbf["mezo"].get("peak_over_inference", float("nan"))),
        "inf_peak_32": f"{r32['inference'].get('peak_mb', float('nan')):.0f}",
        "fo_adam_x": f"{r32['fo-adam'].get('peak_over_inference', float('nan')):.0f}",
        "learned_over_mezo_32": f"{r32['learned']['median_s'] / step:.2f}",
        "learned_over_mezo_bf16": bf16_clause(lambda: rbf["learned"]["median_s"] / rbf["mezo"]["median_s"]),
    }  # fmt: skip
    v.update(table_values(r32, params, fwd2))
    return v


def table_values(r32: dict[str, dict], params: int, fwd2: float) -> dict[str, str]:
    """The noise-table and two-pass figures of ANALYSIS.md, from SmolLM2's fp32 rows."""
    if "z-pass-table" not in r32:
        return {k: "not measured" for k in TABLE_KEYS}
    tpass, zpass = r32["z-pass-table"]["median_s"], r32["z-pass"]["median_s"]
    t3, t2 = r32["mezo+table"]["median_s"], r32["mezo+table+two-pass"]["median_s"]
    lt = r32["learned+table"]["median_s"]
    return {
        "tpass_32": f"{tpass:.3f}", "tpass_ns": f"{tpass / params * 1e9:.2f}", "tpass_speedup": f"{zpass / tpass:.0f}",
        "table3_32": f"{r32['mezo+table']['step_over_2fwd']:.2f}", "table2_32": f"{t2 / fwd2:.2f}",
        "table3_rest": f"{t3 - fwd2 - 3 * tpass:.2f}",
        "two_pass_delta": f"{abs(t3 - t2):.2f} s {'less' if t2 < t3 else 'more'}", "table_peak_32": f"{r32['mezo+table'].get('peak_over_inference', float('nan')):.2f}",
        "learned_table_over_table3": f"{lt / t3:.2f}", "learned_table_over_best": f"{lt / min(t3, t2):.2f}",
        "table_speedup_ref": f"{r32['mezo-reference']['median_s'] / min(t3, t2):.2f}",
        "learned_table_32": f"{lt / fwd2:.2f}",
    }  # fmt: skip


TABLE_KEYS = ("tpass_32", "tpass_ns", "tpass_speedup", "table3_32", "table2_32", "table3_rest",
              "two_pass_delta", "table_peak_32", "learned_table_over_table3", "learned_table_over_best",
              "table_speedup_ref", "learned_table_32")  # fmt: skip


def _isa(mach: dict) -> str:
    """'AVX-512, no bf16 arithmetic' from the recorded cpuinfo flags ('ISA not recorded' for older JSON files)."""
    if "avx512" not in mach:
        return "ISA not recorded"
    return (f"{'AVX-512' if mach['avx512'] else 'no AVX-512'}, "
            f"{'bf16 arithmetic' if mach['bf16_arithmetic'] else 'no bf16 arithmetic'}")  # fmt: skip


def _machine_key(mach: dict) -> tuple[str, str]:
    """What makes two records comparable: the same CPU name and instruction-set flags."""
    return mach["cpu"], _isa(mach)


def render(data_dir: str | None) -> str:
    recs = _load(OUT)
    gpu = _load(OUT / "gpu") if (OUT / "gpu").is_dir() else {}
    plot_scaling(recs, OUT / "scaling.png")
    # The machine line is the newest record's (the one with the ISA flags); configurations kept from an earlier
    # session on another machine are listed as such below the targets.
    any_rec = next((r for r in recs.values() if "avx512" in r["machine"]), next(iter(recs.values())))
    mach = any_rec["machine"]
    from l2zo.bench.config import NOTES

    stale_table = [
        n for n, r in recs.items() if r["rows"].get("mezo+table", {}).get("note", NOTES["table"]) != NOTES["table"]
    ]
    older = [n for n, r in recs.items() if _machine_key(r["machine"]) != _machine_key(mach)]
    from l2zo.tasks.scoring import SCORER_VERSION

    old_scorer = [n for n, r in recs.items() if r.get("scorer", 1) < SCORER_VERSION]
    parts = [(ROOT / "docs" / "bench" / "INTRO.md").read_text().strip(), "",
             "## Machine", "",
             (f"{mach['cpu']}, {_isa(mach)}, {mach['cpu_count']} cores, {mach['threads']} torch threads, "
              f"torch {mach['torch']}, Python {mach['python']}, {mach['platform']}."), "",
             "## Targets", "", targets(recs), "",
             *([f"Measured with an earlier noise-table size (see each row's note): "
                f"{', '.join(f'`{n}`' for n in stale_table)}."] if stale_table else []), "",
             *([f"Measured with the earlier scorer, one forward row per candidate (the batch's two single-token "
                f"candidates now share one row, which halves its forwards; see above): "
                f"{', '.join(f'`{n}`' for n in old_scorer)}."] if old_scorer else []), "",
             *([f"Kept from an earlier session (another CPU, or a record without its ISA flags), so not comparable "
                f"with the rows above: {', '.join(f'`{n}`' for n in older)}."] if older else []), "",
             *[f"`{n}`: not measured on this machine (run `python scripts/bench_all.py --only {n}`)." for n in configs(data_dir)
               if n not in recs], "",
             "## Scaling", "", "![step time, overhead and peak memory against parameter count](docs/bench/scaling.png)", "",
             "| model | precision | parameters | 2 forwards s | mezo step s | mezo x 2 fwd | learned x 2 fwd | "
             "mezo+table x 2 fwd | mezo+table+two-pass x 2 fwd | mezo peak MiB | inference peak MiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for _name, rec in sorted(recs.items(), key=lambda kv: (kv[1]["config"]["precision"], kv[1]["model_params"])):
        r = rec["rows"]
        parts.append(f"| {rec['config']['model']} | {rec['config']['precision']} | {rec['model_params'] / 1e6:.1f}M | {2 * r['inference']['median_s']:.3f} | "
                     f"{r['mezo']['median_s']:.3f} | {r['mezo']['step_over_2fwd']:.2f} | {r['learned']['step_over_2fwd']:.2f} | "
                     f"{_f(r.get('mezo+table', {}).get('step_over_2fwd'), '.2f')} | "
                     f"{_f(r.get('mezo+table+two-pass', {}).get('step_over_2fwd'), '.2f')} | "
                     f"{_f(r['mezo'].get('peak_mb'), '.0f')} | {_f(r['inference'].get('peak_mb'), '.0f')} |")  # fmt: skip
    parts += ["", "## Every configuration", ""]
    for name, rec in recs.items():
        args = configs(data_dir).get(name)
        parts += [f"### {name}", "", f"`l2zo bench {shlex.join(args) if args else '?'}`", "", table(rec), ""]
    parts += ["## GPU", ""]
    if gpu:
        for name, rec in gpu.items():
            parts += [f"### {name} on {rec['machine'].get('gpu', 'GPU')}", "", table(rec), ""]
    else:
        parts += [
            (
                "Not measured: no GPU machine was available when these figures were taken. "
                "`python scripts/bench_all.py` on a CUDA machine fills this section (docs/bench/gpu/)."
            ),
            "",
        ]
    analysis = (ROOT / "docs" / "bench" / "ANALYSIS.md").read_text().strip()
    parts += [analysis.format_map(analysis_values(recs)), ""]
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default="../shared/data", help="relative to the repository root, or absolute")
    ap.add_argument("--only", nargs="*", default=None, help="configuration names to run (default: all)")
    ap.add_argument("--render-only", action="store_true")
    args = ap.parse_args()
    data_dir = args.data_dir if (ROOT / args.data_dir).is_dir() else None
    if not args.render_only:
        import torch

        out_dir = OUT / "gpu" if torch.cuda.is_available() else OUT
        run_all(args.only or list(configs(data_dir)), data_dir, out_dir)
    text = render(data_dir)
    tmp = ROOT / "BENCHMARKS.md.tmp"
    tmp.write_text(text)
    tmp.replace(ROOT / "BENCHMARKS.md")
    print("wrote BENCHMARKS.md and docs/bench/scaling.png")


if __name__ == "__main__":
    main()

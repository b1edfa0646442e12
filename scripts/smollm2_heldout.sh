#!/usr/bin/env bash
# Issue 15 on SmolLM2-135M: the held-out evaluation of item 4 (every optimizer's lr tuned on dev, 3 paired seeds),
# on the base model and its derivative x three tasks never used in meta-training (RTE, CB, MultiRC): 6 pairs.
# The third task was WiC, then (stop 27) WSC: both start at chance (dev loss 0.703 / 0.704 on the base)
# and no lr of the grid moved either by more than 0.01 in 60 steps, so they could not separate optimizers; their
# tuning runs stay under compares/*/wic and */wsc. MultiRC starts miscalibrated (base: dev loss 1.027, accuracy
# 0.54), so its loss moves, as CB's does.
#   bash scripts/smollm2_heldout.sh derivative   # the derivative (continued LM training on SST-2 text; ~12 min, 1 core)
#   bash scripts/smollm2_heldout.sh run          # the compares, two side by side, 1 thread each (many hours)
#   bash scripts/smollm2_heldout.sh aggregate    # the tables, win counts and plots into docs/results/heldout-smollm2
#   bash scripts/smollm2_heldout.sh status       # how many runs of each compare have finished
# Budget (AVX-512 Xeon, fp32, 1 thread a process): a step of 8 prompts of <= 96 tokens is two SmolLM2 forwards;
# each optimizer's lr is picked on seed 100 with a 60-step run from 3e-6, 1e-5, 3e-5 (the first grid's 1e-4 was
# the worst for every optimizer on WiC and RTE, and 1e-5, its bottom, the best), then seeds 0, 1, 2 run 200 steps.
# The lr is the smallest of the grid whose 60-step decrease is within 5% of the best one's (--lr-tolerance 0.05,
# from stop 28, set before any MultiRC evaluation seed ran): the 60-step picks overshoot over 200 steps. It moves
# none of the RTE and CB picks (scripts/lr_tolerance.py on their tuning runs), so their runs stand as they are.
# The untrained net's grid reaches 1e-4: on RTE it picked 3e-5, the top of the 3-value grid (it shrinks the
# embedding, where the trained net puts its sigma, and wants a larger lr).
# Every stage resumes: the derivative is made once, and a compare folder that exists is resumed (its finished
# runs are kept; a run killed mid-way starts again), so `run` can be stopped at any time and started again.
# The compares live under docs/results/heldout-smollm2/compares (tens of KB a run, in git; not "runs/", which
# .gitignore excludes at any depth), so that the evaluation,
# which takes longer than one working session, survives a machine that keeps only the repository. The
# derivative (540 MB) is not kept; it is re-made, and its weights' sha256 is checked against the one recorded
# in derivative.sha256 by the first session (fp32 on one thread: the same bits on the same kind of CPU; a
# mismatch is reported, and the runs on the derivative made before it are then not strictly paired).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-../shared/data}
DERIV=runs/derivatives/smollm2-135m-sst2lm
DOCS=docs/results/heldout-smollm2
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ART=checkpoints/smollm2-135m/zo-finetuner
# The shipped net (greedy + role embedding since stop 22) and its untrained twin, labelled apart from the runs that
# the plain greedy net (docs/results/meta-smollm2-135m-greedy, labels learned / learned-random) made before.
# MODELS, TASKS, OPTS run a part (OPTS=mezo TASKS=multirc ...); a compare resumed with more only adds runs.
MODELS=${MODELS:-smollm2-135m,$DERIV}
# Pairs run task by task, RTE and CB first: their dev loss moves (CB 0.95 -> 0.87, RTE 0.73 -> 0.70 in the tuning
# runs); so does MultiRC's (see the top).
TASKS=${TASKS:-rte,cb,multirc}
OPTS=${OPTS:-mezo,learned:label=learned-role,learned-random:label=learned-random-role}
ARGS=(--artifact "$ART" --models "$MODELS" --tasks "$TASKS" --optimizers "$OPTS"
      --lr-grid "3e-6,1e-5,3e-5;learned-random-role=3e-6,1e-5,3e-5,1e-4" --tune-steps 60 --tune-seeds 100 --lr-tolerance 0.05
      --steps 200 --seeds 0,1,2 --batch-size 8 --eval-every 50 --num-train 1000 --num-dev 128 --num-test 200
      --max-length 96 --precision 32 --data-dir "$DATA" --baseline mezo --champions learned-role
      --out "$DOCS/compares" --docs "$DOCS" --jobs 2 --threads 1)

check_derivative() {  # record the derivative's weights once; afterwards report any other bits
  local now
  now=$(cat "$DERIV"/*.safetensors | sha256sum | cut -d' ' -f1)
  if [ ! -f "$DOCS/derivative.sha256" ]; then
    mkdir -p "$DOCS" && echo "$now" > "$DOCS/derivative.sha256"
  elif [ "$(cat "$DOCS/derivative.sha256")" != "$now" ]; then
    echo "warning: $DERIV's weights differ from those of the earlier runs ($DOCS/derivative.sha256); the runs" \
      "on it made before and after are not strictly paired" >&2
    echo "$(date -u +%FT%TZ) other derivative weights: $now" >> "$DOCS/derivative.log"
  fi
}

case ${1:-} in
  derivative)
    [ -f "$DERIV/derive_info.json" ] || $PY scripts/make_derivative.py --base smollm2-135m --data-dir "$DATA" \
      --out "$DERIV" --precision 32
    ;;
  run)
    [ -f "$DERIV/derive_info.json" ] || { echo "make the derivative first: $0 derivative" >&2; exit 2; }
    check_derivative
    $PY scripts/evaluate_heldout.py "${ARGS[@]}"
    ;;
  aggregate) $PY scripts/evaluate_heldout.py "${ARGS[@]}" --aggregate-only ;;
  status)  # finished (ok or failed) runs per compare and label: lr-tuning runs, then evaluation runs
    done_in() { { grep -lsE '"status": "(ok|failed)"' "$@" || true; } | wc -l; }
    for dir in "$DOCS"/compares/*/*/; do
      [ -f "$dir/command.txt" ] || continue
      line="${dir#"$DOCS"/compares/}"
      for label in "$dir"tune/*/; do
        name=$(basename "$label")
        line="$line $name: tune $(done_in "$label"*/seed*/summary.json), seeds $(done_in "$dir$name"/seed*/summary.json);"
      done
      echo "$line"
    done
    ;;
  *) echo "usage: $0 derivative | run | aggregate | status" >&2; exit 2 ;;
esac

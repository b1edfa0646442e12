#!/usr/bin/env bash
# Issue 15 on the tiny world: meta-train each recipe (objective x features) once, then the held-out evaluation
# (lr tuned on dev per optimizer, 3 paired seeds) on tiny-derived x {synth-color, synth-successor}. EVALUATION.md §0b.
#   bash scripts/tiny_recipes.sh meta A      # recipes expected, distill, distill-feat (one core, ~25 min)
#   bash scripts/tiny_recipes.sh meta B      # recipe es (one core, ~35 min)
#   bash scripts/tiny_recipes.sh meta C      # the feature ablation: greedy and greedy-feat (one core, a few min)
#   bash scripts/tiny_recipes.sh heldout     # two compares side by side (~1 h on two cores)
#   bash scripts/tiny_recipes.sh meta D      # one feature at a time on the shipped recipe (7 meta-trains, one core)
#   bash scripts/tiny_recipes.sh ablation    # their held-out evaluation beside mezo and the shipped net
#   bash scripts/tiny_recipes.sh confirm F   # the shipped net against greedy + feature F (e.g. role), each beside
#                                            # its own untrained net, on 6 paired seeds (docs/results/confirm-tiny-F)
#   bash scripts/tiny_recipes.sh meta S      # the shipped recipe (meta_configs/tiny.yaml) again with meta-seeds 1, 2
#   bash scripts/tiny_recipes.sh meta L      # the shipped recipe with 4x the meta-steps (2400)
#   bash scripts/tiny_recipes.sh robust      # the net shipped since stop 22 (greedy + role) against MeZO, its own
#                                            # untrained twin and the paper-spec untrained net, lr tuned on 2 seeds
#                                            # (100, 101), 6 paired seeds (docs/results/robust-tiny); with the nets
#                                            # of chains S and L beside it where they exist
#   bash scripts/tiny_recipes.sh meta T      # meta-seeds 3, 4, 5 of the shipped recipe
#   bash scripts/tiny_recipes.sh select      # rank the 7 role nets by the probe on the meta-training tasks (the rule
#                                            # of docs/results/select-tiny/rule.md; ~1 min a task on one core)
#   bash scripts/tiny_recipes.sh select-heldout  # chain T's nets held out (the robust protocol) beside MeZO and the
#                                            # untrained twin: does the rule's pick win? (docs/results/select-tiny)
#   bash scripts/tiny_recipes.sh transfer    # is the best allocation the model's or the task's? The probe on
#                                            # tiny-derived x the two held-out and five meta-training tasks, then
#                                            # scripts/allocation_transfer.py (docs/results/select-tiny/transfer-*.md)
#   bash scripts/tiny_recipes.sh oracle-heldout  # after transfer: each held-out task's own GS-L oracle and the
#                                            # consensus of the five meta-training tasks' oracles, and its own G
#                                            # with their consensus curvature, as fixed-sigma runs beside MeZO
#                                            # (the robust protocol; docs/results/oracle-tiny)
#   bash scripts/tiny_recipes.sh oracle-tolerance  # after oracle-heldout: the same runs with the lr picked by
#                                            # --lr-tolerance 0.05 (docs/results/oracle-tiny-tol05)
#   bash scripts/tiny_recipes.sh coupling    # after oracle-heldout: the separable and the coupled K-step models
#                                            # against the measured allocations (docs/results/oracle-tiny)
#   bash scripts/tiny_recipes.sh permute-heldout  # after oracle-heldout: the shipped net beside the same net with
#                                            # its sigmas applied to shuffled blocks (permute_seed), MeZO's runs
#                                            # copied from oracle-heldout (docs/results/permute-tiny)
#   bash scripts/tiny_recipes.sh meta K      # the per-kind table fitted by ES (es_space kind), meta-seeds 0-2; meta M:
#                                            # 3-5 (one core each, ~12 min a seed)
#   bash scripts/tiny_recipes.sh meta H0; ... meta H1  # the same with the reward at 8e-4 over 60 steps (seeds 0, 1)
#   bash scripts/tiny_recipes.sh kind-heldout  # their held-out evaluation beside MeZO, the shipped net and the
#                                            # untrained twin they all start from (docs/results/kind-tiny)
#   bash scripts/tiny_recipes.sh metaval     # the same nets on meta-training tasks (tiny-derived x synth-sentiment,
#                                            # synth-size): can a run that never sees a held-out task tell the
#                                            # meta-seeds apart? (docs/results/metaval-tiny)
# Every step resumes: a meta-train restarts from its last.ckpt, a compare keeps its finished runs and adds the
# artifacts that exist now (run `heldout` again after `meta B` to add es). Outputs under runs/recipes/; the
# tables go to docs/results/heldout-tiny/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=runs/recipes
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
# Every recipe here starts from the plain greedy recipe that was shipped while they were measured: meta_configs/tiny.yaml
# without the role embedding it has since stop 22 (which chain D's "role" is).
PLAIN="--config meta_configs/tiny.yaml --role-embedding-dim 0"
# On-policy trajectories (no teacher), at the inner lr the held-out runs use, one trajectory of 300 meta-steps.
COMMON="$PLAIN --steps 300 --p-teacher 0 --inner-lr 2e-4 --reset-every 300 \
  --checkpoint-every 25 --no-progress"
FEATS="--feature-log-numel --feature-weight-norm --feature-drift --feature-curvature fisher --feature-grad-rms"
declare -A RECIPES=(
  [expected]="--objective expected"
  [distill]="--objective distill"
  [distill-feat]="--objective distill $FEATS"
  # es: 100 meta-steps, because each costs 4 antithetic pairs of 10-step fine-tunes (~20 s on one core)
  [es]="--objective es --unroll-steps 10 --es-pairs 4 --batch-size 8 --outer-batch heldout --steps 100"
)
declare -A CHAINS=([A]="expected distill distill-feat" [B]="es" [C]="greedy greedy-feat"
                  [D]="greedy-logn greedy-wnorm greedy-drift greedy-curv greedy-gradrms greedy-role greedy-depth"
                  [S]="role-seed1 role-seed2" [L]="role-long"
                  [T]="role-seed3 role-seed4 role-seed5"
                  [K]="es-kind-seed0 es-kind-seed1 es-kind-seed2" [M]="es-kind-seed3 es-kind-seed4 es-kind-seed5"
                  [H0]="es-kind-hot-seed0" [H1]="es-kind-hot-seed1")
# Chain C, the feature ablation on the recipe that works: the shipped recipe (meta_configs/tiny.yaml as it is:
# greedy, teacher trajectory, 600 meta-steps) re-made, and the same with the per-block features of issue 15.
declare -A OWN=([greedy]="$PLAIN --checkpoint-every 100 --no-progress"
                [greedy-feat]="$PLAIN --checkpoint-every 100 --no-progress $FEATS")
# Chain D, one feature at a time on the shipped recipe (item 3: a feature is kept only if its ablation shows it helps).
declare -A ONE=([logn]="--feature-log-numel" [wnorm]="--feature-weight-norm" [drift]="--feature-drift"
                [curv]="--feature-curvature fisher" [gradrms]="--feature-grad-rms" [role]="--role-embedding-dim 4"
                [depth]="--depth-feature")
for f in "${!ONE[@]}"; do OWN[greedy-$f]="$PLAIN --checkpoint-every 100 --no-progress ${ONE[$f]}"; done
# Chains S and L: the shipped recipe itself (role embedding included). S asks whether its wins are the recipe's or
# one lucky meta-training seed's; L whether more meta-training buys speed (the forwards target).
SHIPPED="--config meta_configs/tiny.yaml --checkpoint-every 100 --no-progress"
OWN[role-seed1]="$SHIPPED --seed 1" && OWN[role-seed2]="$SHIPPED --seed 2" && OWN[role-long]="$SHIPPED --steps 2400"
# Chain T: three more meta-seeds, never evaluated held out before the selection rule below (`select`) picked one.
for s in 3 4 5; do OWN[role-seed$s]="$SHIPPED --seed $s"; done
# Chains K and M (stop 30): the shipped net's win is a per-kind table (docs/results/permute-tiny), and greedy lands on
# another table for each meta-seed. Here ES fits the table alone (11 numbers, a log-scale per block kind on the
# shipped architecture's untrained net, net_seed 0 for every meta-seed) on the reward users measure: the dev-loss drop
# of a 40-step on-policy ZO run at lr 4e-4 (MeZO's cliff on the held-out tasks), 4 antithetic pairs, 60 meta-steps.
ESKIND="--config meta_configs/tiny.yaml --objective es --kind-scale --es-space kind --unroll-steps 40 --es-pairs 4 \
  --es-sigma 0.2 --meta-lr 0.05 --batch-size 8 --outer-batch heldout --p-teacher 0 --inner-lr 4e-4 --reset-every 300 \
  --steps 60 --checkpoint-every 10 --no-progress"
for s in 0 1 2 3 4 5; do OWN[es-kind-seed$s]="$ESKIND --seed $s"; done
# Chain H (stop 30, after kind-heldout): the tables above raise the embedding, which lowers the held-out lr cliff, and
# a 40-step reward at 4e-4 never sees the cliff. The same search with the reward at 8e-4 (past MeZO's cliff) over 60
# steps, where an allocation that lowers the cliff loses reward; 40 meta-steps, meta-seeds 0 and 1.
for s in 0 1; do
  OWN[es-kind-hot-seed$s]="$ESKIND --seed $s --inner-lr 8e-4 --unroll-steps 60 --steps 40"
done

meta() {  # meta-train one recipe, resuming from its last checkpoint
  local name=$1 logdir=$OUT/meta/$1 art=$OUT/art/tiny-$1 resume=()
  [ -f "$art/l2zo_artifact.json" ] && return 0
  if [ -f "$logdir/checkpoints/last.ckpt" ]; then resume=(--resume "$logdir/checkpoints/last.ckpt"); fi
  local t0=$SECONDS
  # shellcheck disable=SC2086
  $PY -m l2zo.cli.main meta-train ${OWN[$name]:-$COMMON ${RECIPES[$name]:-}} --output "$art" --logdir "$logdir" "${resume[@]}" \
    >>"$OUT/meta/$name.log" 2>&1
  echo "$name: $((SECONDS - t0)) s wall this leg ($(date -u +%FT%TZ), $(lscpu | sed -n 's/Model name: *//p'))" \
    >>"$OUT/meta/costs.txt"
}

# The held-out protocol of EVALUATION.md §0b, shared by heldout, ablation and confirm: tiny-derived x {synth-color,
# synth-successor}, 300 steps, lr tuned on dev on seed 100, paired seeds; tables under docs/results/<name>.
# Args: optimizers, seeds, lr grid, champions, output name under $OUT, docs folder. "The shipped net" (bare learned,
# learned-random, per-block-const) is the plain greedy one shipped until stop 22, kept in docs/results/meta-tiny.
evaluate() {
  $PY scripts/evaluate_heldout.py --artifact docs/results/meta-tiny/tiny-greedy-v1 --models tiny-derived \
    --tasks "${TASKS:-synth-color,synth-successor}" --optimizers "$1" --steps 300 --seeds "$2" --batch-size 16 --eval-every 50 \
    --num-train 1000 --num-dev 200 --num-test 300 --max-length 64 --lr-grid "$3" --tune-seeds "${TUNE_SEEDS:-100}" --baseline mezo \
    --champions "$4" --out "$OUT/$5" --docs "$6" --jobs "${JOBS:-2}" --threads 1 --lr-tolerance "${LR_TOLERANCE:-0}"
}

add_role_nets() {  # the nets of chains S and L that are meta-trained, appended to $opts and $champions
  for name in role-seed1 role-seed2 role-long; do
    [ -f "$OUT/art/tiny-$name/l2zo_artifact.json" ] || continue
    opts="$opts,learned=$OUT/art/tiny-$name:label=learned-$name" && champions="$champions,learned-$name"
  done
}

newer_than() {  # true when file $1 exists and is newer than every probe.json under the folders $2...
  [ -f "$1" ] || return 1
  local dir
  for dir in "${@:2}"; do [ "$1" -nt "$dir/probe.json" ] || return 1; done
}

oracle_opts() {  # oracle-heldout's allocations, as fixed-sigma runs beside MeZO, into $opts
  local P=$OUT/transfer-probes
  opts="mezo,fixed-sigma:sigma_file=$P/derived-{task}/sigma/gsl.json:label=gsl-own"
  opts="$opts,fixed-sigma:sigma_file=$OUT/transfer-sigma/{task}/consensus-{task}.json:label=gsl-meta-consensus"
  # the task's own G with the meta-training tasks' consensus curvature: the half of the oracle that forward
  # passes on the task can measure, with the half that transfers (stop 25)
  opts="$opts,fixed-sigma:sigma_file=$OUT/transfer-sigma/{task}/own-g-{task}.json:label=gsl-own-g"
  # the task's oracle with both halves measured by forward passes alone (probe-blocks --zo-probes, 48 pairs)
  opts="$opts,fixed-sigma:sigma_file=$OUT/transfer-sigma/{task}/zo-own-{task}.json:label=gsl-zo-own"
  # the allocation that maximises the mean log R_K over the five meta-training tasks' statistics: one static
  # allocation learned from them, the same for both held-out tasks (stop 26; l2zo.blockstats.kstep_opt)
  opts="$opts,fixed-sigma:sigma_file=$OUT/transfer-sigma/{task}/kopt-others-{task}.json:label=kopt-meta"
  opts="$opts,fixed-sigma:sigma_file=$OUT/transfer-sigma/{task}/kopt-coupled-own-{task}.json:label=kopt-coupled-own"
  # the allocation that maximises the mean log coupled R_K over the five meta-training tasks (stop 28)
  opts="$opts,fixed-sigma:sigma_file=$OUT/transfer-sigma/kopt-coupled-meta.json:label=kopt-coupled-meta"
  opts="$opts,fixed-sigma:sigma_file=$OUT/transfer-sigma/kopt-coupled-meta-permuted.json:label=kopt-coupled-meta-permuted"
  opts="$opts,fixed-sigma:sigma_file=$OUT/transfer-sigma/damp-embed.json:label=damp-embed"
}
ORACLE_CHAMPIONS=gsl-own,gsl-meta-consensus,gsl-own-g,gsl-zo-own,kopt-meta,kopt-coupled-own,kopt-coupled-meta

case ${1:-} in
  meta)
    mkdir -p "$OUT/meta"
    for name in ${CHAINS[${2:?chain A, B, C, D, S, L, T, K, M, H0 or H1}]}; do meta "$name"; done
    ;;
  heldout)
    opts="mezo,learned-random,per-block-const,learned:label=learned-greedy"
    # expected's net wants a larger lr than MeZO's (its 150-step tuning runs were still improving at 4e-4)
    grid="2e-4,4e-4,8e-4;learned-expected=8e-4,1.6e-3,3.2e-3"
    for name in expected distill distill-feat es greedy greedy-feat; do
      label=learned-$name && [ "$name" = greedy ] && label=learned-greedy-remade  # beside the shipped one
      [ -f "$OUT/art/tiny-$name/l2zo_artifact.json" ] && opts="$opts,learned=$OUT/art/tiny-$name:label=$label"
    done
    [ -f "$OUT/art/tiny-expected/l2zo_artifact.json" ] || grid=${grid%%;*}
    # tiny-derived only: the base tiny already knows the colours and the number order (dev loss ~0 at step 0,
    # nothing to learn), and synth-negation stays at chance for every optimizer at these budgets (EVALUATION.md §0b).
    evaluate "$opts" 0,1,2 "$grid" \
      learned-greedy,learned-expected,learned-distill,learned-distill-feat,learned-es,learned-greedy-remade,learned-greedy-feat \
      heldout docs/results/heldout-tiny
    ;;
  ablation)
    # The shipped net (the recipe without any of these features) and MeZO beside each one-feature net, with the
    # protocol of `heldout`; its own folder and table (docs/results/ablation-tiny).
    opts="mezo,learned:label=learned-greedy"
    champions=learned-greedy
    for f in "${!ONE[@]}"; do
      [ -f "$OUT/art/tiny-greedy-$f/l2zo_artifact.json" ] || continue
      opts="$opts,learned=$OUT/art/tiny-greedy-$f:label=learned-greedy-$f" && champions="$champions,learned-greedy-$f"
    done
    evaluate "$opts" 0,1,2 2e-4,4e-4,8e-4 "$champions" ablation docs/results/ablation-tiny
    ;;
  confirm)
    # A feature that won a pair of the ablation, re-measured on 6 seeds (0-5, the ablation's 0-2 among them) with
    # the untrained net of each architecture (learned-random takes the artifact's spec: the role embedding adds
    # inputs, so its random net is another one).
    f=${2:?a feature of chain D, e.g. role}
    art=$OUT/art/tiny-greedy-$f
    [ -f "$art/l2zo_artifact.json" ] || { echo "meta-train it first: $0 meta D" >&2; exit 2; }
    opts="mezo,learned:label=learned-greedy,learned-random,learned=$art:label=learned-greedy-$f"
    opts="$opts,learned-random=$art:label=learned-random-$f"
    evaluate "$opts" 0,1,2,3,4,5 2e-4,4e-4,8e-4 "learned-greedy,learned-greedy-$f" "confirm-$f" \
      "docs/results/confirm-tiny-$f"
    ;;
  robust)
    # confirm's finding re-measured with an lr that must hold on two tuning seeds: on seed 100 alone the twin picked
    # 8e-4, which diverges on seeds 0-2 (EVALUATION.md §0b). The grid gains 1e-4 below and 1.6e-3 above.
    ship=checkpoints/tiny/zo-finetuner
    opts="mezo,learned=$ship:label=learned-role,learned-random=$ship:label=learned-random-role,learned-random"
    champions=learned-role
    add_role_nets
    TUNE_SEEDS=100,101 evaluate "$opts" 0,1,2,3,4,5 1e-4,2e-4,4e-4,8e-4,1.6e-3 "$champions" robust \
      docs/results/robust-tiny
    ;;
  select|transfer)
    # Every net of the recipe scored on the meta-training tasks only; a finished probe is re-scored (--resume)
    # without measuring again, so nets added later cost seconds.
    arts=(checkpoints/tiny/zo-finetuner docs/results/meta-tiny/tiny-role-seed1 docs/results/meta-tiny/tiny-role-seed2
          docs/results/meta-tiny/tiny-role-long "$OUT"/art/tiny-role-seed{3,4,5})
    args=() && for a in "${arts[@]}"; do args+=(--artifact "$a"); done
    if [ "$1" = transfer ]; then
      # the same probe on the derivative (where the held-out tasks are not yet solved), held-out tasks included
      mkdir -p "$OUT/transfer-probes"
      for t in synth-color synth-successor synth-sentiment synth-category synth-size synth-parity synth-compare; do
        resume=() && [ -f "$OUT/transfer-probes/derived-$t/status.json" ] && resume=(--resume)
        # the held-out tasks also get the forward-only G and Fisher (stop 25: 1218 forwards a pair, ~20 min a task on one
        # core beside three other jobs)
        zo=() && case $t in synth-color|synth-successor) zo=(--zo-probes 4) ;; esac
        $PY -m l2zo.cli.main probe-blocks --model tiny-derived --task "$t" "${args[@]}" --states 0,100,200 \
          --mezo-lr 2e-4 --pairs 16 --output "$OUT/transfer-probes/derived-$t" "${resume[@]}" "${zo[@]}" \
          >>"$OUT/transfer-probes/derived-$t.log" 2>&1
      done
      # the shipped net (learned-1) and the untrained one: how task-dependent is a net's allocation?
      $PY scripts/allocation_transfer.py "$OUT"/transfer-probes/derived-*/ --allocation learned-1 --allocation learned-random \
        --out docs/results/select-tiny/transfer-derived.md
      $PY scripts/allocation_transfer.py "$OUT"/select-probes/probe-*/ --out docs/results/select-tiny/transfer-tiny.md
      exit 0
    fi
    mkdir -p "$OUT/select-probes"
    for t in synth-sentiment synth-category synth-size synth-parity synth-compare; do
      resume=() && [ -f "$OUT/select-probes/probe-$t/status.json" ] && resume=(--resume)
      $PY -m l2zo.cli.main probe-blocks --model tiny --task "$t" "${args[@]}" --states 0,100,200 --mezo-lr 2e-4 \
        --pairs 16 --output "$OUT/select-probes/probe-$t" "${resume[@]}" >>"$OUT/select-probes/$t.log" 2>&1
    done
    $PY scripts/rank_artifacts.py "$OUT"/select-probes/probe-*/ --out docs/results/select-tiny/ranking.md
    ;;
  select-heldout)
    ship=checkpoints/tiny/zo-finetuner
    opts="mezo,learned-random=$ship:label=learned-random-role" && champions=""
    for s in 3 4 5; do
      opts="$opts,learned=$OUT/art/tiny-role-seed$s:label=learned-role-seed$s" && champions="$champions,learned-role-seed$s"
    done
    TUNE_SEEDS=100,101 evaluate "$opts" 0,1,2,3,4,5 1e-4,2e-4,4e-4,8e-4,1.6e-3 "${champions#,}" select \
      docs/results/select-tiny
    ;;
  oracle-heldout)
    # The headroom a task-aware allocation could claim (the task's own oracle, from a backprop probe on its train
    # split) against what a static allocation learned from the meta-training family could (their consensus).
    P=$OUT/transfer-probes
    [ -f "$P/derived-synth-color/probe.json" ] || { echo "run $0 transfer first" >&2; exit 2; }
    meta=() && for t in synth-sentiment synth-category synth-size synth-parity synth-compare; do meta+=("$P/derived-$t"); done
    # the decomposition over all seven tasks (which half of the oracle is the task's), then each held-out task
    # against the five meta-training tasks only
    # (~2 min each; re-made only when a probe is newer than the table: a resume of the compares does not redo them)
    newer_than docs/results/oracle-tiny/transfer-all.md "$P"/derived-*/ \
      || $PY scripts/allocation_transfer.py "$P"/derived-*/ --out docs/results/oracle-tiny/transfer-all.md >/dev/null
    for t in synth-color synth-successor; do
      [ -d "$OUT/transfer-sigma/$t" ] && newer_than "docs/results/oracle-tiny/transfer-$t.md" "$P/derived-$t" "${meta[@]}" \
        || $PY scripts/allocation_transfer.py "$P/derived-$t" "${meta[@]}" --write-sigma "$OUT/transfer-sigma/$t" \
          --kstep-opt "$t" --out "docs/results/oracle-tiny/transfer-$t.md" >/dev/null
    done
    # the task's own allocation that maximises R_K under the coupled K-step model (stop 27; its Hessian Gram of the
    # block gradients, one HVP per block: a backprop oracle like gsl-own), fitted once per task
    for t in synth-color synth-successor; do
      f=$OUT/transfer-sigma/$t/kopt-coupled-own-$t.json
      [ -f "$f" ] || $PY scripts/kstep_coupling.py "$P/derived-$t" --gram "$OUT/gram/$t.pt" --kstep-opt \
        --kstep-iters 100 --write-sigma "$f" >/dev/null
    done
    # one static allocation fitted under the coupled model to the five meta-training tasks (stop 28; a Gram each,
    # ~3 min on one core, kept under $OUT/gram): the same file for both held-out tasks, which it never saw
    f=$OUT/transfer-sigma/kopt-coupled-meta.json
    if [ ! -f "$f" ]; then
      fit=() && for t in synth-sentiment synth-category synth-size synth-parity synth-compare; do
        fit+=(--fit-on "$P/derived-$t=$OUT/gram/$t.pt")
      done
      $PY scripts/kstep_coupling.py "$P/derived-synth-color" --gram "$OUT/gram/synth-color.pt" --kstep-opt \
        --kstep-iters 100 "${fit[@]}" --write-sigma "$f" >/dev/null
    fi
    # its control: the same sigmas shuffled across the blocks (seed 0), what their assignment to blocks is worth
    [ -f "${f%.json}-permuted.json" ] || $PY scripts/kstep_coupling.py "$P/derived-synth-color" \
      --gram "$OUT/gram/synth-color.pt" --allocation "kopt-coupled-meta=$f" \
      --permuted "kopt-coupled-meta=${f%.json}-permuted.json" >/dev/null
    # MeZO with the embedding's sigma at 1/4 of the other blocks' (stop 28): does one block set MeZO's lr cliff?
    f=$OUT/transfer-sigma/damp-embed.json
    [ -f "$f" ] || $PY scripts/sigma_file.py --model tiny-derived --scale embed_tokens=0.25 --out "$f" >/dev/null
    oracle_opts
    TUNE_SEEDS=100,101 evaluate "$opts" 0,1,2,3,4,5 1e-4,2e-4,4e-4,8e-4,1.6e-3 "$ORACLE_CHAMPIONS" oracle \
      docs/results/oracle-tiny
    ;;
  oracle-tolerance)
    # oracle-heldout again with --lr-tolerance 0.05 (stop 28): the smallest lr whose tuning decrease is within 5%
    # of the best lr's. Its tuning runs and the runs whose pick does not move are copied, not re-run.
    [ -f "$OUT/oracle/tiny-derived/synth-color/compare.json" ] || { echo "run $0 oracle-heldout first" >&2; exit 2; }
    [ -d "$OUT/oracle-tol05" ] || cp -r "$OUT/oracle" "$OUT/oracle-tol05"
    oracle_opts
    TUNE_SEEDS=100,101 LR_TOLERANCE=0.05 evaluate "$opts" 0,1,2,3,4,5 1e-4,2e-4,4e-4,8e-4,1.6e-3 \
      "$ORACLE_CHAMPIONS" oracle-tol05 docs/results/oracle-tiny-tol05
    ;;
  permute-heldout)
    # The control every claimed win needs (stop 29): is the shipped net's win which blocks it perturbs more? The
    # same net, features and recurrent state, its sigmas applied to blocks shuffled by a seed, renormalised
    # (learned:permute_seed), across all blocks or only among blocks of a kind (permute_within_kind: each kind keeps
    # what it gets, the layers trade); beside it its per-kind means as a static allocation (per-block-const from the
    # artifact's sigma_by_kind) and MeZO with the embedding damped. MeZO's and damp-embed's runs are oracle-heldout's
    # (the same protocol and bits), copied, not re-run.
    [ -f "$OUT/oracle/tiny-derived/synth-color/compare.json" ] || { echo "run $0 oracle-heldout first" >&2; exit 2; }
    for t in synth-color synth-successor; do
      d=$OUT/permute/tiny-derived/$t
      mkdir -p "$d/tune"
      [ -f "$d/compare.json" ] || cp "$OUT/oracle/tiny-derived/$t/compare.json" "$d/"  # the experiment, resumed
      for label in mezo damp-embed; do
        [ -d "$d/$label" ] || cp -r "$OUT/oracle/tiny-derived/$t/$label" "$d/"
        [ -d "$d/tune/$label" ] || cp -r "$OUT/oracle/tiny-derived/$t/tune/$label" "$d/tune/"
      done
    done
    ship=checkpoints/tiny/zo-finetuner
    opts="mezo,fixed-sigma:sigma_file=$OUT/transfer-sigma/damp-embed.json:label=damp-embed"
    opts="$opts,learned=$ship:label=learned-role,learned=$ship:permute_seed=0:label=learned-role-permuted"
    opts="$opts,learned=$ship:permute_seed=1:label=learned-role-permuted-1"
    opts="$opts,learned=$ship:permute_seed=0:permute_within_kind=true:label=learned-role-permuted-kind"
    opts="$opts,per-block-const=$ship:label=per-block-const-role"
    # two other meta-seeds' per-kind tables, static (stop 29): seed 4's net beat MeZO on synth-color, seed 1's lost
    for s in 1 4; do opts="$opts,per-block-const=docs/results/meta-tiny/tiny-role-seed$s:label=per-block-const-seed$s"; done
    champions=learned-role,learned-role-permuted,learned-role-permuted-1,learned-role-permuted-kind,per-block-const-role
    champions=$champions,per-block-const-seed1,per-block-const-seed4
    TUNE_SEEDS=100,101 evaluate "$opts" 0,1,2,3,4,5 1e-4,2e-4,4e-4,8e-4,1.6e-3 "$champions" permute \
      docs/results/permute-tiny
    ;;
  coupling)
    # The separable K-step model against the one that couples the blocks' gradient directions through the Hessian
    # (l2zo.blockstats.coupled), on the allocations oracle-heldout measured (stop 27; one Gram per task, ~3 min)
    P=$OUT/transfer-probes
    [ -f docs/results/oracle-tiny/summary.csv ] || { echo "run $0 oracle-heldout first" >&2; exit 2; }
    for t in synth-color synth-successor; do
      S=$OUT/transfer-sigma/$t
      $PY scripts/kstep_coupling.py "$P/derived-$t" --gram "$OUT/gram/$t.pt" \
        --allocation "gsl-own=$P/derived-$t/sigma/gsl.json" --allocation "gsl-meta-consensus=$S/consensus-$t.json" \
        --allocation "gsl-own-g=$S/own-g-$t.json" --allocation "gsl-zo-own=$S/zo-own-$t.json" \
        --allocation "kopt-meta=$S/kopt-others-$t.json" --allocation "kopt-coupled-own=$S/kopt-coupled-own-$t.json" \
        --allocation "kopt-coupled-meta=$OUT/transfer-sigma/kopt-coupled-meta.json" \
        --allocation "kopt-coupled-meta-permuted=$OUT/transfer-sigma/kopt-coupled-meta-permuted.json" \
        --allocation "damp-embed=$OUT/transfer-sigma/damp-embed.json" \
        --measured docs/results/oracle-tiny/summary.csv \
        --out "docs/results/oracle-tiny/coupling-$t.md" >/dev/null
    done
    ;;
  kind-heldout)
    # The ES-fitted per-kind tables (chains K, M, H0, H1) held out with the robust protocol, beside MeZO, the shipped net and
    # the untrained twin every table multiplies (learned-random of their spec, net_seed 0: its table all zeros)
    ship=checkpoints/tiny/zo-finetuner
    art0=$OUT/art/tiny-es-kind-seed0
    [ -f "$art0/l2zo_artifact.json" ] || { echo "meta-train them first: $0 meta K; $0 meta M" >&2; exit 2; }
    opts="mezo,learned=$ship:label=learned-role,learned-random=$art0:label=learned-random-kind" && champions=""
    for name in es-kind-seed{0,1,2,3,4,5} es-kind-hot-seed{0,1}; do
      [ -f "$OUT/art/tiny-$name/l2zo_artifact.json" ] || continue
      opts="$opts,learned=$OUT/art/tiny-$name:label=learned-$name" && champions="$champions,learned-$name"
    done
    TUNE_SEEDS=100,101 evaluate "$opts" 0,1,2,3,4,5 1e-4,2e-4,4e-4,8e-4,1.6e-3 "${champions#,},learned-role" kind \
      docs/results/kind-tiny
    # the fitted tables themselves (the `table` column: exp of each kind's log-scale)
    for name in es-kind-seed{0,1,2,3,4,5} es-kind-hot-seed{0,1}; do
      a=$OUT/art/tiny-$name
      [ -f "$a/l2zo_artifact.json" ] && $PY -m l2zo.cli.main inspect "$a"
    done >docs/results/kind-tiny/tables.txt
    ;;
  metaval)
    # Selecting among meta-trained nets on the held-out pairs would be selecting on the test: this measures them on
    # two of the meta-training tasks instead (on the derivative, which meta-training never saw), 3 seeds.
    ship=checkpoints/tiny/zo-finetuner
    opts="mezo,learned=$ship:label=learned-role" && champions=learned-role
    add_role_nets
    TASKS=synth-sentiment,synth-size TUNE_SEEDS=100,101 evaluate "$opts" 0,1,2 1e-4,2e-4,4e-4,8e-4,1.6e-3 \
      "$champions" metaval docs/results/metaval-tiny
    ;;
  *) echo "usage: $0 meta A|B|C|D|S|L|T|K|M|H0|H1 | heldout | ablation | confirm F | robust | select | select-heldout | transfer | oracle-heldout | oracle-tolerance | permute-heldout | coupling | kind-heldout | metaval" >&2
     exit 2 ;;
esac

#!/usr/bin/env bash
# Beyond-paper meta-training variants on the tiny world, each against MeZO and the untrained net on the held-out
# synth-color (tiny-derived), on the same batches and seeds. Reported in EVALUATION.md ("Variants").
#   bash scripts/tiny_variants.sh            # ~40 min on one CPU core; runs/variants/, table in docs/results/tiny-variants
# Every variant: meta_configs/tiny.yaml with 300 meta-steps and one change (the paper's recipe is "paper"), without
# the role embedding that config has had since stop 22 (these variants were measured before it).
set -euo pipefail
cd "$(dirname "$0")/.."
L2ZO=${L2ZO:-.venv/bin/l2zo}
OUT=runs/variants
STEPS=300
declare -A VARIANTS=(
  [paper]=""
  [heldout]="--outer-batch heldout"
  [onpolicy]="--p-teacher 0"
  [onpolicy-heldout]="--p-teacher 0 --outer-batch heldout"
  [unrolled3]="--objective unrolled --unroll-steps 3"
  [normfeat]="--normalize-features --log-scale"
  [role-depth]="--role-embedding-dim 4 --depth-feature"
  [long]="--steps 1200 --reset-every 300"
)
ORDER=(paper heldout onpolicy onpolicy-heldout unrolled3 normfeat role-depth long)
opts="mezo:lr=1e-4,learned-random:lr=1e-4"
for v in "${ORDER[@]}"; do
  art=$OUT/artifacts/$v  # the folder name labels the run: learned@artifact=<variant>
  if [ ! -f "$art/l2zo_artifact.json" ]; then
    # shellcheck disable=SC2086
    $L2ZO meta-train --config meta_configs/tiny.yaml --role-embedding-dim 0 --steps $STEPS ${VARIANTS[$v]} --output "$art" \
      --logdir "$OUT/meta/$v" --overwrite --no-progress
  fi
  opts="$opts,learned=$art:lr=1e-4"
done
$L2ZO compare --model tiny-derived --task synth-color --optimizers "$opts" --steps 200 --seeds 0,1,2 \
  --eval-every 100 --num-dev 200 --num-test 300 --logdir "$OUT/compare" --overwrite
mkdir -p docs/results/tiny-variants
cp "$OUT"/compare/summary.md "$OUT"/compare/summary.csv "$OUT"/compare/*.png docs/results/tiny-variants/

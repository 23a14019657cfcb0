#!/usr/bin/env bash
# The zero-shot and few-shot miniature on the embedded faces (issue 18): the tables of docs/BENCHMARKS.md.
#   bash benchmarks/proof_fewshot_zeroshot_embedded.sh [OUT] [extra overrides for every run]
# e.g. with the main job's generated set instead of the rendered stand-in:
#   bash benchmarks/proof_fewshot_zeroshot_embedded.sh runs/proof/fsz data.synthetic.format=synthetic data.synthetic.root=DIR
# One thread per process (OMP_NUM_THREADS=1 unless set), one run after another; ~15 minutes on a 2-vCPU Xeon.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/proof/fewshot_zeroshot}
shift || true
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
COMMON=("paths.runs_dir=$OUT/runs" "trainer.enable_progress_bar=false" "trainer.log_every_n_steps=50" "$@")

# Zero-shot: the untrained tiny dual encoder (chance), then tuned on real, synthetic, and real + synthetic captions.
"$PY" run.py zeroshot experiment=zeroshot/embedded_tiny "${COMMON[@]}"
for exp in embedded_tiny embedded_tiny_synthetic embedded_tiny_both; do
  "$PY" run.py fit experiment=zeroshot/$exp "${COMMON[@]}"
done
"$PY" run.py table "$OUT/runs/zeroshot" --group-by task experiment data.mix.synthetic_ratio --out "$OUT/tables/zeroshot"

# Few-shot: K in {1, 5, 10, 20} x real only / real + synthetic (half of every batch) x 3 episodes.
"$PY" run.py sweep experiment=sweeps/fewshot_embedded "sweep.out=$OUT/fewshot" "${COMMON[@]}"
# Synthetic-only pre-training, then K-shot fine-tuning from its weights.
"$PY" run.py fit experiment=fewshot/embedded_synthetic_pretrain "${COMMON[@]}"
CKPT=$(ls -t "$OUT"/runs/fewshot/embedded_synthetic_pretrain/*/checkpoints/last.ckpt | head -1)
"$PY" run.py sweep experiment=sweeps/fewshot_embedded "sweep.grid.data.mix.synthetic_ratio=[0]" \
  "model.init_from=$CKPT" "sweep.out=$OUT/fewshot_pretrained" "${COMMON[@]}"
"$PY" run.py table "$OUT/fewshot" "$OUT/fewshot_pretrained" --group-by data.train.shots data.mix.synthetic_ratio \
  model.init_from --metrics test.accuracy --out "$OUT/tables/fewshot"

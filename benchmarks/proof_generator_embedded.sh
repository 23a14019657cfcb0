#!/usr/bin/env bash
# Issue 3 proof: the embedded generator's samples, with and without semantic guidance, judged by a
# classifier trained on real embedded faces. The guidance classifier and the judge are DIFFERENT
# networks, so guidance cannot simply game the judge.
#   GEN=runs/generator/embedded/<run>/export GUIDE=<classifier.ckpt> JUDGE=<classifier.ckpt> \
#     bash benchmarks/proof_generator_embedded.sh OUT_DIR [NUM_IMAGES] [STEPS]
set -euo pipefail
OUT=${1:?output folder}; N=${2:-400}; STEPS=${3:-30}
PY=${PY:-.venv/bin/python}
: "${GEN:?GEN=generator export folder}" "${GUIDE:?GUIDE=guidance classifier ckpt}" "${JUDGE:?JUDGE=judge classifier ckpt}"
for arm in plain sg; do
  extra=()
  [ "$arm" = sg ] && extra=(experiment=generator/synthesize_sg "guidance.classifier=$GUIDE")
  [ "$arm" = plain ] && extra=(experiment=generator/synthesize_embedded)
  /usr/bin/time -v "$PY" run.py synthesize "${extra[@]}" "synthesis.generator=$GEN" "synthesis.out=$OUT/$arm" \
      "synthesis.num_images=$N" "sampling.steps=$STEPS" trainer.enable_progress_bar=false "run_dir=$OUT/synth_$arm" \
      2>&1 | grep -E "synfer|Elapsed|Maximum resident"
  "$PY" run.py evaluate-generation experiment=generator/evaluate_generation "generation_eval.dataset=$OUT/$arm" \
      "generation_eval.judge=$JUDGE" trainer.enable_progress_bar=false "run_dir=$OUT/eval_$arm" 2>&1 | tail -n 25
done

#!/usr/bin/env bash
# Issue 4 proof on the embedded faces.
#   phase "train":      the diffusion labeler (frozen generator UNet) and a plain timm classifier on the SAME split.
#   phase "downstream": rectify a synthetic set with [diffusion labeler, another classifier], then train the
#                       supervised module on that set with intended (manifest v1) and rectified (v2) labels;
#                       both are tested on real embedded test faces.
#   GEN=<generator export> bash benchmarks/proof_labeler_embedded.sh train OUT
#   SYN=<synthetic set> LABELERS=<ckpt>,<ckpt>,... bash benchmarks/proof_labeler_embedded.sh downstream OUT
set -euo pipefail
PHASE=${1:?train|downstream}; OUT=${2:?output folder}
PY=${PY:-.venv/bin/python}
common=(trainer.enable_progress_bar=false data.num_workers=0)
if [ "$PHASE" = train ]; then
  : "${GEN:?GEN=generator export folder}"
  "$PY" run.py fit experiment=labeler/embedded "labeler.unet_path=$GEN" "${common[@]}" "run_dir=$OUT/labeler_diffusion" 2>&1 | tail -n 22
  "$PY" run.py fit experiment=labeler/embedded_timm "${common[@]}" "run_dir=$OUT/labeler_timm" 2>&1 | tail -n 22
else
  : "${SYN:?SYN=synthetic set}" "${LABELERS:?LABELERS=comma-separated ensemble checkpoints}"
  "$PY" run.py label experiment=labeler/rectify "labeling.dataset=$SYN" "labeling.ensemble=[$LABELERS]" "${common[@]}" \
      "run_dir=$OUT/label" 2>&1 | tail -n 12
  for version in 1 2; do
    "$PY" run.py fit experiment=supervised/embedded "${common[@]}" data.image_size=32 model.small_input=true \
        data.train.num_images=3200 data.test.num_images=800 \
        "data.synthetic={format: synthetic, root: '$SYN', version: $version}" data.mix.synthetic_ratio=1.0 \
        data.mix.synthetic_scale=1.0 trainer.max_epochs=6 "run_dir=$OUT/synthetic_only_v$version" 2>&1 | tail -n 20
  done
fi

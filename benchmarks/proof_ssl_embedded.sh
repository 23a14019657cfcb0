#!/usr/bin/env bash
# Issue 5 proof: MoCo v3 pre-trained on the embedded faces for at most 20 minutes of CPU (trainer.max_time in
# experiments/ssl/embedded_mocov3.yaml), then the offline linear probe of its backbone against the same probe
# on a randomly initialised backbone of the same architecture (ssl.probe.random_init=true).
#   bash benchmarks/proof_ssl_embedded.sh OUT [pre-training overrides, e.g. data.train.identities=50]
set -euo pipefail
OUT=${1:?output folder}
shift
PY=${PY:-.venv/bin/python}
common=(trainer.enable_progress_bar=false data.num_workers=0)
/usr/bin/time -v "$PY" run.py fit experiment=ssl/embedded_mocov3 "${common[@]}" "run_dir=$OUT/mocov3" "$@" 2>&1 \
    | grep -E "synfer\] (epoch [0-9]+ step [0-9]+ \{|metrics|run dir)|Elapsed|Maximum resident" | cut -c1-200
CKPT=$OUT/mocov3/checkpoints/last.ckpt
for arm in pretrained random; do
  extra=()
  [ "$arm" = random ] && extra=(ssl.probe.random_init=true)
  "$PY" run.py linear "ckpt=$CKPT" experiment=ssl/embedded_linear "${common[@]}" "${extra[@]}" \
      "run_dir=$OUT/linear_$arm" 2>&1 | tail -n 16
done

#!/usr/bin/env bash
# Train the micro latent-thought and vanilla checkpoints that the paper notebooks default to, and copy
# each final model (weights, method config, tokenizer) to assets/micro-{latent,vanilla}.
# Resumable: a killed run continues from its newest checkpoint on the next call.
#   MICRO_STEPS=1000 tools/train_micro.sh [latent|vanilla ...]
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
STEPS=${MICRO_STEPS:-1000}
for m in "${@:-latent vanilla}"; do
  for method in $m; do
    out=runs/micro-$method
    args=(--config configs/micro.yaml "model.method=$method" "train.steps=$STEPS" "train.out_dir=$out"
          train.save_every=100 train.eval_every=250 train.keep_last=1)
    [ "$method" = latent ] && args+=('model.method_args={n_thoughts: 1, train_iters: [2, 3]}')
    [ -d "$out/checkpoints" ] && args+=(--resume)
    echo "== micro $method: $STEPS steps -> $out"
    .venv/bin/latent-thoughts train "${args[@]}"
    .venv/bin/python - "$out" "assets/micro-$method" <<'PY'
import shutil, sys
from latent_thoughts.cli import resolve_checkpoint
src, dst = resolve_checkpoint(sys.argv[1])[0], sys.argv[2]
shutil.rmtree(dst, ignore_errors=True); shutil.copytree(src, dst)
print(f"copied {src} -> {dst}")
PY
  done
done

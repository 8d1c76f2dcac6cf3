#!/usr/bin/env bash
# Fails when nbdev_export or nbdev_clean would change the tracked tree (library out of sync, dirty notebooks).
set -euo pipefail
top=$(git rev-parse --show-toplevel); cd "$top"
bin="$top/.venv/bin"
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
git ls-files -co --exclude-standard -z | xargs -0 cp --parents -t "$tmp"
( cd "$tmp" && "$bin/nbdev_export" >/dev/null && "$bin/nbdev_clean" >/dev/null )
status=0
if ! diff -r -x __pycache__ latent_thoughts "$tmp/latent_thoughts" >/dev/null; then
  echo "latent_thoughts/ differs from what nbdev_export makes of nbs/ (run: make export):"; diff -rq -x __pycache__ latent_thoughts "$tmp/latent_thoughts" || true; status=1
fi
if ! diff -r nbs "$tmp/nbs" >/dev/null; then
  echo "notebooks are not clean (run: make export):"; diff -rq nbs "$tmp/nbs" || true; status=1
fi
[ $status -eq 0 ] && echo "check-sync: library and notebooks in sync"
exit $status

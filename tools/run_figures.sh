#!/usr/bin/env bash
# Run every paper notebook (nbs/papers/*.ipynb) through papermill. Figures land in figures/;
# executed notebooks go to executed/ (git-ignored), never back into nbs/.
# Extra arguments go to papermill, e.g.: tools/run_figures.sh -p n_tokens 64
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p executed figures
for nb in nbs/papers/*.ipynb; do
  name=$(basename "$nb")
  echo "== $name"
  .venv/bin/papermill "$nb" "executed/$name" --cwd . -k python3 --log-output "$@"
done

#!/usr/bin/env bash
# Run every paper notebook (nbs/figNN_*, nbs/tabNN_*, nbs/adaptive_figNN_*, nbs/adaptive_tabNN_*) through papermill.
# Figures and tables land in figures/; executed notebooks go to executed/ (git-ignored), never back into nbs/.
#   tools/run_figures.sh                      all notebooks on their defaults (what `make figures` runs)
#   tools/run_figures.sh --smoke              all at smoke scale (their `(smoke: ...)` values), into executed/smoke/figures
#   tools/run_figures.sh --only 'fig12*'      only the notebooks whose file name matches the glob
#   tools/run_figures.sh -p checkpoint runs/x extra arguments go to papermill (every notebook must declare them)
set -euo pipefail
cd "$(git rev-parse --show-toplevel 2>/dev/null || dirname "$0"/..)"
PY=.venv/bin/python; PM=.venv/bin/papermill
smoke=0; only='*'; args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1; shift ;;
    --only) only="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
mapfile -t nbs < <($PY -c "from latent_thoughts.analysis import paper_notebooks; print(*paper_notebooks('nbs'), sep='\n')")
[ ${#nbs[@]} -gt 0 ] || { echo "no paper notebooks found in nbs/"; exit 1; }
out=executed; [ $smoke -eq 1 ] && out=executed/smoke
mkdir -p "$out" figures
ran=0; failed=()
for nb in "${nbs[@]}"; do
  name=$(basename "$nb")
  [[ "$name" == $only ]] || continue
  echo "== $name"
  extra=()
  if [ $smoke -eq 1 ]; then
    extra=(-y "$($PY -c "import json, sys; from latent_thoughts.analysis import smoke_parameters as s; print(json.dumps({**s(sys.argv[1]), 'output_dir': sys.argv[2]}))" "$nb" "$out/figures")")
  fi
  start=$SECONDS
  if $PM "$nb" "$out/$name" --cwd . -k python3 "${extra[@]}" "${args[@]}"; then echo "   done in $((SECONDS - start)) s"
  else failed+=("$name"); fi
  ran=$((ran + 1))
done
[ $ran -gt 0 ] || { echo "no paper notebook matches --only '$only'"; exit 1; }
if [ ${#failed[@]} -gt 0 ]; then echo "FAILED: ${failed[*]} (see $out/)"; exit 1; fi
echo "ran $ran paper notebook(s); outputs in $([ $smoke -eq 1 ] && echo "$out/figures" || echo figures)/"

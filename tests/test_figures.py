"""Every paper notebook runs end to end through papermill on the shipped micro checkpoints, with small parameters."""
import json, math
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
PAPERS = sorted((ROOT/'nbs'/'papers').glob('*.ipynb'))
# small parameters so the default suite stays fast; each notebook ignores those it does not declare
SMALL = dict(n_sequences=2, n_tokens=48, iters=12, seq_iters=8)

def _declared(nb_path):
    nb = json.loads(nb_path.read_text())
    cell = next(c for c in nb['cells'] if 'parameters' in c.get('metadata', {}).get('tags', []))
    src = ''.join(cell['source'])
    return {k: v for k, v in SMALL.items() if f'\n{k}:' in '\n' + src or f'\n{k} =' in '\n' + src}

def test_every_paper_notebook_has_parameters():
    assert PAPERS, "no paper notebooks in nbs/papers"
    for nb in PAPERS: _declared(nb)   # raises StopIteration without a tagged parameters cell

@pytest.mark.parametrize('nb', PAPERS, ids=[p.stem for p in PAPERS])
def test_paper_notebook_runs(nb, tmp_path):
    papermill = pytest.importorskip('papermill')
    out_dir = tmp_path/'figures'
    papermill.execute_notebook(str(nb), str(tmp_path/nb.name), parameters={**_declared(nb), 'output_dir': str(out_dir)},
                               cwd=str(ROOT), kernel_name='python3', progress_bar=False)
    files = sorted(out_dir.iterdir())
    assert {f.suffix for f in files} >= {'.png', '.svg', '.json'}, files
    for f in files: assert f.stat().st_size > 0, f
    for f in out_dir.glob('*.json'):
        data = json.loads(f.read_text())
        nums = [x for v in data.values() if isinstance(v, list) for x in v if isinstance(x, (int, float))]
        assert all(math.isfinite(x) for x in nums), f

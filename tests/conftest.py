"""Shared fixtures: `executed(stem)` runs a paper notebook once per session at smoke scale (its `(smoke: …)` parameters)."""
import os
from pathlib import Path
import pytest

from latent_thoughts.analysis import smoke_parameters

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='session')
def executed(tmp_path_factory):
    "Run a paper notebook once per session with its smoke parameters; return the folder it wrote."
    papermill = pytest.importorskip('papermill')
    # smoke runs train into a folder of this session (the kernels inherit it): never into a shared runs/suite
    os.environ.setdefault('LATENT_THOUGHTS_RUNS', str(tmp_path_factory.mktemp('suite-runs')))
    done = {}
    def run(stem):
        if stem not in done:
            nb = ROOT/'nbs'/f'{stem}.ipynb'
            out = tmp_path_factory.mktemp(stem)
            papermill.execute_notebook(str(nb), str(out/nb.name), cwd=str(ROOT), kernel_name='python3', progress_bar=False,
                                       parameters={**smoke_parameters(nb), 'output_dir': str(out/'figures')})
            done[stem] = out/'figures'
        return done[stem]
    return run

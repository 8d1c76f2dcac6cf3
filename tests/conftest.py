"""Shared test helpers: `toy_config(out_dir, **fields)`, the toy run of `latent_thoughts.testing` as a `Config` (a plain
function, `from conftest import toy_config`, so torchrun workers in `tests/test_fsdp.py` use it outside pytest), and the
fixture `executed(stem)`, which runs a paper notebook once per session at smoke scale (its `(smoke: …)` parameters)."""
import os
from dataclasses import fields
from pathlib import Path
import pytest

from latent_thoughts import testing
from latent_thoughts.config import Config, SECTIONS

ROOT = Path(__file__).resolve().parents[1]


def toy_config(out_dir, **overrides) -> Config:
    "`testing.toy_train_config` as a `Config` writing to `out_dir`; `overrides` may name any field of any section."
    d = testing.toy_train_config(out_dir=str(out_dir))
    for k, v in overrides.items():
        owner = [s for s, cls in SECTIONS.items() if k in {f.name for f in fields(cls)}]
        if len(owner) != 1: raise ValueError(f"{k!r} is {'ambiguous' if owner else 'not a config field'}: sections {owner}")
        d[owner[0]][k] = v
    return Config(**{s: cls(**d[s]) for s, cls in SECTIONS.items()})


@pytest.fixture(scope='session')
def executed(tmp_path_factory):
    "Run a paper notebook once per session with its smoke parameters; return the folder it wrote."
    papermill = pytest.importorskip('papermill')
    from latent_thoughts.analysis import smoke_parameters
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

"""Shared fixtures: the tiny models, toy data and configs of `latent_thoughts.testing`, and `executed(stem)`, which runs
a paper notebook once per session at smoke scale (its `(smoke: …)` parameters).

`toy_config(out_dir, **fields)` is also a plain function (`from conftest import toy_config`): torchrun workers
(`tests/test_fsdp.py`) build their runs with it outside pytest."""
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


@pytest.fixture
def tiny_lm(): return testing.tiny_lm

@pytest.fixture
def tiny_method(): return testing.tiny_method

@pytest.fixture
def toy_ids(): return testing.toy_ids

@pytest.fixture
def toy_mask(): return testing.toy_mask

@pytest.fixture
def greedy_reference(): return testing.greedy_reference

@pytest.fixture
def toy_blocks(): return testing.toy_blocks

@pytest.fixture(name='toy_config')
def _toy_config(tmp_path):
    "`toy_config` whose `out_dir` defaults to the test's `tmp_path`."
    return lambda out_dir=tmp_path, **overrides: toy_config(out_dir, **overrides)


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

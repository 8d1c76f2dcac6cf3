"""Table 1 (the taxonomy): the rows the registered methods declare against the paper's table, typed here
independently; every registered method declares its own row; the paper notebook runs under papermill."""
import json
from dataclasses import asdict, fields
from pathlib import Path
import pytest

from latent_thoughts.config import import_methods
from latent_thoughts.core import METHODS, MethodLM, Taxonomy, taxonomy_table, register_method

ROOT = Path(__file__).resolve().parents[1]
COLS = ('core_strategy', 'training_data', 'computation_space', 'application_level', 'training_method')

# paper 1, Table 1 (Section 2), typed from the paper's text
PAPER = {
    'CoT':          ('Scaling Generation',  'CoT Data',       'Explicit Token',       'Per Question', 'RL/SFT'),
    'Pause Tokens': ('Scaling Generation',  'General Corpus', 'Fixed Special Token',  'Per Token',    'Pretrain'),
    'Quiet-STaR':   ('Scaling Generation',  'General Corpus', 'Explicit Token',       'Per Token',    'RL'),
    'PonderLM':     ('Scaling Model Depth', 'General Corpus', 'Continuous Embedding', 'Per Token',    'Pretrain'),
    'LoopedLM':     ('Scaling Model Depth', 'General Corpus', 'Hidden State',         'Per Token',    'Pretrain'),
    'Coconut':      ('Scaling Generation',  'CoT Data',       'Hidden State',         'Per Question', 'SFT'),
    'Ours':         ('Scaling Generation',  'General Corpus', 'Hidden State',         'Per Token',    'Pretrain'),
}
IMPLEMENTS = {'latent': 'Ours', 'pause': 'Pause Tokens', 'looped': 'LoopedLM', 'pondering': 'PonderLM'}


def test_paper_rows_equal_the_declared_ones():
    rows = {r['method']: r for r in taxonomy_table()}
    for method, paper_row in IMPLEMENTS.items():
        assert tuple(rows[method][c] for c in COLS) == PAPER[paper_row], method


def test_every_registered_method_declares_its_own_taxonomy():
    import_methods()
    assert {'vanilla', 'latent', 'pause', 'looped', 'pondering', 'adaptive', 'mor'} <= set(METHODS)
    for name, cls in METHODS.items():
        # declared on the class itself, not inherited from a parent method
        assert isinstance(cls.__dict__.get('taxonomy'), Taxonomy), f"method {name!r} ({cls.__name__}) declares no taxonomy"
        assert all(isinstance(v, str) and v for v in asdict(cls.taxonomy).values()), name
    for r in taxonomy_table(): assert all(r[c] for c in COLS), r


def test_a_method_without_a_taxonomy_shows_empty_cells():
    @register_method
    class _NoTaxonomy(MethodLM): method = '_no_taxonomy_test'
    try:
        row = {r['method']: r for r in taxonomy_table()}['_no_taxonomy_test']
        assert [row[c] for c in COLS] == [None] * len(COLS)
        assert [f.name for f in fields(Taxonomy)] == list(COLS)
    finally:
        METHODS.pop('_no_taxonomy_test')


def test_tab01_notebook_runs_and_matches_the_paper(tmp_path):
    papermill = pytest.importorskip('papermill')
    nb = ROOT/'nbs'/'tab01_taxonomy.ipynb'
    out = tmp_path/'figures'
    papermill.execute_notebook(str(nb), str(tmp_path/nb.name), cwd=str(ROOT), kernel_name='python3', progress_bar=False,
                               parameters={'output_dir': str(out)})
    for name in ('tab01_taxonomy', 'tab01_taxonomy_display', 'tab01_taxonomy_paper_vs_run'):
        for ext in ('csv', 'md', 'tex', 'json'): assert (out/f'{name}.{ext}').stat().st_size > 0, (name, ext)
    for ext in ('png', 'svg'): assert (out/f'tab01_taxonomy.{ext}').stat().st_size > 0, ext
    written = {r['method']: r for r in json.loads((out/'tab01_taxonomy.json').read_text())}
    assert set(written) == set(METHODS)
    display = json.loads((out/'tab01_taxonomy_display.json').read_text())
    for r in display:   # the paper's seven rows, transcribed exactly, with what implements them here
        if r['Method'] in PAPER:
            assert tuple(r[k] for k in ('Core Strategy', 'Training Data', 'Computation Space', 'Application Level',
                                        'Training Method')) == PAPER[r['Method']], r
    lib = {r['Method']: r['This library'] for r in display if r['Method'] in PAPER}
    assert lib == {**{p: 'not implemented' for p in PAPER}, **{p: m for m, p in IMPLEMENTS.items()}}, lib
    pvr = json.loads((out/'tab01_taxonomy_paper_vs_run.json').read_text())
    assert len(pvr) == 5 * len(IMPLEMENTS) and all(r['paper'] == r['this run'] for r in pvr), pvr

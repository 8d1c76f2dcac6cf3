"""Figs. 1 and 9 (scaling curves) and Table 2 (downstream accuracy): what the notebooks write, checked against
independent computations: `numpy.polyfit` on the written points, the training logs read line by line, parameter
counts of the built and of the trained models, closed-form inference FLOPs, the harness run directly, and the
paper's Table 2 transcription against its own averages."""
import json, math, os, shutil
from pathlib import Path
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCALING = ['fig01_scaling', 'fig09_scaling_families']


def _load(out, stem):
    return json.loads((out/f'{stem}.json').read_text())

def _suite(d):
    "The suite the notebook read (its runs and assets folders, as it wrote them)."
    from latent_thoughts.suite import Suite
    return Suite(runs_dir=d['runs_dir'], assets_dir=d['assets_dir'])

def _log(suite, run, scale):
    "Records of a run's metrics.jsonl, read line by line (no library code)."
    for p in (suite.artefact_dir(run, scale)/'metrics.jsonl', suite.run_dir(run, scale)/'metrics.jsonl'):
        if p.exists(): return [json.loads(l) for l in p.read_text().splitlines() if l.strip()]
    raise AssertionError(f'no metrics.jsonl for {run}')


@pytest.mark.parametrize('stem', SCALING)
def test_scaling_fit_is_polyfit_on_the_written_points(executed, stem):
    d = _load(executed(stem), stem)
    runs = {r['run']: r for r in d['runs']}
    assert d['fit'] == 'power' and d['scale'] == 'smoke'
    col = {'params': d['param_count'], 'params_tokens': 'params_tokens', 'inference_flops': 'inference_flops_per_token'}
    n_fits = 0
    for fam, fits in d['fits'].items():
        vanilla = [r for r in d['runs'] if r['family'] == fam and r['method'] == 'vanilla' and r['state'] == 'done']
        for axis, f in fits.items():
            if len(vanilla) < 2: assert f is None; continue
            # the written points are the vanilla runs' (x, final loss)
            np.testing.assert_allclose(sorted(f['x']), sorted(float(r[col[axis]]) for r in vanilla), rtol=1e-12)
            np.testing.assert_allclose(sorted(f['y']), sorted(r['final_loss'] for r in vanilla), rtol=1e-12)
            slope, icpt = np.polyfit(np.log(f['x']), np.log(f['y']), 1)
            assert math.isclose(f['slope'], slope, rel_tol=1e-9) and math.isclose(f['intercept'], icpt, rel_tol=1e-9), (fam, axis)
            n_fits += 1
    assert n_fits >= 3
    # each multiplier: the x where the vanilla power law reaches the latent loss, over the latent run's own x
    for m in d['multipliers']:
        f = d['fits'][m['family']][m['axis']]
        r = runs[m['run']]
        assert r['method'] == 'latent' and m['x'] == pytest.approx(float(r[col[m['axis']]]))
        assert m['loss'] == r['final_loss']
        if f['slope'] < 0:
            x_eq = math.exp((math.log(m['loss']) - f['intercept']) / f['slope'])
            assert m['multiplier'] == pytest.approx(x_eq / m['x'], rel=1e-9)
            assert m['extrapolated'] == (not min(f['x']) <= x_eq <= max(f['x']))
    if stem == 'fig09_scaling_families':   # the paper's Fig. 9 axis: parameters x tokens
        for r in d['runs']: assert r['params_tokens'] == pytest.approx(r['params'] * r['tokens'])


@pytest.mark.parametrize('stem', SCALING)
def test_scaling_final_losses_and_curves_are_the_training_logs(executed, stem):
    d = _load(executed(stem), stem)
    suite = _suite(d)
    done = [r for r in d['runs'] if r['state'] == 'done']
    assert len(done) == len(d['runs']) and not d['missing'], "at smoke every run trains"
    for r in done:
        recs = _log(suite, r['run'], 'smoke')
        evals = [x for x in recs if 'eval_loss' in x]
        assert r['final_loss'] == evals[-1]['eval_loss'], r['run']
        man = json.loads((suite.artefact_dir(r['run'], 'smoke')/'run.json').read_text())
        assert r['final_loss'] == man['final_eval_loss'] and r['tokens'] == man['tokens']
        c = d['curves'][r['run']]   # the curve drawn: one point per evaluation (last one per token count)
        last = {x['tokens']: x['eval_loss'] for x in evals}
        assert c['tokens'] == sorted(last) and c['loss'] == [last[t] for t in sorted(last)]
    loss = {r['run']: r['final_loss'] for r in done}
    for e in d['data_efficiency']:   # at smoke each curve has one point: reached there (an upper bound) or never
        assert e['target'] == loss[e['vanilla']] and e['n_points'] == 1
        assert e['at_first_point'] == (loss[e['run']] <= e['target'])


@pytest.mark.parametrize('stem', SCALING)
def test_scaling_parameters_and_flops_match_the_models(executed, stem):
    from latent_thoughts.config import build_model
    from latent_thoughts.core import load_method_lm
    d = _load(executed(stem), stem)
    suite = _suite(d)
    for r in d['runs']:
        cfg = suite.config_for(r['run'], 'smoke')
        built = build_model(cfg.model, device='cpu')
        trained = load_method_lm(suite.checkpoint(r['run'], 'smoke'))
        n = sum(p.numel() for p in built.parameters())
        assert r['params'] == r['params_counted'] == n == sum(p.numel() for p in trained.parameters()), r['run']
        lm = built.lm
        emb = {id(m.weight): m.weight.numel() for m in lm.modules() if isinstance(m, torch.nn.Embedding)}
        emb[id(lm.get_output_embeddings().weight)] = lm.get_output_embeddings().weight.numel()
        assert r['params_non_embedding'] == n - sum(emb.values()), r['run']
        # inference FLOPs per token in closed form: 2 x (matmul weights) per stream entry, attention over the mean
        # causal context, the vocabulary head once per token; one latent thought doubles the stream
        T, hc = cfg.data.block_size, lm.config
        mm = sum(m.weight.numel() for m in lm.base_model.modules()
                 if isinstance(m, torch.nn.Linear) or type(m).__name__ == 'Conv1D')
        L, d_attn = hc.num_hidden_layers, hc.hidden_size
        S = 2 if r['method'] == 'latent' else 1
        entry = 2 * mm + 4 * L * d_attn * (S * T + 1) / 2
        head = 2 * lm.get_output_embeddings().weight.numel()
        assert r['inference_flops_per_token'] == pytest.approx(S * entry + head, rel=1e-9), r['run']


def test_tab02_accuracies_are_the_suite_evaluations(executed):
    d = _load(executed('tab02_downstream'), 'tab02_downstream')
    suite = _suite(d)
    acc = d['accuracies']
    assert acc and all(0 <= a['acc'] <= 1 for a in acc)
    assert {a['run'] for a in acc} == {r['run'] for r in d['table']} and {a['shots'] for a in acc} == set(d['shots']) == {0, 5}
    for a in acc:   # the suite's cached evaluation, asked again directly
        ev = suite.evaluate(a['run'], 'smoke', 'harness', None, num_fewshot=a['shots'])
        assert ev['cached'] and ev['settings']['num_fewshot'] == a['shots']
        assert a['acc'] == ev['results'][a['task']]['acc,none'] and a['n'] == ev['n-samples'][a['task']]['effective']
    # the table's averages and Δacc, recomputed from the accuracies
    for row in d['table']:
        for k in d['shots']:
            mine = [a['acc'] for a in acc if a['run'] == row['run'] and a['shots'] == k]
            assert len(mine) == len(d['tasks'])
            assert row[f'avg ({k}-shot)'] == pytest.approx(100 * sum(mine) / len(mine))
            if row['method'] == 'latent':
                van = next(v for v in d['table'] if v['method'] == 'vanilla' and v['size'] == row['size'])
                assert row[f'Δacc ({k}-shot)'] == pytest.approx(row[f'avg ({k}-shot)'] - van[f'avg ({k}-shot)'])


def test_tab02_accuracy_recomputed_by_the_harness(executed):
    "One run and shot count through lm-evaluation-harness directly (not the suite, not its cache)."
    from latent_thoughts.harness import evaluate
    d = _load(executed('tab02_downstream'), 'tab02_downstream')
    suite = _suite(d)
    run, k = 'latent-neox-S', 5
    s = {**suite.scale('smoke')['eval']['harness'], **d['settings']}
    res = evaluate(str(suite.checkpoint(run, 'smoke')), tasks=s['tasks'], limit=s['limit'], batch_size=s['batch_size'],
                   num_fewshot=k)
    for t in d['tasks']:
        written = next(a['acc'] for a in d['accuracies'] if a['run'] == run and a['shots'] == k and a['task'] == t)
        assert written == res['results'][t]['acc,none'], t


def test_tab02_paper_transcription_is_consistent():
    "The transcribed Table 2: each row's nine accuracies average to its Avg column; each Δacc is Avg minus Pythia's."
    import nbformat
    nb = nbformat.read(ROOT/'nbs'/'tab02_downstream.ipynb', as_version=4)
    src = next(c.source for c in nb.cells if c.cell_type == 'code' and '_P = [' in c.source)
    ns = {}
    exec(src[:src.index('PAPER = pd.DataFrame')], ns)   # the transcription only (plain Python literals)
    rows = ns['_P']
    assert len(rows) == 12 + 13 and len(ns['PAPER_TASKS']) == 9
    avg = {(k, m): v for k, m, _, _, v, _, _ in rows}
    for k, m, _, a, v, delta, _ in rows:
        acc = [float(x) for x in a.split()]
        assert len(acc) == 9 and all(0 < x < 100 for x in acc), m
        if (k, m) != (5, 'OPT-1.3B'):   # the paper's own row: tasks average 53.9, Avg column 52.7
            assert abs(sum(acc) / 9 - v) <= 0.05, (k, m, sum(acc) / 9, v)
        if delta is not None:           # Δacc over the Pythia model of the same size
            assert m.startswith('Ours') and abs(v - avg[(k, m.replace('Ours', 'Pythia'))] - delta) < 0.051, (k, m)
    assert (0, 'Ours-1.4B') not in avg, "absent from the paper's text file: not guessed"


def test_notebooks_draw_nothing_when_no_run_is_trained(tmp_path, monkeypatch):
    "At micro with nothing trained (a private suite copy: empty runs and assets), the notebooks list what is missing."
    papermill = pytest.importorskip('papermill')
    (tmp_path/'suite').mkdir()
    shutil.copy(ROOT/'suite.yaml', tmp_path/'suite'/'suite.yaml')
    monkeypatch.setenv('LATENT_THOUGHTS_SUITE', str(tmp_path/'suite'/'suite.yaml'))
    monkeypatch.setenv('LATENT_THOUGHTS_RUNS', str(tmp_path/'runs'))
    for stem in ('fig01_scaling', 'tab02_downstream'):
        out = tmp_path/stem
        papermill.execute_notebook(str(ROOT/'nbs'/f'{stem}.ipynb'), str(tmp_path/f'{stem}.ipynb'), cwd=str(ROOT),
                                   kernel_name='python3', progress_bar=False, parameters={'output_dir': str(out)})
        d = _load(out, stem)
        assert d['scale'] == 'micro' and d['runs_dir'] == str(tmp_path/'runs')
        assert set(d['missing']) == {f'{m}-neox-{z}' for m in ('vanilla', 'latent') for z in 'SML'}
        assert set(d['verdicts'].values()) == {'not measured'}
        text = (out/f'{stem}_paper_vs_run.md').read_text()
        assert 'not measured' in text and '0 / 6' in text
    assert _load(tmp_path/'fig01_scaling', 'fig01_scaling')['sigma'] is None   # no seeds in the private assets

"""The reproduction suite: the shipped suite.yaml, configs against an independent construction, errors, and the smoke
suite end to end through the CLI (train, evaluate, cache hit, resume after SIGKILL equal to an uninterrupted run)."""
import json, os, re, signal, subprocess, sys, time
from pathlib import Path

import pytest
from latent_thoughts import suite as SU
from latent_thoughts.suite import Suite, SuiteError, EVAL_KINDS, weights_sha256
from latent_thoughts.config import load_config, config_path

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, '-m', 'latent_thoughts.cli', 'suite']
ENV = {**{k: v for k, v in os.environ.items() if k != 'LATENT_THOUGHTS_RUNS'}, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'HF_HUB_OFFLINE': '1'}


def suite_copy(tmp_path, edit=lambda t: t) -> Path:
    "A copy of the repository's suite.yaml in `tmp_path` (its runs and assets then live under `tmp_path`)."
    p = tmp_path/'suite.yaml'
    p.write_text(edit((ROOT/'suite.yaml').read_text()))
    return p


# ---------------------------------------------------------------- the declared runs

@pytest.fixture(autouse=True)
def _default_runs_folder(monkeypatch):
    "These tests name their folders: a runs folder set for the figure tests ($LATENT_THOUGHTS_RUNS) must not leak in."
    monkeypatch.delenv('LATENT_THOUGHTS_RUNS', raising=False)

def test_declares_the_runs_of_both_papers():
    "Every run the issue lists exists, with the method and arguments it names."
    S = Suite(ROOT/'suite.yaml')
    m = {n: (r.method, r.method_args) for n, r in S.runs.items()}
    for fam, sizes in (('neox', 'SML'), ('gpt2', 'SM'), ('llama', 'SML')):
        for s in sizes:
            assert m[f'vanilla-{fam}-{s}'][0] == 'vanilla' and m[f'latent-{fam}-{s}'] == ('latent', {'n_thoughts': 1, 'train_iters': [2, 3]})
    assert S.runs['vanilla2x-llama-L'].size == 'llama-XL' and S.config_for('vanilla2x-llama-L', 'paper').model.preset == 'llama-2.8b'
    for name, method, args in [('pause1-llama-L', 'pause', {'n_pause': 1}), ('pause3-llama-L', 'pause', {'n_pause': 3}),
                               ('looped2-llama-L', 'looped', {'n_loops': 2}), ('looped4-llama-L', 'looped', {'n_loops': 4}),
                               ('ponder1-llama-L', 'pondering', {'n_ponder': 1}), ('ponder3-llama-L', 'pondering', {'n_ponder': 3}),
                               ('latent3-llama-L', 'latent', {'n_thoughts': 3, 'train_iters': [2, 3]})]:
        assert m[name] == (method, args)
    assert [m[f'latent-abl-K{k}'][1]['train_iters'] for k in range(1, 6)] == [1, 2, 3, 4, 5]
    assert [m[f'latent-abl-N{n}'][1]['n_thoughts'] for n in (2, 3)] == [2, 3] and m['latent-abl'][1]['n_thoughts'] == 1
    assert S.select('micro', figure='fig13') == ['latent-abl', 'latent-abl-K2', 'latent-abl-K234']
    assert {f'{b}-abl{s}' for b in ('vanilla', 'latent') for s in ('', '-seed1', '-seed2')} <= set(S.runs)
    assert m['latent-abl-seqpos'][1]['position_mode'] == 'sequential'
    assert (S.config_for('latent-abl', 'micro').model.embed_scale, S.config_for('latent-abl', 'micro').model.init) == ('authors', 'authors')
    assert (S.config_for('latent-abl-hf', 'micro').model.embed_scale, S.config_for('latent-abl-hf', 'micro').model.init) in ((None, 'hf'), ('none', 'hf'))
    for cpt in ('vanilla-cpt', 'latent-cpt'):   # continual pretraining from the trained vanilla model, on the same tokens
        assert S.runs[cpt].init_source('micro') == 'vanilla-llama-L'
        assert S.config_for(cpt, 'paper').model.init_from == 'meta-llama/Llama-3.2-3B'
    assert S.config_for('vanilla-cpt', 'micro').train.steps == S.config_for('latent-cpt', 'micro').train.steps
    ad = {n: a for n, (meth, a) in m.items() if meth == 'adaptive'}
    assert {a['k_max'] for a in ad.values()} == {3, 5}
    assert any(a.get('router') == 'none' for a in ad.values()) and any(a.get('router_hidden') for a in ad.values())
    assert len({a.get('adaptive_weight', 0.1) for a in ad.values()}) >= 4          # the adaptive-loss weight sweep
    assert S.runs['mor-llama-L'].method == 'mor' and S.runs['mor-llama-L'].optional
    # the adaptive paper's baselines are the Table 3 runs: same size and tokens as the adaptive runs
    tok = {n: S.config_for(n, 'micro').train.steps for n in ('adaptive-K3', 'looped2-llama-L', 'pause1-llama-L', 'ponder1-llama-L', 'latent-llama-L')}
    assert len(set(tok.values())) == 1, tok


def test_config_matches_an_independent_construction():
    "A run's config equals load_config of its parts written out by hand, with steps from tokens."
    S = Suite(ROOT/'suite.yaml')
    sc = S.scales['micro']
    ref = load_config(None, [f"model.{k}={json.dumps(v)}" for k, v in sc['defaults']['model'].items()] +
                      [f"data.{k}={json.dumps(v)}" for k, v in sc['defaults']['data'].items()] +
                      [f"train.{k}={json.dumps(v)}" for k, v in sc['defaults']['train'].items()] +
                      ['model.preset=micro', 'model.d_model=64', 'model.n_layer=2', 'model.n_head=4',
                       'model.method=latent', 'model.method_args={n_thoughts: 2, train_iters: [2, 3]}', 'train.seed=0'])
    ref.train.steps = round(float(sc['budgets']['ablation']) / (128 * sc['defaults']['data']['batch_size']))
    ref.train.warmup = round(sc['warmup_frac'] * ref.train.steps)
    ref.train.out_dir = str(S.run_dir('latent-abl-N2', 'micro'))
    assert S.config_for('latent-abl-N2', 'micro') == ref
    # paper scale: the config file of the size, the run's method, steps from the paper's 30B ablation tokens
    c = S.config_for('latent-abl-K3', 'paper')
    base = load_config(config_path('pythia-70m-latent'))
    assert (c.model.preset, c.data.source, c.data.tokenizer, c.train.lr) == (base.model.preset, base.data.source, base.data.tokenizer, base.train.lr)
    tokens_per_step = base.data.block_size * base.data.batch_size * base.train.grad_accum * 8
    assert tokens_per_step == 2048 * 1024 and c.train.steps == round(30e9 / tokens_per_step)
    assert c.model.method_args == {'n_thoughts': 1, 'train_iters': 3}


@pytest.mark.parametrize('edit, msg', [
    (lambda t: t.replace('size: neox-S, figures: [fig01, tab02]}', 'size: neox-S, figure: [fig01]}', 1), "unknown key(s) ['figure']"),
    (lambda t: t.replace('figures: [fig01, tab02]}', 'figures: [fig1]}', 1), "unknown figure(s) ['fig1']; declare them under figures:"),
    (lambda t: t.replace('{method: vanilla, size: neox-S', '{method: vanila, size: neox-S', 1), "unknown method 'vanila'"),
    (lambda t: t.replace('{n_pause: 1}', '{pauses: 1}', 1), "model.method_args ['pauses'] are not arguments of"),
    (lambda t: t.replace('train: {lr: 3.0e-3', 'train: {lrate: 3.0e-3', 1), "unknown key 'train.lrate'"),
    (lambda t: t.replace('tokens: ablation, seeds', 'tokens: abl, seeds', 1), "token budget 'abl' is not declared"),
    (lambda t: t.replace('scales:\n', 'scale:\n', 1), "unknown key(s) ['scale']"),
])
def test_bad_suite_files_name_the_fix(tmp_path, edit, msg):
    with pytest.raises(SuiteError, match=re.escape(msg)): Suite(suite_copy(tmp_path, edit))


def test_optional_run_of_an_unregistered_method_is_skipped(tmp_path):
    "A run whose method is not registered is an error, unless optional: then it is listed as skipped and train says why."
    p = suite_copy(tmp_path, lambda t: t.replace('method: mor,', 'method: nosuchmethod,'))
    S = Suite(p)
    assert S.state('mor-llama-L', 'smoke').startswith("skipped: method 'nosuchmethod' is not registered")
    said = []
    assert S.train(['mor-llama-L'], 'smoke', progress=False, log=said.append) == [] and 'skipped' in said[0]
    with pytest.raises(SuiteError, match="unknown method 'nosuchmethod'"):
        Suite(suite_copy(tmp_path, lambda t: t.replace('method: mor, size: llama-L, optional: true', 'method: nosuchmethod, size: llama-L')))


def test_unknown_names_are_clear(tmp_path):
    S = Suite(suite_copy(tmp_path))
    with pytest.raises(SuiteError, match=r"unknown run 'latent-abl-K7'; did you mean"): S.config_for('latent-abl-K7', 'micro')
    with pytest.raises(SuiteError, match="unknown scale 'mini'"): S.config_for('latent-abl', 'mini')
    with pytest.raises(SuiteError, match="unknown figure 'fig99'"): S.select('micro', figure='fig99')
    with pytest.raises(SuiteError, match="has no final model at scale 'smoke' here: train it"): S.checkpoint('latent-abl', 'smoke')
    with pytest.raises(SuiteError, match="is not trained at scale 'smoke'"): S.evaluate('latent-abl', 'smoke')


# ---------------------------------------------------------------- the smoke suite end to end
def losses(run_dir):
    out = {}
    for line in (Path(run_dir)/'metrics.jsonl').read_text().splitlines():
        try: r = json.loads(line)
        except json.JSONDecodeError: continue
        if 'loss' in r: out[r['step']] = r['loss']
    return out

LONGER = lambda t: t.replace("neox-S:  {model: {preset: micro, d_model: 16, n_layer: 1, n_head: 2}, tokens: 2560}",
                             "neox-S:  {model: {preset: micro, d_model: 16, n_layer: 1, n_head: 2}, tokens: 10240}")   # 40 steps


def test_smoke_train_evaluate_cache_and_resume_after_sigkill(tmp_path, monkeypatch):
    "CLI: train two smoke runs; evaluate (cached the second time, nothing recomputed); a SIGKILLed train resumes to the same run."
    a, b = tmp_path/'a', tmp_path/'b'
    a.mkdir(); b.mkdir()
    pa, pb = suite_copy(a, LONGER), suite_copy(b, LONGER)
    t0 = time.time()
    r = subprocess.run(CLI + ['train', 'vanilla-neox-S', 'latent-neox-S', '--scale', 'smoke', '--suite', str(pa), '--no-progress'],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert '2 run(s) trained and published' in r.stdout
    S = Suite(pa)
    assert S.status('smoke', names=['vanilla-neox-S', 'latent-neox-S']).state.tolist() == ['done', 'done']
    man = S.manifest('latent-neox-S', 'smoke')
    assert man['steps'] == 40 and man['weights_sha256'] == weights_sha256(S.checkpoint('latent-neox-S', 'smoke'))
    assert man['train_flops'] > 0 and man['store_dtype'] == 'float16'
    # evaluate through the CLI, then again in-process with the evaluators disabled: a cache hit computes nothing
    r = subprocess.run(CLI + ['eval', 'vanilla-neox-S', 'latent-neox-S', '--scale', 'smoke', '--suite', str(pa)],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count('False') == 2, r.stdout   # computed, not cached
    cache = S.artefact_dir('latent-neox-S', 'smoke')/'evals.json'
    before = cache.read_text()
    monkeypatch.setitem(EVAL_KINDS, 'ppl', lambda *a, **k: pytest.fail('recomputed a cached evaluation'))
    for n in ('vanilla-neox-S', 'latent-neox-S'):
        e = S.evaluate(n, 'smoke', 'ppl', 'validation')
        assert e['cached'] and e['weights_sha256'] == S.manifest(n, 'smoke')['weights_sha256'] and 1 < e['ppl'] < 1e5
    assert cache.read_text() == before
    entry = next(iter(json.loads(before).values()))
    assert entry['weights_sha256'] == man['weights_sha256'] and entry['settings'] == S.scales['smoke']['eval']['ppl']
    # SIGKILL a suite train mid-run, run it again: it resumes and ends with the uninterrupted run's losses and weights
    rd = Suite(pb).run_dir('latent-neox-S', 'smoke')
    p = subprocess.Popen(CLI + ['train', 'latent-neox-S', '--scale', 'smoke', '--suite', str(pb), '--no-progress'],
                         cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while True:
        if (rd/'metrics.jsonl').exists() and max(losses(rd), default=0) >= 5: break
        if p.poll() is not None: pytest.fail('the run ended before it could be killed')
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL); p.wait()
    killed_at = max(losses(rd))
    assert killed_at < 40 and Suite(pb).state('latent-neox-S', 'smoke') == 'partial'
    r = subprocess.run(CLI + ['train', 'latent-neox-S', '--scale', 'smoke', '--suite', str(pb), '--no-progress'],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r'resumed from .*step_000000\d\d \(step \d+\)', r.stdout), r.stdout[-1000:]
    ref, got = losses(S.run_dir('latent-neox-S', 'smoke')), losses(rd)
    assert sorted(ref) == sorted(got) == list(range(1, 41))
    diff = max(abs(ref[s] - got[s]) for s in ref)
    print(f'killed after step {killed_at}; max |loss difference| {diff:.1e}; end to end {time.time() - t0:.0f} s')
    assert diff <= 1e-6
    assert Suite(pb).manifest('latent-neox-S', 'smoke')['weights_sha256'] == man['weights_sha256']   # the same bytes


def test_stale_runs_need_retrain(tmp_path):
    "Changing a run's config after it was published marks it stale; train refuses until asked to retrain."
    p = suite_copy(tmp_path)
    S = Suite(p)
    S.train(['vanilla-gpt2-S'], 'smoke', progress=False)
    p.write_text(p.read_text().replace('train: {lr: 3.0e-3, min_lr: 3.0e-4, eval_every: 0', 'train: {lr: 2.0e-3, min_lr: 3.0e-4, eval_every: 0', 1))
    S2 = Suite(p)
    assert S2.state('vanilla-gpt2-S', 'smoke') == 'stale'
    with pytest.raises(SuiteError, match='--retrain'): S2.train(['vanilla-gpt2-S'], 'smoke', progress=False)
    old = S.manifest('vanilla-gpt2-S', 'smoke')['weights_sha256']
    done = S2.train(['vanilla-gpt2-S'], 'smoke', progress=False, retrain=True)
    assert [m['run'] for m in done] == ['vanilla-gpt2-S'] and done[0]['config']['train']['lr'] == 2e-3
    assert done[0]['weights_sha256'] != old and S2.state('vanilla-gpt2-S', 'smoke') == 'done'


@pytest.mark.slow
def test_whole_smoke_suite_through_the_cli(tmp_path):
    "`latent-thoughts suite train --scale smoke` trains every run (about two minutes on 2 idle cores), then all are done."
    p = suite_copy(tmp_path)
    t0 = time.time()
    r = subprocess.run(CLI + ['train', '--scale', 'smoke', '--suite', str(p), '--no-progress'], cwd=ROOT, env=ENV,
                       capture_output=True, text=True)
    wall = time.time() - t0
    assert r.returncode == 0, r.stderr[-3000:]
    st = Suite(p).status('smoke')
    print(f'smoke suite: {len(st)} runs in {wall:.0f} s')
    assert set(st.state.map(lambda s: s.split(':')[0])) <= {'done', 'skipped'} and (st.state == 'done').sum() >= len(st) - 1


# ---------------------------------------------------------------- what the repository ships
def test_shipped_artefacts_are_traceable_and_within_budget():
    "Every shipped micro run: run.json's hash is its model's, every cached number carries that hash; all within 40 MB."
    root = ROOT/'assets'/'suite'/'micro'
    runs = sorted(d for d in root.glob('*') if (d/'run.json').exists()) if root.exists() else []
    if not runs: pytest.skip('no micro suite shipped yet (latent-thoughts suite train --scale micro)')
    size = sum(f.stat().st_size for f in root.rglob('*') if f.is_file())
    assert size <= 40e6, f'{size/1e6:.1f} MB shipped'
    S = Suite(ROOT/'suite.yaml')
    for d in runs:
        man = json.loads((d/'run.json').read_text())
        if (d/'model').exists(): assert weights_sha256(d/'model') == man['weights_sha256'], d.name
        assert (d/'model').exists() == S.ships_model(d.name, 'micro'), d.name
        for e in json.loads((d/'evals.json').read_text()).values() if (d/'evals.json').exists() else []:
            assert e['weights_sha256'] == man['weights_sha256'], f'{d.name}: a cached evaluation of other weights'


def test_harness_evaluation_is_cached(tmp_path):
    "The offline task pack through lm-evaluation-harness, cached like perplexity (split None)."
    S = Suite(suite_copy(tmp_path))
    S.train(['vanilla-llama-S'], 'smoke', progress=False)
    a = S.evaluate('vanilla-llama-S', 'smoke', 'harness', None)
    assert not a['cached'] and set(a['results']) == {'lt_lastword', 'lt_nextline'}
    assert a['n-samples']['lt_nextline']['effective'] == S.scales['smoke']['eval']['harness']['limit']
    b = S.evaluate('vanilla-llama-S', 'smoke', 'harness', None)
    assert b['cached'] and b['results'] == a['results'] and b['weights_sha256'] == S.manifest('vanilla-llama-S', 'smoke')['weights_sha256']


def test_optional_run_trains_once_its_method_is_registered(tmp_path):
    "mor-llama-L is skipped while `mor` is unregistered; importing its module registers it and the run trains at smoke scale."
    pytest.importorskip('latent_thoughts.mor')   # registers MoRLM as 'mor'
    S = Suite(suite_copy(tmp_path))
    assert S.state('mor-llama-L', 'smoke') == 'missing'
    assert S.config_for('mor-llama-L', 'micro').model.method_args == {'sharing': 'cycle'}   # 2 layers: no middle cycle
    assert S.config_for('mor-llama-L', 'paper').model.method_args == {}                     # the paper's middle cycle
    done = S.train(['mor-llama-L'], 'smoke', progress=False)
    assert [m['run'] for m in done] == ['mor-llama-L'] and S.state('mor-llama-L', 'smoke') == 'done'

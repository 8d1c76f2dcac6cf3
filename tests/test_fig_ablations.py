"""Figs. 8 and 13 (Sec. 4.5 ablations, App. H): the numbers both notebooks write at smoke scale, recomputed without
the notebooks or the library's model code: final losses from the raw `metrics.jsonl` lines, curves with numpy,
validation losses by a plain loop over the Hugging Face model following the paper's Jacobi recipe (and, for the
converged evaluation, the sequential thoughts), RMSE(k) from the same loop, seed noise from `evaluation.perplexity`."""
import json, math
from pathlib import Path
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _suite():
    "A Suite built now: it reads $LATENT_THOUGHTS_RUNS, set by the `executed` fixture (load_suite() may predate it)."
    from latent_thoughts.suite import Suite
    return Suite()


def _records(S, run, scale):
    return [json.loads(l) for l in (S.run_dir(run, scale)/'metrics.jsonl').read_text().splitlines() if l.strip()]


# -- the paper's recipe as plain loops over the HF model (one thought per token, position ids reused)

from test_figures import _stream   # the plain-loop stream of the Fig. 4/12 references (tests/ is on sys.path)

def _interleaved(lm, E, theta):
    "Hidden states at the e(x_t) and θ_t entries of the stream e(x1), θ1, e(x2), θ2, … (positions reused)."
    T = E.size(1)
    H = _stream(lm, torch.stack([v for t in range(T) for v in (E[:, t], theta[:, t])], 1), [t for t in range(T) for _ in (0, 1)])
    return H[:, 0::2], H[:, 1::2]

@torch.no_grad()
def ref_jacobi(lm, E, iters):
    "θ^0..θ^iters: a plain pass over the tokens, then `iters` passes over the interleaved stream (§3.2)."
    theta = _stream(lm, E, list(range(E.size(1))))
    out = [theta]
    for _ in range(iters):
        theta = _interleaved(lm, E, theta)[0]    # θ_t^(k+1): the output at e(x_t), fed with θ^k
        out.append(theta)
    return out

@torch.no_grad()
def ref_sequential(lm, E):
    "The sequential (autoregressive) thoughts, the stream growing one entry at a time."
    entries, pos, thetas = [], [], []
    for t in range(E.size(1)):
        entries.append(E[:, t]); pos.append(t)
        thetas.append(_stream(lm, torch.stack(entries, 1), pos)[:, -1])
        entries.append(thetas[-1]); pos.append(t)
    return torch.stack(thetas, 1)

@torch.no_grad()
def ref_logprob(model, ids, n_scored, k):
    "Σ log p of the last `n_scored` tokens of 1-D `ids`: k Jacobi passes (k=None: the sequential thoughts), then the loss pass."
    x = torch.as_tensor(ids)[None]
    E, lm = model.embed(x[:, :-1]), model.lm
    theta = ref_sequential(lm, E) if k is None else ref_jacobi(lm, E, k)[-1]
    h = _interleaved(lm, E, theta)[1]                                  # read at each token's thought
    lp = lm.get_output_embeddings()(h)[0].double().log_softmax(-1)
    T = E.size(1)
    return float(lp[T - n_scored:].gather(-1, x[0, T - n_scored + 1:, None]).sum())

def ref_loss(S, run, scale, k):
    "Validation loss of `run` with k Jacobi iterations by the plain loop, on the tokens and windows the suite's ppl evaluation scores."
    from latent_thoughts.core import load_method_lm
    from latent_thoughts.evaluation import load_documents, token_stream, load_tokenizer
    settings = S.scale(scale)['eval']['ppl']
    d = S.checkpoint(run, scale)
    model, tok = load_method_lm(d).eval(), load_tokenizer(str(d))
    assert model.n_thoughts == 1 and model.position_mode == 'reuse', "the plain loop is written for one thought, reused positions"
    mt = settings.get('max_tokens')
    stream = token_stream(load_documents(S.config_for(run, scale).data.source, 'validation', max_tokens=mt, tokenizer=tok), tok)
    stream = stream[:mt + 1] if mt else stream
    block = S.config_for(run, scale).data.block_size   # the trained length: the evaluator's window
    # every token after the first scored once, each window reading up to `block` tokens of left context
    nll, n, end = 0.0, 0, 1
    while end < len(stream):
        new = min(len(stream), end + block)
        nll -= ref_logprob(model, stream[max(0, new - block - 1):new], new - end, k); n += new - end; end = new
    return nll / n, n


def _close(a, b, what, rtol=1e-7, atol=1e-9):   # float32 forward, float64 sums: the loops agree to ~1e-9 at smoke scale
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=rtol, atol=atol, err_msg=what)


# -- Fig. 8

@pytest.fixture(scope='module')
def fig08(executed):
    out = executed('fig08_iterations_thoughts')
    return json.loads((out/'fig08_iterations_thoughts.json').read_text())


def test_fig08_final_losses_and_curves_are_the_logs(fig08):
    S, scale, w = _suite(), fig08['scale'], fig08['smooth']
    rows = {r['run']: r for r in fig08['runs']}
    trained = [r for r in rows.values() if r['state'] == 'done']
    assert len(trained) >= 9 and not fig08['missing'], "at smoke scale every run trains"
    for r in trained:
        recs = _records(S, r['run'], scale)
        loss = np.array([x['loss'] for x in recs if 'loss' in x])
        assert r['final_train_loss'] == loss[-1], r['run']
        assert r['final_eval_loss'] == [x['eval_loss'] for x in recs if 'eval_loss' in x][-1], r['run']
        _close(r['final_train_loss_smoothed'], loss[-w:].mean(), r['run'])
        c = fig08['curves'][r['run']]
        roll = [loss[max(0, i - w + 1):i + 1].mean() for i in range(len(loss))]   # rolling mean, partial windows at the start
        _close(c['smoothed'], roll, f"{r['run']}: smoothed curve")
        assert c['tokens'] == [x['tokens'] for x in recs if 'loss' in x]
    # the paired difference to the same-seed vanilla run, and the seed bands of the curves
    ref = np.array(fig08['curves']['vanilla-abl']['smoothed'])
    for run, d in fig08['deltas'].items():
        _close(d['delta'], np.array(fig08['curves'][run]['smoothed']) - ref, f'{run}: Δ vs vanilla')
    for base, band in fig08['seed_bands'].items():
        M = np.array([fig08['curves'][n]['smoothed'] for n in band['runs']])
        assert len(band['runs']) == 3
        _close(band['lo'], M.min(0), base); _close(band['hi'], M.max(0), base); _close(band['mean'], M.mean(0), base)


def test_fig08_validation_losses_recomputed(fig08):
    S, scale = _suite(), fig08['scale']
    rows = {r['run']: r for r in fig08['runs']}
    for run in ('latent-abl-K1', 'latent-abl-K3', 'latent-abl'):   # at the run's largest training K, by the plain loop
        r = rows[run]
        loss, n = ref_loss(S, run, scale, int(r['K_max']))
        _close(r['val_loss_trainK'], loss, f'{run}: validation loss at K={r["K_max"]}')
        _close(r['val_ppl_trainK'], math.exp(loss), run)
    # Jacobi to tolerance: the fixed point, i.e. the sequential thoughts (App. G); 1e-6: the tolerance stops just short of it
    loss, _ = ref_loss(S, 'latent-abl-K2', scale, None)
    _close(rows['latent-abl-K2']['val_loss_tol'], loss, 'K2 at tolerance vs sequential thoughts', rtol=1e-6)
    # the N=2 chain and vanilla through the library's evaluator (the plain loop above is for N=1)
    from latent_thoughts.evaluation import perplexity
    settings = S.scale(scale)['eval']['ppl']
    for run in ('latent-abl-N2', 'vanilla-abl'):
        ev = perplexity(S.checkpoint(run, scale), split='validation', progress=False, **settings)
        _close(rows[run]['val_loss_tol'], ev['loss'], run)


def test_fig08_seed_noise_and_verdicts_recomputed(fig08):
    from latent_thoughts.evaluation import perplexity
    S, scale = _suite(), fig08['scale']
    settings = S.scale(scale)['eval']['ppl']
    sds = []
    for base in ('vanilla-abl', 'latent-abl'):
        vals = [perplexity(S.checkpoint(n, scale), split='validation', progress=False, **settings)['loss']
                for n in (base, f'{base}-seed1', f'{base}-seed2')]
        st = fig08['seeds'][base]['val_loss_tol']
        _close(st['mean'], np.mean(vals), base); _close(st['sd'], np.std(vals, ddof=1), base)
        sds.append(np.std(vals, ddof=1))
    sigma = math.sqrt(np.mean(np.square(sds)))
    _close(fig08['sigma'], sigma, 'pooled seed σ')
    # the verdicts follow from the written numbers: two single runs differ when |Δ| > 2σ√2
    rows, band = {r['run']: r for r in fig08['runs']}, 2 * sigma * math.sqrt(2)
    d = rows['latent-abl-seqpos']['val_loss_tol'] - rows['latent-abl']['val_loss_tol']
    assert fig08['verdicts']['position_ids'] == ('holds' if abs(d) <= band else 'fails'), (d, band)
    L = {int(rows[f'latent-abl-K{k}']['K_max']): rows[f'latent-abl-K{k}']['val_loss_tol'] for k in range(1, 6)}
    gain, later_better = L[1] - L[3] > band, any(L[3] - L[k] > band for k in (4, 5))
    expect = 'fails' if L[3] - L[1] > band or later_better else 'holds' if gain else 'within noise'
    assert fig08['verdicts']['K_tol'] == expect, (L, band)
    abl = {a['run']: a for a in fig08['ablations']}
    _close(abl['latent-abl-seqpos']['delta_loss'], d, 'seqpos Δ')
    _close(abl['vanilla-abl-hf']['val_ppl'], math.exp(rows['vanilla-abl-hf']['val_loss_tol']), 'hf ppl')


# -- Fig. 13

@pytest.fixture(scope='module')
def fig13(executed):
    out = executed('fig13_random_k')
    return json.loads((out/'fig13_random_k.json').read_text())


def test_fig13_losses_at_k_recomputed_by_a_plain_loop(fig13):
    S, scale = _suite(), fig13['scale']
    assert set(fig13['runs']) == {'latent-abl-K2', 'latent-abl', 'latent-abl-K234'} and not fig13['missing']
    got = {(r['run'], r['k']): r['loss'] for r in fig13['losses']}
    assert len(got) == 3 * len(fig13['inference_iters'])
    for run in fig13['runs']:
        for k in fig13['inference_iters']:
            loss, n = ref_loss(S, run, scale, k)
            _close(got[run, k], loss, f'{run} at k={k}')
    assert fig13['runs']['latent-abl-K2']['train_iters'] == [2] and fig13['runs']['latent-abl-K234']['train_iters'] == [2, 3, 4]


def test_fig13_rmse_recomputed_and_verdict_follows(fig13):
    from latent_thoughts.core import load_method_lm
    from latent_thoughts.evaluation import load_tokenizer
    from latent_thoughts.data import get_blocks
    S, scale = _suite(), fig13['scale']
    for run, v in fig13['runs'].items():
        d = S.checkpoint(run, scale)
        model = load_method_lm(d).eval()
        blocks = get_blocks(S.config_for(run, scale).data.source, 'validation', tokenizer=load_tokenizer(str(d)),
                            block_size=fig13['residual_block_size'])
        idx = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(fig13['seed']))[:fig13['residual_blocks']]
        ids = torch.stack([blocks[int(i)] for i in idx])
        th = ref_jacobi(model.lm, model.embed(ids), fig13['residual_iters'])
        r = [float((b.double() - a.double()).pow(2).mean().sqrt()) for a, b in zip(th, th[1:])]
        _close(v['residual'], r, f'{run}: RMSE(k)', rtol=1e-3, atol=2e-6)
        assert len(v['residual']) == fig13['residual_iters']
    summ = {s['run']: s for s in fig13['summary']}
    fixed = fig13['runs']['latent-abl-K2']['residual']
    _close(summ['latent-abl-K2']['spike_ratio'], fixed[2] / fixed[1], 'r_3 / r_2')
    spike = fixed[2] > fixed[1]
    smooth = all(all(np.diff(fig13['runs'][r]['residual'][:summ[r]['n_active']]) < 0) for r in ('latent-abl', 'latent-abl-K234'))
    assert fig13['verdict']['rmse'].startswith('holds' if spike and smooth else 'fails' if not spike else 'partly')

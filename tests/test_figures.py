"""Paper notebooks: their layout and conventions, a papermill run of each at smoke scale (the `(smoke: …)`
values of its parameters), and the numbers each one writes checked against an independent computation:
plain loops over the Hugging Face model, `numpy.polyfit`, brute-force masks, built models' parameter counts."""
import json, math
from pathlib import Path
import numpy as np
import pytest
import torch

from latent_thoughts.analysis import paper_notebooks, smoke_parameters, check_paper_notebook, load_figure_model

ROOT = Path(__file__).resolve().parents[1]
PAPERS = paper_notebooks(ROOT/'nbs')
IDS = [p.stem for p in PAPERS]


def test_paper_notebooks_sit_at_the_design_card_paths():
    names = {p.name for p in PAPERS}
    # the design card's own example is `papermill nbs/fig12_convergence.ipynb`
    assert {'fig12_convergence.ipynb', 'fig04_jacobi_vanilla.ipynb', 'fig02_03_method.ipynb',
            'tab06_model_sizes.ipynb', 'adaptive_fig01_mask.ipynb', 'tab01_taxonomy.ipynb'} <= names, names
    assert not (ROOT/'nbs'/'papers').exists(), "paper notebooks moved to nbs/: remove nbs/papers/"


@pytest.mark.parametrize('nb', PAPERS, ids=IDS)
def test_paper_notebook_conventions(nb):
    assert check_paper_notebook(nb) == []


def _numbers(x):
    if isinstance(x, dict): return [n for v in x.values() for n in _numbers(v)]
    if isinstance(x, list): return [n for v in x for n in _numbers(v)]
    return [x] if isinstance(x, float) else []


@pytest.mark.parametrize('nb', PAPERS, ids=IDS)
def test_paper_notebook_runs(nb, executed):
    out = executed(nb.stem)
    files = sorted(out.iterdir())
    assert {f.suffix for f in files} >= {'.png', '.svg', '.json', '.csv', '.md', '.tex'}, files
    assert (out/f'{nb.stem}_paper_vs_run.md').exists(), "every paper notebook ends with its 'paper vs this run' table"
    for f in files: assert f.stat().st_size > 0, f
    for f in out.glob('*.json'):
        nums = [x for x in _numbers(json.loads(f.read_text())) if x == x]   # NaN: a cell the paper leaves empty
        assert all(math.isfinite(x) for x in nums), f


# -- independent references: the paper's recipe written as plain loops over the HF model (no library code path)

def _stream(lm, x, pos):
    "Last hidden states of HF model `lm` on input vectors x (B, S, d) at position ids `pos`, with an explicit causal mask."
    S = x.size(1)
    mask = torch.zeros(1, 1, S, S, dtype=x.dtype).masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), torch.finfo(x.dtype).min)
    return lm.base_model(inputs_embeds=x, position_ids=torch.tensor(pos)[None].expand(x.size(0), -1),
                         attention_mask=mask).last_hidden_state

@torch.no_grad()
def ref_jacobi(lm, E, iters):
    "θ^0..θ^iters (one thought per token, positions reused) by §3.2: a plain pass, then passes over e(x1), θ1, e(x2), θ2, …"
    T = E.size(1)
    theta = _stream(lm, E, list(range(T)))
    out = [theta]
    for _ in range(iters):
        stream = torch.stack([v for t in range(T) for v in (E[:, t], theta[:, t])], 1)
        theta = _stream(lm, stream, [t for t in range(T) for _ in (0, 1)])[:, 0::2]   # outputs at the e(x_t) entries
        out.append(theta)
    return out

@torch.no_grad()
def ref_sequential(lm, E):
    "Sequential inference: the stream grows one entry at a time. Returns θ_t and the hidden state read at θ_t."
    entries, pos, thetas, reads = [], [], [], []
    for t in range(E.size(1)):
        entries.append(E[:, t]); pos.append(t)
        thetas.append(_stream(lm, torch.stack(entries, 1), pos)[:, -1])
        entries.append(thetas[-1]); pos.append(t)
        reads.append(_stream(lm, torch.stack(entries, 1), pos)[:, -1])
    return torch.stack(thetas, 1), torch.stack(reads, 1)

def _rmse(a, b): return float((a.double() - b.double()).pow(2).mean().sqrt())

def _close(written, ref, what):
    np.testing.assert_allclose(np.asarray(written, dtype=float), np.asarray(ref, dtype=float), rtol=1e-3, atol=2e-6, err_msg=what)


def test_fig04_rmse_recomputed_by_a_plain_loop(executed):
    d = json.loads((executed('fig04_jacobi_vanilla')/'fig04_jacobi_vanilla.json').read_text())
    base, _ = load_figure_model(ROOT/d['checkpoint'])
    ids = torch.tensor(d['input_ids'])
    thetas = ref_jacobi(base.lm, base.embed(ids), len(d['residuals']))
    _close(d['residuals'], [_rmse(b, a) for a, b in zip(thetas, thetas[1:])], 'Fig. 4 RMSE per iteration')
    assert d['residuals'][-1] < 0.1 * d['residuals'][0]        # the figure's claim, at smoke scale


def test_fig12_traces_recomputed_and_L_refitted(executed):
    d = json.loads((executed('fig12_convergence')/'fig12_convergence.json').read_text())
    model, _ = load_figure_model(ROOT/d['checkpoint'])
    ids = torch.tensor(d['input_ids'])
    E = model.embed(ids)
    thetas, (seq, _) = ref_jacobi(model.lm, E, len(d['residuals'])), ref_sequential(model.lm, E)
    _close(d['residuals'], [_rmse(b, a) for a, b in zip(thetas, thetas[1:])], 'Fig. 12 left: r_k')
    _close(d['to_sequential'], [_rmse(th, seq) for th in thetas], 'Fig. 12 right: distance to H_seq')
    # L refitted from the written trace: floor = median of the last quarter, active = leading r_k > 100x floor (max 10)
    r = np.asarray(d['residuals'])
    floor = np.median(r[-max(1, len(r) // 4):])
    n = 0
    while n < min(10, len(r)) and r[n] > 100 * floor: n += 1
    n = max(n, 2)
    slope, _ = np.polyfit(np.arange(1, n + 1), np.log10(r[:n]), 1)
    assert d['fit']['n_active'] == n
    assert abs(d['fit']['L'] - 10**slope) < 1e-9 and 0 < 10**slope < 1
    # Appendix G: with a contraction constant L, ‖H^(k) − H*‖ ≤ L/(1−L)·r_k (2x slack: L is fitted, not a bound)
    L = 10**slope
    for k in range(1, n + 1): assert d['to_sequential'][k] <= 2 * L / (1 - L) * r[k - 1], k


def test_fig02_03_stream_readouts_and_wavefront(executed):
    out = executed('fig02_03_method')
    s = json.loads((out/'fig02_stream.json').read_text())
    j = json.loads((out/'fig03_jacobi_schedule.json').read_text())
    N = s['n_thoughts']; assert N == 1   # the shipped checkpoint; the loops below are written for one thought
    e = s['entries']
    assert e['pos_reuse'] == [i // 2 for i in range(len(e['entry']))]   # e(x_t) and θ_t share position t
    assert e['pos_sequential'] == list(range(len(e['entry'])))          # the ablation numbers every entry
    assert e['kind'] == ['token', 'thought'] * (len(e['entry']) // 2)
    model, _ = load_figure_model(ROOT/s['checkpoint'])
    ids = torch.tensor(s['input_ids'])
    E = model.embed(ids)
    seq, reads = ref_sequential(model.lm, E)
    assert s['predictions']['ours_id'] == model.lm.get_output_embeddings()(reads)[0].argmax(-1).tolist()
    base, _ = load_figure_model(ROOT/s['baseline_checkpoint'])
    with torch.no_grad(): assert s['predictions']['standard_id'] == base.lm(ids).logits[0].argmax(-1).tolist()
    thetas = ref_jacobi(model.lm, E, j['iters'])
    _close(j['residuals'], [_rmse(b, a) for a, b in zip(thetas, thetas[1:])], 'Fig. 3 residual per pass')
    per_tok = np.asarray(j['per_token_to_sequential'])
    ref_tok = np.stack([(th[0] - seq[0]).double().pow(2).mean(-1).sqrt().numpy() for th in thetas])
    _close(per_tok, ref_tok, 'Fig. 3 per-token distance')
    for k in range(per_tok.shape[0]):   # causality: after pass k the first k+1 thoughts are exact
        assert per_tok[k, :k + 1].max() < 1e-5, (k, per_tok[k])


def _closed_form_params(arch, d, L, f, V, P, tied):
    "Parameters of the three families written out by hand: blocks, norms, embeddings, and the head unless tied."
    head = 0 if tied else V * d
    if arch == 'gpt2':   # c_attn 3d²+3d, c_proj d²+d, mlp 2df+f+d, 2 LayerNorms; wte, wpe; ln_f
        return L * (4*d*d + 4*d + 2*d*f + f + d + 4*d) + (V + P) * d + 2*d + head
    if arch == 'llama':  # q,k,v,o without bias, gate/up/down, 2 RMSNorms; embed; final norm
        return L * (4*d*d + 3*d*f + 2*d) + V*d + d + head
    if arch == 'gpt_neox':  # qkv 3d²+3d, dense d²+d, mlp 2df+f+d, 2 LayerNorms; embed_in; final LayerNorm
        return L * (4*d*d + 4*d + 2*d*f + f + d + 4*d) + V*d + 2*d + head
    raise AssertionError(arch)

def test_tab06_counts_match_built_models(executed):
    from latent_thoughts.config import load_config, build_model, model_shape
    from latent_thoughts.core import hf_config
    out = executed('tab06_model_sizes')
    rows = json.loads((out/'tab06_model_sizes.json').read_text())
    assert {r['paper_params'] for r in rows if r.get('paper_params')} == {'405M', '834M', '1.4B'}
    small = 0
    for r in rows:
        cfg = load_config(ROOT/r['config'])
        if r['params'] < 5e7:    # small enough to build for real on a CPU
            model = build_model(cfg.model, device='cpu'); small += 1
        else:
            with torch.device('meta'): model = build_model(cfg.model, device='cpu')
        assert r['params'] == sum(p.numel() for p in model.parameters()), r['config']
        shape = model_shape(cfg.model)
        hf = hf_config(**shape)
        f = getattr(hf, 'intermediate_size', None) or getattr(hf, 'n_inner', None) or 4 * shape['d_model']
        assert r['params'] == _closed_form_params(shape['arch'], shape['d_model'], shape['n_layer'], f, shape['vocab_size'],
                                                  shape['max_positions'], hf.tie_word_embeddings), r['config']
        assert (r['n_layers'], r['d_model'], r['n_heads']) == (shape['n_layer'], shape['d_model'], shape['n_head'])
        assert r['train_tokens'] == cfg.train.steps * r['batch_tokens']
    assert small >= 1, "the smoke run counts at least one config small enough to build for real"


def test_adaptive_fig01_mask_is_the_brute_force_rule(executed):
    d = json.loads((executed('adaptive_fig01_mask')/'adaptive_fig01_mask.json').read_text())
    t, k = d['t'], d['k']
    M = len(t)
    assert M == d['n_tokens'] * d['k_max']
    for i in range(M):
        for j in range(M):
            assert d['mask2d'][i][j] == int(t[j] <= t[i] and k[j] <= k[i]), (i, j)
            # the 1-D latent chain: entries in sequence order (token-major), each sees everything before it
            assert d['chain'][i][j] == int((t[j], k[j]) <= (t[i], k[i])), (i, j)
    assert d['measured'] == d['mask2d'], "the network run under the mask depends on exactly the allowed entries"

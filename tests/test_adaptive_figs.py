"""The adaptive paper's figure notebooks (Figs. 2-6, main table, ablations), run at smoke scale, checked against
independent computations: the latent unroll re-run as plain loops over the Hugging Face model (a brute-force 2-D mask,
every step recomputed from scratch, the router's gates and the halting rule written out), bucket means in numpy, the
FLOPs ledger recomputed from the training logs, and the suite's cached evaluations."""
import json, math
from pathlib import Path
import numpy as np
import pandas as pd
import pytest
import torch

from latent_thoughts.analysis import load_figure_model

ROOT = Path(__file__).resolve().parents[1]
SCALE = 'smoke'


def _json(out, name): return json.loads((out/f'{name}.json').read_text())


# -- the reference: adaptive latent CoT as plain loops over the HF model

@torch.no_grad()
def ref_unroll(model, ids, tau:float):
    """One sequence `ids` (T,) unrolled step by step as the paper describes, without the library's unroll: at step k every
    still-active token t gets entry (t, k) whose input is e(x_t) (k=1) or z_t^(k-1); ALL entries so far are re-run in one
    HF pass with the mask (t_j <= t_i and k_j <= k_i), positions reused; a token goes on to k+1 iff
    p_reach^(k) * g^(k) >= tau, with g = `model.gate(z)` (the router's sigmoid). Returns steps (T,), gates (T, K) (NaN: not computed), z {(t,k): state}."""
    lm, K, T = model.lm, model.k_max, ids.numel()
    E = lm.get_input_embeddings()(ids[None])[0] * model.embed_scale
    entries, z = [], {}
    reach, active = [1.0] * T, list(range(T))
    steps, gates = [0] * T, np.full((T, K), np.nan)
    for k in range(1, K + 1):
        if not active: break
        entries += [(t, k) for t in active]
        x = torch.stack([E[t] if kk == 1 else z[(t, kk - 1)] for t, kk in entries])[None]
        n = len(entries)
        mask = torch.full((1, 1, n, n), torch.finfo(x.dtype).min, dtype=x.dtype)
        for i, (ti, ki) in enumerate(entries):
            for j, (tj, kj) in enumerate(entries):
                if tj <= ti and kj <= ki: mask[0, 0, i, j] = 0
        h = lm.base_model(inputs_embeds=x, position_ids=torch.tensor([[t for t, _ in entries]]), attention_mask=mask).last_hidden_state[0]
        for i, e in enumerate(entries):
            if e[1] == k: z[e] = h[i]
        nxt = []
        for t in active:
            steps[t] = k
            if k == K: continue
            g = model.gate(z[(t, k)][None])      # the router's continuation probability (None: fixed depth)
            if g is None: nxt.append(t); continue
            g = g.item()
            gates[t, k - 1] = g
            if reach[t] * g >= tau: reach[t] *= g; nxt.append(t)
        active = nxt
    return np.array(steps), gates, z


def halting_from_gates(gates, tau):
    "Steps per token from the written gates (T, K) and tau: continue past k while p_reach^(k+1) = p_reach^(k) g^(k) >= tau."
    gates = np.asarray(gates, dtype=float)
    T, K = gates.shape
    out = []
    for t in range(T):
        reach, k = 1.0, 1
        while k < K and reach * gates[t, k - 1] >= tau: reach *= gates[t, k - 1]; k += 1
        out.append(k)
    return np.array(out)


LEDGER_ARGS = ('k_max', 'router', 'router_hidden', 'adaptive_weight')   # what the FLOPs ledger reads of an adaptive model

def _ledger_args(model): return {k: v for k, v in model.method_config().items() if k in LEDGER_ARGS}


def _close(a, b, what, rtol=1e-4, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=rtol, atol=atol, err_msg=what)


# -- Fig. 2

def test_fig02_step_gains_by_a_plain_loop(executed):
    d = _json(executed('adaptive_fig02_step_gain'), 'adaptive_fig02_step_gain')
    assert not d['missing'] and d['checkpoint'] == f'suite:{SCALE}/adaptive-K3-fixed'
    model, _ = load_figure_model(d['checkpoint'])
    assert model.router is None, "Fig. 2 probes the fixed-depth model"
    ids, K, bins = torch.tensor(d['input_ids']), model.k_max, d['bins']
    head = model.lm.get_output_embeddings()
    p = np.zeros((ids.size(0), ids.size(1) - 1, K))
    for b in range(ids.size(0)):
        _, _, z = ref_unroll(model, ids[b], 0.0)
        for k in range(1, K + 1):
            for t in range(ids.size(1) - 1):
                p[b, t, k - 1] = torch.softmax(head(z[(t, k)]).double(), -1)[ids[b, t + 1]].item()
    _close(d['p_target'], p, 'p_target per token and latent step')
    sums, cnts = np.zeros(bins), np.zeros(bins, dtype=int)
    for b in range(p.shape[0]):                       # every (token, step k < K) pair, bucketed by p_target^(k)
        for t in range(p.shape[1]):
            for k in range(K - 1):
                j = min(int(p[b, t, k] * bins), bins - 1)
                sums[j] += p[b, t, k + 1] - p[b, t, k]; cnts[j] += 1
    pooled = d['pooled']
    assert pooled['count'] == [int(c) for c in cnts if c], "bucket counts"
    _close(pooled['gain_mean'], [s / c for s, c in zip(sums, cnts) if c], 'mean gain per bucket', rtol=1e-3, atol=1e-7)


# -- Figs. 3-4

def test_fig03_steps_are_the_halting_decisions_of_the_router(executed):
    out = executed('adaptive_fig03_04_traces')
    d = _json(out, 'adaptive_fig03_halting')
    assert not d['missing']
    tau, steps = d['tau'], np.array(d['steps'])
    # 1. from the written router probabilities and tau alone
    assert (halting_from_gates(d['gates'], tau) == steps).all()
    assert (np.array(d['steps_decode']) == steps).all(), "token-by-token decoding halts where the parallel unroll does"
    # 2. from a re-run of the model as plain loops (gates recomputed, not read)
    model, _ = load_figure_model(d['checkpoint'])
    ref_steps, ref_gates, _ = ref_unroll(model, torch.tensor(d['input_ids']), tau)
    assert (ref_steps == steps).all(), (ref_steps, steps)
    g = np.array(d['gates'], dtype=float)
    ok = ~np.isnan(ref_gates)
    _close(g[ok], ref_gates[ok], 'router gates of the executed steps')
    # reach and exit probabilities follow the probability flow of Fig. 3 (right)
    reach, ex = np.array(d['reach']), np.array(d['exit_probs'])
    for t, s in enumerate(steps):
        r = 1.0
        for k in range(1, s + 1):
            _close(reach[t, k - 1], r, f'p_reach t={t} k={k}')
            _close(ex[t, k - 1], r * (1 - g[t, k - 1]) if k < s else r, f'p_exit t={t} k={k}')   # the last executed step takes the rest
            if k < s: r *= g[t, k - 1]
    _close(ex.sum(-1), np.ones(len(steps)), 'exit probabilities sum to 1')


def test_fig04_training_trace_counts_and_ledger(executed):
    from latent_thoughts.flops import flops_per_token
    d = _json(executed('adaptive_fig03_04_traces'), 'adaptive_fig04_training_step')
    model, _ = load_figure_model(d['checkpoint'])
    ids, ex = torch.tensor(d['input_ids']), np.array(d['executed'], dtype=bool)   # (B, T), (B, T, K)
    for b in range(ids.size(0)):   # pruning at the training threshold, re-run as plain loops
        ref, _, _ = ref_unroll(model, ids[b], d['prune_threshold'])
        assert (ex[b].sum(-1) == ref).all(), b
        assert (ex[b] == (np.arange(1, model.k_max + 1)[None] <= ref[:, None])).all(), "a token runs steps 1..s, no gaps"
    active = ex.sum((0, 1))
    tr = d['trace']
    assert tr['active_tokens'] == active.tolist()
    assert tr['kv_reused_entries'] == [int(active[:k].sum()) for k in range(model.k_max)]
    assert d['entry_passes_without_cache'] == sum(int(active[:k + 1].sum()) for k in range(model.k_max))
    s = active.sum() / ids.numel()
    _close(d['steps_per_token'], s, 'steps per token')
    led = lambda steps: flops_per_token('adaptive', model.lm.config, seq_len=ids.size(1), **_ledger_args(model), train_steps=steps)
    _close(d['ledger_train_flops_per_token'], led(s)['training_flops_per_token'], 'training FLOPs (ledger, pruned)', rtol=1e-9)
    _close(d['ledger_train_flops_per_token_no_pruning'], led(float(model.k_max))['training_flops_per_token'], 'ledger, all steps', rtol=1e-9)


# -- Fig. 5 and the main table; ablations: cached evaluations and the FLOPs of the training logs

def _suite():
    from latent_thoughts.suite import load_suite
    return load_suite()

def ledger_train_flops(S, run):
    "Training FLOPs of `run` re-added from its log: per step, the ledger at that step's executed latent steps x its tokens."
    from latent_thoughts.config import model_shape
    from latent_thoughts.flops import flops_per_token
    cfg, man = S.config_for(run, SCALE), S.manifest(run, SCALE)
    log = S.metrics(run, SCALE)
    tr = log.dropna(subset=['loss']).sort_values('step')
    assert len(tr) == man['steps'], f"{run}: every step is logged at smoke"
    shape, args = model_shape(cfg.model), dict(cfg.model.method_args)
    per_step_tokens = np.diff(np.concatenate([[0], tr['tokens'].to_numpy()]))
    total = 0.0
    for (_, rec), n in zip(tr.iterrows(), per_step_tokens):
        a = {**args, 'train_steps': float(rec['steps_executed'])} if cfg.model.method == 'adaptive' else args
        total += flops_per_token(cfg.model.method, shape, seq_len=cfg.data.block_size, **a)['training_flops_per_token'] * n
    return total


def test_fig05_tab01_perplexities_accuracy_and_flops(executed):
    out = executed('adaptive_fig05_tab01_methods')
    S = _suite()
    rows = json.loads((out/'adaptive_tab01_methods.json').read_text())
    d = _json(out, 'adaptive_fig05_ppl')
    assert d['missing'] == [] and len(rows) == len(d['runs']) >= 7
    for r in rows:
        for split in ('validation', 'test'):
            e = S.evaluate(r['run'], SCALE, 'ppl', split)
            assert e['cached'], f"{r['run']} {split}: the notebook cached this evaluation"
            _close(r[f'shakespeare/{split} ppl'], e['ppl'], f"{r['run']} {split} ppl", rtol=1e-12)
        man = S.manifest(r['run'], SCALE)
        _close(r['train_flops'], man['train_flops'], f"{r['run']} train FLOPs = manifest", rtol=1e-12)
        _close(r['train_flops'], ledger_train_flops(S, r['run']), f"{r['run']} train FLOPs = ledger over the log", rtol=1e-9)
        h = S.evaluate(r['run'], SCALE, 'harness', None)
        assert h['cached']
        for task, res in h['results'].items():
            if 'acc,none' in res: _close(r[f'{task} 0-shot acc'], res['acc,none'], f"{r['run']} {task}", rtol=1e-12)
    v = next(r for r in rows if r['run'] == 'vanilla-llama-L')
    for r in rows: _close(r['train_flops_vs_vanilla'], r['train_flops'] / v['train_flops'], 'FLOPs ratio', rtol=1e-12)


def test_tab02_ablations_from_logs_and_cache(executed):
    out = executed('adaptive_tab02_ablations')
    S = _suite()
    d = _json(out, 'adaptive_tab02_ablations')
    tab = pd.DataFrame(d['table'])
    assert set(tab['run']) == {'adaptive-K3', 'adaptive-K3-mlp', 'adaptive-K3-fixed', 'adaptive-K3-w0', 'adaptive-K3-w003', 'adaptive-K3-w03'}
    for _, r in tab.iterrows():
        n = r['run']
        e = S.evaluate(n, SCALE, 'ppl', 'validation')
        assert e['cached']; _close(r['validation ppl'], e['ppl'], f'{n} ppl', rtol=1e-12)
        log = S.metrics(n, SCALE).dropna(subset=['steps_executed'])
        tail = log['steps_executed'].tail(max(1, int(round(d['tail_frac'] * len(log))))).mean()
        _close(r['train_steps_per_token'], tail, f'{n} training steps per token')
        _close(r['train_flops'], ledger_train_flops(S, n), f'{n} train FLOPs = ledger over the log', rtol=1e-9)
        cfg = S.config_for(n, SCALE).model.method_args
        if cfg.get('router') == 'none': assert math.isnan(r['adaptive_weight'])
        else: assert r['adaptive_weight'] == cfg.get('adaptive_weight', 0.1)
    # the fixed-depth model runs every step: K_max steps per token in training and at inference
    fixed = tab.set_index('run').loc['adaptive-K3-fixed']
    assert fixed['train_steps_per_token'] == 3 and fixed['inference_steps_per_token'] == 3


def test_tab02_inference_steps_recomputed(executed):
    "The cached `adaptive_steps` evaluation (registered by the notebook) recomputed by the plain-loop halting reference."
    from latent_thoughts.data import get_blocks
    out = executed('adaptive_tab02_ablations')
    d = _json(out, 'adaptive_tab02_ablations')
    tab = pd.DataFrame(d['table']).set_index('run')
    S, se = _suite(), d['steps_eval']
    model, tok = load_figure_model(f'suite:{SCALE}/adaptive-K3')
    blocks = get_blocks(S.config_for('adaptive-K3', SCALE).data.source, 'validation', tokenizer=tok, block_size=se['block_size'])
    idx = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(se['seed']))[:se['n_blocks']]
    steps = np.concatenate([ref_unroll(model, blocks[int(i)], model.halt_threshold)[0] for i in idx])
    _close(tab.loc['adaptive-K3', 'inference_steps_per_token'], steps.mean(), 'inference steps per token at tau')
    _close(tab.loc['adaptive-K3', 'inference_tau'], model.halt_threshold, 'tau')


# -- compute figure

def test_fig06_steps_flops_and_ppl_per_tau(executed):
    from latent_thoughts.flops import flops_per_token
    out = executed('adaptive_fig06_compute')
    d = _json(out, 'adaptive_fig06_compute')
    S = _suite()
    cur = pd.DataFrame(d['curves'])
    assert d['missing'] == [] and set(cur['run']) == set(d['runs'])
    for run in d['runs']:
        model, _ = load_figure_model(d['sources'][run])
        ids = torch.tensor(d['input_ids'][run])
        for _, c in cur[cur['run'] == run].iterrows():
            steps = np.concatenate([ref_unroll(model, ids[b], c['tau'])[0] for b in range(ids.size(0))])
            _close(c['mean_steps'], steps.mean(), f'{run} tau={c["tau"]}: mean steps')
            led = flops_per_token('adaptive', model.lm.config, seq_len=d['seq_len'][run],
                                  **_ledger_args(model), mean_steps=steps.mean(), train_steps=steps.mean())
            _close(c['inference_flops'], led['inference_flops_per_token'], f'{run} tau={c["tau"]}: inference FLOPs = ledger', rtol=1e-9)
            _close(c['train_flops'], led['training_flops_per_token'], f'{run} tau={c["tau"]}: training FLOPs = ledger', rtol=1e-9)
            e = S.evaluate(run, SCALE, 'ppl', 'validation', threshold=float(c['tau']), max_tokens=d['ppl_max_tokens'])
            assert e['cached'] and e['eval_mode']['threshold'] == c['tau']
            _close(c['ppl'], e['ppl'], f'{run} tau={c["tau"]}: ppl = cached evaluation', rtol=1e-12)
        # the distribution at the model's tau: the same plain-loop halting
        dist = pd.DataFrame(d['distribution']).query('run == @run')
        steps = np.concatenate([ref_unroll(model, ids[b], model.halt_threshold)[0] for b in range(ids.size(0))])
        assert dist['count'].tolist() == np.bincount(steps, minlength=model.k_max + 1)[1:].tolist()

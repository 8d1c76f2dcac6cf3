"""Adaptive latent CoT: exactness against independent references (float64, sdpa, tiny random models)."""
import json

import pytest
import torch

from latent_thoughts.core import build_lm, MethodLM, position_ids_from_mask
from latent_thoughts.adaptive import AdaptiveLatentLM, target_prob_gain, latent_step_stats, compute_vs_threshold

ARCHS = ['llama', 'gpt_neox', 'gpt2']
V = 89


def make(arch='llama', seed=0, **kw):
    lm = build_lm(arch, seed=seed, dtype=torch.float64, d_model=32, n_layer=2, n_head=4, vocab_size=V, max_positions=64)
    torch.manual_seed(seed + 1)
    m = AdaptiveLatentLM(lm, **kw).to(torch.float64).eval()   # GPT-2 has dropout
    if m.router is not None:   # spread the gates so that thresholds split tokens between depths
        with torch.no_grad(): (m.router.net if router_linear(m) else m.router.net[-1]).weight.mul_(4.0)
    return m


def router_linear(m): return isinstance(m.router.net, torch.nn.Linear)


def ids_(B=2, T=9, seed=3):
    return torch.randint(1, V, (B, T), generator=torch.Generator().manual_seed(seed))


def reference(m, ids, am=None, threshold=0.0):
    """The definition, naively: loops over tokens and steps, full recompute of all steps <= k at every step
    (no KV cache), a mask built entry by entry, reach/exit by the recursion. Returns logits, exit probs, z, executed."""
    B, T = ids.shape; K = m.k_max
    am = torch.ones_like(ids) if am is None else am
    pos = position_ids_from_mask(am)
    d = m.config.hidden_size
    z = torch.zeros(B, T, K, d, dtype=torch.float64)
    executed = torch.zeros(B, T, K, dtype=torch.bool)
    executed[:, :, 0] = am.bool()
    reach = am.double().clone()
    exit_p = torch.zeros(B, T, K, dtype=torch.float64)
    for k in range(1, K + 1):
        # entries of steps 1..k, step-major
        ents = [(t, kk) for kk in range(1, k + 1) for t in range(T)]
        N = len(ents)
        x = torch.stack([m.embed(ids)[:, t] if kk == 1 else z[:, t, kk - 2] for t, kk in ents], 1)
        mask = torch.full((B, 1, N, N), torch.finfo(torch.float64).min, dtype=torch.float64)
        for b in range(B):
            for i, (ti, ki) in enumerate(ents):
                mask[b, 0, i, i] = 0
                for j, (tj, kj) in enumerate(ents):
                    if executed[b, tj, kj - 1] and tj <= ti and kj <= ki: mask[b, 0, i, j] = 0
        p = torch.stack([pos[:, t] for t, kk in ents], 1)
        h = m.base(inputs_embeds=x, position_ids=p, attention_mask=mask).last_hidden_state
        for i, (t, kk) in enumerate(ents):
            if kk == k: z[:, t, k - 1] = h[:, i] * executed[:, t, k - 1, None]
        for b in range(B):
            for t in range(T):
                if not executed[b, t, k - 1]: continue
                if k == K: exit_p[b, t, k - 1] = reach[b, t]; continue
                g = m.router(z[b, t, k - 1]) if m.router is not None else torch.tensor(1.0, dtype=torch.float64)
                nxt = reach[b, t] * g
                if nxt >= threshold:
                    exit_p[b, t, k - 1] = reach[b, t] * (1 - g); reach[b, t] = nxt; executed[b, t, k] = True
                else:
                    exit_p[b, t, k - 1] = reach[b, t]
    final = (exit_p[..., None] * z).sum(2)
    return m.head(final), exit_p, z, executed


@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('thr', [0.0, 0.3])
def test_forward_matches_naive_definition(arch, thr):
    m = make(arch, k_max=3)
    ids = ids_()
    with torch.no_grad():
        o = m(ids, threshold=thr)
        lg, ep, z, ex = reference(m, ids, threshold=thr)
        tr = m.trace(ids, threshold=thr)
    torch.testing.assert_close(tr['executed'], ex)
    torch.testing.assert_close(o.logits, lg, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(o.exit_probs, ep, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(o.exit_probs.sum(-1), torch.ones(2, 9, dtype=torch.float64))
    if thr > 0:
        steps = ex.sum(-1)
        assert steps.unique().numel() > 1, "test setup: the threshold should split tokens between depths"
        assert o.latent_states is None and o.metrics['compute_frac'] < 1
    else:
        torch.testing.assert_close(o.latent_states, z, rtol=1e-10, atol=1e-10)
        assert o.metrics['compute_frac'] == 1.0


@pytest.mark.parametrize('arch', ['llama', 'gpt_neox'])
@pytest.mark.parametrize('thr', [0.0, 0.3])
def test_stepwise_cache_equals_dense_pass(arch, thr):
    m = make(arch, k_max=4)
    ids = ids_(T=11)
    am = torch.ones_like(ids); am[1, :3] = 0
    with torch.no_grad():
        tr = m.trace(ids, am, threshold=thr)
        inp = torch.cat([m.embed(ids)[:, :, None], tr['z'][:, :, :-1]], 2)
        ref = m.dense_hidden(inp, am, tr['executed'])
    sel = tr['executed'] & am.bool()[..., None]
    torch.testing.assert_close(tr['z'][sel], ref[sel], rtol=1e-10, atol=1e-10)


def test_threshold_zero_is_no_pruning_and_pruning_cuts_flops():
    m = make('llama', k_max=4, prune_threshold=0.0)
    ids = ids_()
    o0 = m(ids, labels=ids, threshold=0.0)
    oN = m.train()(ids, labels=ids); m.eval()                       # training with prune_threshold = 0: nothing pruned
    torch.testing.assert_close(o0.logits, oN.logits, rtol=0, atol=0)
    # eval mode halts at tau by default, as generation does (so perplexity scores the model that generates)
    torch.testing.assert_close(m(ids).logits, m(ids, threshold=m.halt_threshold).logits, rtol=0, atol=0)
    assert m(ids).metrics['steps_executed'] < o0.metrics['steps_executed']
    op = m(ids, labels=ids, threshold=0.25)
    assert op.metrics['compute_frac'] < 1.0 and op.metrics['flops_per_token'] < o0.metrics['flops_per_token']
    assert op.metrics['compute_frac_batched'] >= op.metrics['compute_frac'] - 1e-12
    assert any(op.metrics[f'pruned_frac_k{k}'] > 0 for k in range(2, 5))


def test_training_prunes_by_default():
    """Training prunes by default (the paper trains with pruning; the default is tau's value): with a router that halts,
    the executed steps, counted by the naive reference, are < K_max; prune_threshold=0 runs all of them."""
    from latent_thoughts.config import ModelConfig, build_model
    ids = ids_()
    m = make('llama', k_max=4, router_bias=-2.0).train()        # a router biased to halt (gates spread around 0.12)
    assert m.prune_threshold == m.halt_threshold == 0.1
    out = m(ids, labels=ids)
    with torch.no_grad(): _, _, _, ex = reference(m, ids, threshold=m.prune_threshold)
    steps = ex.sum(-1).double()
    assert out.metrics['steps_executed'] == pytest.approx(steps.mean().item(), abs=1e-12)
    assert steps.mean() < 3 and (steps == 1).any(), steps
    off = make('llama', k_max=4, router_bias=-2.0, prune_threshold=0.0).train()
    assert off(ids, labels=ids).metrics['steps_executed'] == 4.0
    cfg_model = build_model(ModelConfig(method='adaptive', d_model=32, n_layer=1, n_head=2, vocab_size=64))
    assert cfg_model.prune_threshold == 0.1                     # configs that do not set it prune too


@pytest.mark.parametrize('arch', ['llama', 'gpt_neox'])
def test_decode_with_halting_equals_parallel_forward(arch):
    m = make(arch, k_max=4)
    ids = ids_(T=10)
    tau = 0.3
    with torch.no_grad():
        par = m(ids, threshold=tau).logits
        ex = m.trace(ids, threshold=tau)['executed'].sum(-1)
        lg, st = m.prefill(ids[:, :3], torch.ones_like(ids[:, :3]), threshold=tau)
        torch.testing.assert_close(lg, par[:, 2], rtol=1e-10, atol=1e-10)
        for t in range(3, ids.size(1)):
            lg, st = m.decode(ids[:, t], st)
            torch.testing.assert_close(lg, par[:, t], rtol=1e-10, atol=1e-10)
    dec_steps = torch.stack(st['steps'][1:], 1)
    torch.testing.assert_close(dec_steps, ex[:, 3:])
    assert dec_steps.unique().numel() > 1


@pytest.mark.parametrize('side', ['right', 'left'])
def test_padded_batch_equals_unpadded_rows(side):
    m = make('llama', k_max=3, adaptive_weight=0.5)
    a, b = ids_(1, 9, seed=5), ids_(1, 6, seed=6)
    pad = torch.zeros(1, 3, dtype=torch.long)
    b_p = torch.cat([b, pad], 1) if side == 'right' else torch.cat([pad, b], 1)
    am = torch.ones(2, 9, dtype=torch.long)
    if side == 'right': am[1, 6:] = 0
    else: am[1, :3] = 0
    batch = torch.cat([a, b_p])
    for thr in (0.0, 0.3):
        with torch.no_grad():
            ob = m(batch, labels=batch, attention_mask=am, threshold=thr)
            oa, ob1 = m(a, labels=a, threshold=thr), m(b, labels=b, threshold=thr)
        sl = slice(0, 6) if side == 'right' else slice(3, 9)
        torch.testing.assert_close(ob.logits[0], oa.logits[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ob.logits[1, sl], ob1.logits[0], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ob.exit_probs[1, sl], ob1.exit_probs[0], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(ob.exit_probs[am.bool()].sum(-1), torch.ones(15, dtype=torch.float64))
        # the loss is a token average over both rows
        n_a, n_b = 8, 5
        ce = (oa.metrics['ce'] * n_a + ob1.metrics['ce'] * n_b) / (n_a + n_b)
        assert abs(ob.metrics['ce'] - ce) < 1e-10
        adapt = (oa.metrics['adaptive_loss'] * n_a + ob1.metrics['adaptive_loss'] * n_b) / (n_a + n_b)
        assert abs(ob.metrics['adaptive_loss'] - adapt) < 1e-10


def test_generate_padded_batch_equals_rows():
    m = make('gpt_neox', k_max=3, halt_threshold=0.3)
    a, b = ids_(1, 6, seed=7), ids_(1, 4, seed=8)
    batch = torch.cat([a, torch.cat([b, torch.zeros(1, 2, dtype=torch.long)], 1)])
    am = torch.tensor([[1] * 6, [1] * 4 + [0] * 2])
    gb = m.generate(batch, attention_mask=am, max_new_tokens=6)
    ga, gb1 = m.generate(a, max_new_tokens=6), m.generate(b, max_new_tokens=6)
    assert gb[0, 6:].tolist() == ga[0, 6:].tolist()
    assert gb[1, 6:].tolist() == gb1[0, 4:].tolist()


def test_prefill_takes_threshold_like_forward():
    "generate/prefill take tau as threshold= (forward's name): per call it equals a model built with that halt_threshold."
    import inspect, warnings
    assert 'threshold' in inspect.signature(AdaptiveLatentLM.prefill).parameters
    assert 'threshold' in inspect.signature(AdaptiveLatentLM.forward).parameters
    m = make('gpt_neox', k_max=3, halt_threshold=0.1, router_bias=-0.5)
    prompt = ids_(2, 5, seed=9)
    for tau in (0.0, 0.4, 1.0):
        m_tau = make('gpt_neox', k_max=3, halt_threshold=tau, router_bias=-0.5)   # same seed: the same weights
        g = m.generate(prompt, max_new_tokens=5, threshold=tau)
        assert g.tolist() == m_tau.generate(prompt, max_new_tokens=5).tolist()
        with torch.no_grad(): _, st = m.prefill(prompt, torch.ones_like(prompt), threshold=tau)
        assert st['tau'] == tau
        with warnings.catch_warnings(record=True) as w:   # the old spelling still works, with a DeprecationWarning
            warnings.simplefilter('always')
            assert m.generate(prompt, max_new_tokens=5, halt_threshold=tau).tolist() == g.tolist()
        assert [x.category for x in w] == [DeprecationWarning]
    steps = {tau: make('gpt_neox', k_max=3, router_bias=-0.5).prefill(prompt, torch.ones_like(prompt), threshold=tau)[1]['steps'][0]
             for tau in (0.0, 1.0)}
    assert steps[0.0].tolist() == [3, 3] and steps[1.0].tolist() == [1, 1]   # the keyword is not ignored
    with pytest.raises(ValueError, match='threshold= only'):
        m.prefill(prompt, torch.ones_like(prompt), threshold=0.2, halt_threshold=0.3)


def test_adaptive_loss_formula_and_gradients():
    m = make('llama', k_max=3, adaptive_weight=0.7)
    ids = ids_()
    for thr in (0.0, 0.3):
        o = m(ids, labels=ids, threshold=thr)
        with torch.no_grad():
            tr = m.trace(ids, threshold=thr)
            K = m.k_max
            p = torch.stack([m.head(tr['z'][:, :-1, k]).softmax(-1).gather(-1, ids[:, 1:, None])[..., 0] for k in range(K)], -1)
            # continuing past step k (executed at k+1) with reach p_reach^(k+1)
            ref = sum((p[..., k] * tr['reach'][:, :-1, k + 1] * tr['executed'][:, :-1, k + 1]).sum() for k in range(K - 1)) / p[..., 0].numel()
        assert abs(o.aux_loss.item() - ref.item()) < 1e-12
        assert abs(o.loss.item() - (o.metrics['ce'] + 0.7 * o.aux_loss.item())) < 1e-12
    m.zero_grad()
    o.aux_loss.backward()
    assert m.router.net.weight.grad.abs().sum() > 0           # the adaptive term trains the router
    assert all(p.grad is None or p.grad.abs().sum() > 0 for p in m.lm.parameters() if p.grad is not None)
    m.zero_grad()
    m(ids, labels=ids, threshold=0.3).loss.backward()
    assert m.router.net.weight.grad.abs().sum() > 0 and m.lm.get_input_embeddings().weight.grad.abs().sum() > 0


@pytest.mark.parametrize('arch', ARCHS)
def test_kmax_one_is_the_plain_model(arch):
    m = make(arch, k_max=1)
    ids = ids_()
    am = torch.ones_like(ids); am[0, :2] = 0
    with torch.no_grad():
        torch.testing.assert_close(m(ids).logits, m.lm(ids).logits, rtol=1e-10, atol=1e-10)
        ref = m.lm(ids, attention_mask=am, position_ids=position_ids_from_mask(am)).logits
        torch.testing.assert_close(m(ids, attention_mask=am).logits[am.bool()], ref[am.bool()], rtol=1e-10, atol=1e-10)


def test_fixed_depth_router_none():
    m = make('llama', k_max=3, router='none')
    ids = ids_()
    with torch.no_grad():
        o = m(ids, labels=ids, threshold=0.9)       # fixed depth never prunes: reach stays 1
        lg, ep, z, ex = reference(m, ids, threshold=0.9)
    assert ex.all() and o.metrics['compute_frac'] == 1.0 and o.aux_loss is None
    torch.testing.assert_close(o.exit_probs[..., -1], torch.ones(2, 9, dtype=torch.float64))
    torch.testing.assert_close(o.logits, lg, rtol=1e-10, atol=1e-10)


def _flex_ok():
    try:
        from torch.nn.attention.flex_attention import flex_attention  # noqa
        return True
    except Exception: return False


@pytest.mark.skipif(not _flex_ok(), reason='this torch build has no flex attention')
@pytest.mark.parametrize('arch', ['llama', 'gpt_neox'])
def test_flex_equals_sdpa(arch):
    ms, mf = make(arch, k_max=3), make(arch, k_max=3, attn_backend='flex')
    ids = ids_()
    am = torch.ones_like(ids); am[1, :2] = 0
    with torch.no_grad():
        for thr in (0.0, 0.3):
            torch.testing.assert_close(mf(ids, attention_mask=am, threshold=thr).logits[am.bool()],
                                       ms(ids, attention_mask=am, threshold=thr).logits[am.bool()], rtol=1e-10, atol=1e-10)
        ts = ms.trace(ids, am, threshold=0.0)
        inp = torch.cat([ms.embed(ids)[:, :, None], ts['z'][:, :, :-1]], 2)
        sel = am.bool()
        torch.testing.assert_close(mf.dense_hidden(inp, am)[sel], ms.dense_hidden(inp, am)[sel], rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(mf.generate(ids[:, :4], max_new_tokens=4), ms.generate(ids[:, :4], max_new_tokens=4))


@pytest.mark.skipif(not _flex_ok(), reason='this torch build has no flex attention')
def test_flex_backward_on_cpu():
    mf = make('llama', k_max=2, attn_backend='flex')
    ids = ids_()
    try:
        mf(ids, labels=ids).loss.backward()
    except NotImplementedError as e:
        print(f'SKIP reason: {e}')
        pytest.skip(f'flex attention backward unsupported on CPU in torch {torch.__version__}: {e}')
    assert mf.router.net.weight.grad is not None


def test_save_load_round_trip(tmp_path):
    m = make('gpt_neox', k_max=3, prune_threshold=0.2, adaptive_weight=0.3, halt_threshold=0.25, router_hidden=8, router_bias=1.5)
    ids = ids_()
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / 'latent_config.json').read_text())
    assert cfg['method'] == 'adaptive' and cfg['router_hidden'] == 8 and cfg['prune_threshold'] == 0.2
    m2 = MethodLM.from_pretrained(tmp_path).to(torch.float64)
    assert isinstance(m2, AdaptiveLatentLM) and m2.method_config() == m.method_config()
    with torch.no_grad():
        torch.testing.assert_close(m2(ids, labels=ids).logits, m(ids, labels=ids).logits, rtol=1e-12, atol=1e-12)
    m3 = AdaptiveLatentLM.from_pretrained(tmp_path, halt_threshold=0.6)
    assert m3.halt_threshold == 0.6


def test_probes():
    m = make('llama', k_max=4)
    ids = ids_(3, 12)
    df = target_prob_gain(m, ids, bins=4)
    assert set(df.columns) >= {'bin', 'p_lo', 'p_hi', 'gain_mean', 'count'}
    assert df['count'].sum() == 3 * 11 * 3
    # the pooled mean gain equals the direct computation
    with torch.no_grad():
        z = m.trace(ids, threshold=0.0)['z']
        p = torch.stack([m.head(z[:, :-1, k]).softmax(-1).gather(-1, ids[:, 1:, None])[..., 0] for k in range(4)], -1)
    total = ((df['gain_mean'] * df['count']).sum()) / df['count'].sum()
    assert abs(total - (p[..., 1:] - p[..., :-1]).mean().item()) < 1e-9
    by = target_prob_gain(m, ids, bins=4, by_step=True)
    assert sorted(by['step'].unique().tolist()) == [1, 2, 3]
    st = latent_step_stats(m, ids, threshold=0.3)
    assert abs(sum(st['distribution']) - 1) < 1e-12 and 1 <= st['mean_steps'] <= 4
    cv = compute_vs_threshold(m, ids, taus=(0.0, 0.3, 1.0))
    assert cv['compute_frac'].iloc[0] == 1.0 and cv['mean_steps'].iloc[-1] == 1.0
    assert (cv['flops_per_token'].diff().dropna() <= 0).all()


def test_bad_inputs():
    lm = build_lm('llama', d_model=32, n_layer=1, n_head=4, vocab_size=V)
    with pytest.raises(ValueError, match='k_max'): AdaptiveLatentLM(lm, k_max=0)
    with pytest.raises(ValueError, match='halt_threshold'): AdaptiveLatentLM(lm, halt_threshold=-0.1)
    with pytest.raises(ValueError, match='router'): AdaptiveLatentLM(lm, router='mlp')
    with pytest.raises(ValueError, match='attn_backend'): AdaptiveLatentLM(lm, attn_backend='flash')
    with pytest.raises(ValueError, match='adaptive_weight'): AdaptiveLatentLM(lm, adaptive_weight=-1)
    lm.config._attn_implementation = 'flash_attention_2'
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"): AdaptiveLatentLM(lm)
    lm.config._attn_implementation = 'sdpa'
    m = AdaptiveLatentLM(lm)
    ids = ids_()
    with pytest.raises(ValueError, match='does not match'): m(ids, attention_mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r'\(batch, seq\)'): m(ids[0])
    g2 = build_lm('gpt2', d_model=32, n_layer=1, n_head=4, vocab_size=V, max_positions=8)
    with pytest.raises(ValueError, match='out of range'): AdaptiveLatentLM(g2)(ids_(1, 12))


# ---- the router study's knobs (issue 15): beta, warm-up of the adaptive loss, router initialisation

def _adaptive_loss_loop(m, ids, thr, beta):
    "The adaptive loss by plain loops: sum over targets and k < K of (p_target^(k) - beta) * p_reach^(k+1), continued only."
    tr = m.trace(ids, threshold=thr)
    B, T = ids.shape
    tot = 0.0
    for b in range(B):
        for t in range(T - 1):
            for k in range(m.k_max - 1):
                if not tr['executed'][b, t, k + 1]: continue     # pruned after step k+1's decision: no penalty
                p = torch.softmax(m.head(tr['z'][b, t, k]), -1)[ids[b, t + 1]].item()
                tot += (p - beta) * tr['reach'][b, t, k + 1].item()
    return tot / (B * (T - 1))


@pytest.mark.parametrize('beta', [0.0, 0.25, 1.0])
def test_adaptive_beta_formula_and_direction(beta):
    m = make('llama', k_max=3, adaptive_beta=beta, adaptive_weight=0.5)
    ids = ids_()
    for thr in (0.0, 0.3):
        o = m(ids, labels=ids, threshold=thr)
        with torch.no_grad(): ref = _adaptive_loss_loop(m, ids, thr, beta)
        assert abs(o.aux_loss.item() - ref) < 1e-12
        assert abs(o.loss.item() - (o.metrics['ce'] + 0.5 * o.aux_loss.item())) < 1e-12
    # beta = 1: every target probability is below it, so the adaptive loss pushes every gate up (continue);
    # beta = 0: it pushes them down (halt). Checked on the router bias's gradient (descent moves it against the gradient).
    m.zero_grad(); m(ids, labels=ids, threshold=0.0).aux_loss.backward()
    gb = m.router.net.bias.grad.item()
    if beta == 1.0: assert gb < 0
    if beta == 0.0: assert gb > 0


def test_adaptive_beta_zero_is_the_old_loss():
    a, b = make('llama', k_max=3), make('llama', k_max=3, adaptive_beta=0.0)
    ids = ids_()
    assert a(ids, labels=ids, threshold=0.0).loss.item() == b(ids, labels=ids, threshold=0.0).loss.item()


def test_adaptive_warmup_ramps_and_resumes(tmp_path):
    m = make('gpt_neox', k_max=3, adaptive_weight=0.2, adaptive_warmup=3).train()
    ids = ids_()
    seen = []
    for i in range(5):
        o = m(ids, labels=ids, threshold=0.0)
        seen.append(o.metrics['adaptive_weight'])
        assert abs(o.loss.item() - (o.metrics['ce'] + seen[-1] * o.aux_loss.item())) < 1e-12
    assert seen == pytest.approx([0.0, 0.2 / 3, 0.4 / 3, 0.2, 0.2])
    m.eval(); m(ids, labels=ids); m.train(); m(ids)          # evaluation and label-free calls do not count
    assert int(m.adaptive_calls) == 5
    m.save_pretrained(tmp_path)
    m2 = MethodLM.from_pretrained(tmp_path)
    assert int(m2.adaptive_calls) == 5 and m2.adaptive_weight_now() == pytest.approx(0.2)
    assert make('llama').adaptive_weight_now() == 0.1 and 'adaptive_calls' not in dict(make('llama').named_buffers())


def test_router_init_std_and_config_keys(tmp_path):
    m = make('llama', k_max=3, router_init_std=0.0, router_bias=-1.0)   # make() scales the weights by 4: still zero
    ids = ids_()
    g = m.trace(ids, threshold=0.0)['gates'][..., :2]
    torch.testing.assert_close(g, torch.full_like(g, torch.sigmoid(torch.tensor(-1.0, dtype=torch.float64)).item()))
    assert make('llama', router_init_std=0.0, router_hidden=8).router.net[-1].weight.abs().sum() == 0
    # defaults write exactly the keys they wrote before these options existed; set options round-trip
    assert list(make('llama').method_config()) == ['k_max', 'prune_threshold', 'adaptive_weight', 'halt_threshold', 'router',
                                                   'router_hidden', 'router_bias', 'attn_backend']
    m = make('llama', k_max=3, adaptive_beta=0.3, adaptive_warmup=7, router_init_std=0.01)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / 'latent_config.json').read_text())
    assert (cfg['adaptive_beta'], cfg['adaptive_warmup'], cfg['router_init_std']) == (0.3, 7, 0.01)
    assert MethodLM.from_pretrained(tmp_path).method_config() == m.method_config()


def test_router_study_knobs_bad_inputs():
    lm = build_lm('llama', d_model=32, n_layer=1, n_head=4, vocab_size=V)
    with pytest.raises(ValueError, match='adaptive_beta'): AdaptiveLatentLM(lm, adaptive_beta=-0.1)
    with pytest.raises(ValueError, match='adaptive_warmup'): AdaptiveLatentLM(lm, adaptive_warmup=2.5)
    with pytest.raises(ValueError, match='router_init_std'): AdaptiveLatentLM(lm, router_init_std=-1.0)

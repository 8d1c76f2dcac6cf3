"""Exactness of the latent-thought LM against independent references (float64, sdpa, tiny random models)."""
import json, warnings
import pytest
import torch

from latent_thoughts import LatentThoughtLM, jacobi_trace, sequential_hidden
from latent_thoughts.core import MethodLM, build_lm, shifted_ce
from latent_thoughts.latent import stream_positions, default_tol, masked_rmse, JacobiNotConverged

ARCHS = ['gpt_neox', 'llama', 'gpt2']
CASES = [(a, n, m) for a in ARCHS for n in (1, 2) for m in ('reuse', 'sequential')]
# N=1: both first estimates are the plain pass; N=2 runs the authors' growing start and the plain one
CASES_INIT = [(a, n, m, i) for a, n, m in CASES for i in (('grow', 'plain') if n > 1 else ('grow',))]
SHAPE = dict(vocab_size=61, d_model=32, n_layer=2, n_head=4, max_positions=128)


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad(): yield


def lm_of(arch, **kw):
    return build_lm(arch, seed=0, dtype=torch.float64, **{**SHAPE, **kw})


def ids_of(B, T, seed=1):
    return torch.randint(1, SHAPE['vocab_size'], (B, T), generator=torch.Generator().manual_seed(seed))


def model_of(arch, N=1, mode='reuse', **kw):
    return LatentThoughtLM(lm_of(arch), n_thoughts=N, position_mode=mode, **kw).eval()


@pytest.mark.parametrize('arch,N,mode,init', CASES_INIT)
def test_jacobi_equals_sequential(arch, N, mode, init):
    m, ids = model_of(arch, N, mode, thought_init=init), ids_of(2, 7)
    H = sequential_hidden(m, ids, use_cache=False)            # the definition, no cache code
    torch.testing.assert_close(sequential_hidden(m, ids, use_cache=True), H, rtol=0, atol=1e-12)
    ref = m.head(H[:, :, N])
    out = m(ids, jacobi_iters=7 * N)
    assert (out.logits - ref).abs().max() < 1e-9
    assert (m(ids).logits - ref).abs().max() < 1e-9             # eval default: to tolerance
    assert (m(ids, jacobi_iters=1).logits - ref).abs().max() > 1e-6
    tr = jacobi_trace(m, ids, iters=7 * N)
    assert tr['to_sequential'][-1] < 1e-12 and tr['to_sequential'][0] > 1e-4


@pytest.mark.parametrize('arch,N,mode', [('gpt_neox', 1, 'reuse'), ('llama', 2, 'sequential'), ('gpt2', 2, 'reuse')])
def test_per_token_trace(arch, N, mode):
    "per_token: its RMS over real tokens is to_sequential, 0 at padding, a padded row reads as the row alone, the wavefront."
    m, ids = model_of(arch, N, mode), ids_of(3, 7, seed=5)
    mask = torch.ones_like(ids); mask[1, 4:] = 0; mask[2, 2:] = 0
    K = 7 * N
    tr = jacobi_trace(m, ids, iters=K, attention_mask=mask, per_token=True)
    pt = torch.tensor(tr['per_token'], dtype=torch.float64)               # (K+1, B, T)
    assert pt.shape == (K + 1, 3, 7)
    real = mask.bool()
    torch.testing.assert_close(pt[:, real].pow(2).mean(-1).sqrt(), torch.tensor(tr['to_sequential'], dtype=torch.float64),
                               rtol=1e-12, atol=1e-15)
    assert (pt[:, ~real] == 0).all()
    for i, L in enumerate([7, 4, 2]):
        alone = jacobi_trace(m, ids[i:i + 1, :L], iters=K, per_token=True)['per_token']
        torch.testing.assert_close(pt[:, i, :L], torch.tensor(alone, dtype=torch.float64)[:, 0], rtol=1e-7, atol=1e-12)
    assert pt[-1].max() < 1e-12 and pt[0, 0, 1:].min() > 1e-6                   # exact after T·N passes, not before
    if N == 1:   # causality: after pass k the first k+1 tokens are exact, the next one is not yet
        for k in range(6): assert pt[k, 0, :k + 1].max() < 1e-12 < pt[k, 0, k + 1], (k, pt[k, 0])
    assert jacobi_trace(m, ids, iters=2)['per_token'] is None
    with pytest.raises(ValueError, match='reference=True'): jacobi_trace(m, ids, per_token=True, reference=False)


@pytest.mark.parametrize('arch,N,mode,init', CASES_INIT)
def test_residuals_decay(arch, N, mode, init):
    m, ids = model_of(arch, N, mode, thought_init=init), ids_of(2, 10)
    r = jacobi_trace(m, ids, iters=12, reference=False)['residual']
    assert len(r) == 12 and r[0] > 1e-3
    # after the first few passes every pass shrinks the residual (N=2 refines a chain: compare every other pass)
    s = N
    live = [x for x in r if x > 1e-13]
    assert all(b < a for a, b in zip(live[2:], live[2 + s:])), r
    out = m(ids, jacobi_iters=4)
    assert torch.allclose(out.residuals, torch.tensor(r[:4], dtype=torch.float64), rtol=1e-9, atol=1e-15)
    mask, pos = m._prepare(ids, None)
    rms0 = masked_rmse(m._initial(m.embed(ids), pos, mask), 0 * m._initial(m.embed(ids), pos, mask)).item()
    assert out.metrics == {'jacobi_iters': 4.0, 'residual_last': pytest.approx(r[3]), 'residual_rel': pytest.approx(r[3] / rms0)}


@pytest.mark.parametrize('arch', ARCHS)
def test_zero_thoughts_is_plain_hf(arch):
    lm = lm_of(arch)
    m, ids = LatentThoughtLM(lm, n_thoughts=0).eval(), ids_of(2, 9)
    assert torch.equal(m(ids).logits, lm(ids).logits)
    mask = torch.ones_like(ids); mask[1, 6:] = 0
    torch.testing.assert_close(m(ids, attention_mask=mask).logits[1, :6], lm(ids, attention_mask=mask).logits[1, :6], rtol=0, atol=1e-12)
    assert m(ids).residuals.shape == (0,)
    assert torch.equal(m.generate(ids[:1, :4], max_new_tokens=5), VanillaLM_generate(lm, ids[:1, :4], 5))


def VanillaLM_generate(lm, ids, n):
    from latent_thoughts.core import VanillaLM
    return VanillaLM(lm).generate(ids, max_new_tokens=n)


def greedy_reference(m, prompt, n, use_cache=True):
    "Greedy continuation by the definition: the whole stream recomputed, one entry at a time, per token."
    # the cached reference equals the cache-free one (test_jacobi_equals_sequential) and shares no code with prefill/decode
    seq = prompt.clone()
    for _ in range(n):
        nxt = m.head(sequential_hidden(m, seq, use_cache=use_cache)[:, -1, -1]).argmax(-1)
        seq = torch.cat([seq, nxt[:, None]], 1)
    return seq


@pytest.mark.parametrize('arch,N,mode', CASES)
def test_greedy_generate_is_sequential(arch, N, mode):
    m, prompt = model_of(arch, N, mode), ids_of(1, 5)
    assert torch.equal(m.generate(prompt, max_new_tokens=6), greedy_reference(m, prompt, 6))


@pytest.mark.parametrize('arch,N,mode,init', CASES_INIT)
def test_kv_decode_equals_full_recompute(arch, N, mode, init):
    m, ids = model_of(arch, N, mode, thought_init=init), ids_of(2, 9)
    logits, st = m.prefill(ids[:, :4], torch.ones_like(ids[:, :4]))
    for t in range(4, 9):
        full = m(ids[:, :t], jacobi_iters=t * N).logits[:, -1]
        assert (logits - full).abs().max() < 1e-9, t
        logits, st = m.decode(ids[:, t], st)
    assert st['mask'].shape == (2, 9 * (N + 1)) and st['cache'].get_seq_length() == 9 * (N + 1)


@pytest.mark.parametrize('arch,N', [(a, n) for a in ARCHS for n in (1, 2)])
def test_batched_generation_equals_one_by_one(arch, N):
    m = model_of(arch, N, 'sequential' if N == 2 else 'reuse')
    lens = [6, 3, 5]
    ids = ids_of(3, 6, seed=3)
    mask = (torch.arange(6)[None] < torch.tensor(lens)[:, None]).long()       # right-padded prompts
    batched = m.generate(ids * mask, attention_mask=mask, max_new_tokens=5)
    for i, L in enumerate(lens):
        alone = m.generate(ids[i:i + 1, :L], max_new_tokens=5)
        assert torch.equal(batched[i, -5:], alone[0, -5:]), i
    # the logits too, not just the argmax
    lp, _ = m.prefill(*left(ids * mask, mask))
    for i, L in enumerate(lens):
        torch.testing.assert_close(lp[i], m.prefill(ids[i:i + 1, :L], torch.ones(1, L, dtype=torch.long))[0][0], rtol=0, atol=1e-9)


def left(ids, mask):
    from latent_thoughts.core import left_pad
    return left_pad(ids, mask)


@pytest.mark.parametrize('arch,N,mode', CASES)
def test_padded_batch_scores_like_unpadded(arch, N, mode):
    m, ids = model_of(arch, N, mode), ids_of(3, 8, seed=4)
    mask = torch.ones_like(ids); mask[1, 5:] = 0; mask[2, 2:] = 0
    K = 8 * N
    out = m(ids, labels=ids, attention_mask=mask, jacobi_iters=K)
    losses = []
    for i, L in enumerate([8, 5, 2]):
        alone = m(ids[i:i + 1, :L], labels=ids[i:i + 1, :L], jacobi_iters=K)
        assert (out.logits[i, :L] - alone.logits[0]).abs().max() < 1e-10
        losses.append(shifted_ce(alone.logits, ids[i:i + 1, :L], reduction='none'))
    torch.testing.assert_close(out.loss, torch.cat(losses, 1).mean(), rtol=0, atol=1e-12)
    # left padding too (positions count real tokens only)
    lids, lmask = left(ids, mask)
    lo = m(lids, attention_mask=lmask, jacobi_iters=K).logits
    assert (lo[1, 3:] - out.logits[1, :5]).abs().max() < 1e-10
    assert torch.isfinite(lo).all() and torch.isfinite(out.logits).all()


@pytest.mark.parametrize('init,first', [('grow', [5, 10, 15]), ('plain', [5])])
def test_no_waste_passes_and_head(init, first):
    "grow: N passes over 1..N stages, then K+1 over all N+1; plain: one plain pass; the head once, on T entries."
    m, ids = model_of('llama', 3, thought_init=init), ids_of(2, 5)
    calls = []
    hb = m.base.register_forward_hook(lambda mod, a, kw, o: calls.append(('base', kw['inputs_embeds'].shape[1])), with_kwargs=True)
    hh = m.head.register_forward_hook(lambda mod, a, o: calls.append(('head', a[0].shape[1])))
    try: m(ids, jacobi_iters=3)
    finally: hb.remove(); hh.remove()
    assert calls == [('base', n) for n in first] + [('base', 20)] * 4 + [('head', 5)]


def grow_by_hand(m, ids, mask):
    "The authors' initial loop, written out: stages [E, θ^1, ..]; pass k interleaves the k stages, refines them, appends one."
    E = m.lm.get_input_embeddings()(ids) * getattr(m, 'embed_scale', 1.0); B, T, d = E.shape
    p = (mask.cumsum(1) - 1).clamp(min=0)
    stages = [E]
    for _ in range(m.n_thoughts):
        S = len(stages)
        x = torch.stack(stages, 2).reshape(B, T * S, d)
        if m.position_mode == 'reuse': pos = p.repeat_interleave(S, 1)
        else: pos = (p[:, :, None] * (m.n_thoughts + 1) + torch.arange(S)).reshape(B, T * S)
        h = m.lm.base_model(inputs_embeds=x, position_ids=pos, attention_mask=mask.repeat_interleave(S, 1)).last_hidden_state
        stages = [E] + [h[:, j::S] for j in range(S)]
    return torch.stack(stages[1:], 2)


@pytest.mark.parametrize('arch,N,mode', [(a, n, m) for a in ARCHS for n in (2, 3) for m in ('reuse', 'sequential')])
def test_grow_init_is_the_authors_loop(arch, N, mode):
    "thought_init='grow' equals a by-hand loop of the growing passes (real tokens of right-padded rows too)."
    m, ids = model_of(arch, N, mode), ids_of(2, 6)
    assert m.thought_init == 'grow' and m.method_config()['thought_init'] == 'grow'
    mask = torch.ones_like(ids); mask[1, 4:] = 0
    am, pos = m._prepare(ids, mask)
    got, ref = m._initial(m.embed(ids), pos, am), grow_by_hand(m, ids, mask)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1, :4], ref[1, :4], rtol=0, atol=1e-12)
    assert got[1, 4:].abs().max() == 0     # thoughts of padded tokens are held at zero
    # and it is a different start from 'plain', so a fixed K gives different logits
    plain = model_of(arch, N, mode, thought_init='plain')
    assert (plain._initial(plain.embed(ids), pos, am) - got).abs().max() > 1e-4
    assert (plain(ids, jacobi_iters=2).logits - m(ids, jacobi_iters=2).logits).abs().max() > 1e-6


@pytest.mark.parametrize('arch', ARCHS)
def test_one_thought_grow_is_plain(arch):
    ids = ids_of(2, 7)
    g, p = model_of(arch, 1, thought_init='grow'), model_of(arch, 1, thought_init='plain')
    for K in (0, 2):
        assert torch.equal(g(ids, jacobi_iters=K).logits, p(ids, jacobi_iters=K).logits)
    assert torch.equal(g.generate(ids[:1, :4], max_new_tokens=4), p.generate(ids[:1, :4], max_new_tokens=4))


def test_grad_modes():
    with torch.enable_grad():
        lm = lm_of('gpt_neox'); ids = ids_of(2, 6)
        def grads(mode):
            lm.zero_grad()
            out = LatentThoughtLM(lm, grad_mode=mode).train()(ids, labels=ids, jacobi_iters=3)
            out.loss.backward()
            return out.loss.detach(), torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None])
        (la, ga), (ll, gl) = grads('all'), grads('last')
        assert torch.equal(la, ll)
        m = LatentThoughtLM(lm); mask, pos = m._prepare(ids, None); lm.zero_grad()
        with torch.no_grad(): th, _, _ = m._jacobi(m.embed(ids), pos, mask, 3)
        shifted_ce(m.head(m._stream_pass(m.embed(ids), th, pos, mask)[0][:, :, 1]), ids).backward()
        manual = torch.cat([p.grad.flatten() for p in lm.parameters() if p.grad is not None])
        torch.testing.assert_close(gl, manual, rtol=0, atol=1e-12)
        assert (ga - gl).abs().max() > 1e-6
        # 'all': a finite difference along a random direction matches the gradient
        lm.zero_grad()
        m = LatentThoughtLM(lm, grad_mode='all')
        m(ids, labels=ids, jacobi_iters=2).loss.backward()
        ps = [p for p in lm.parameters()]
        d = [torch.randn_like(p, generator=None) for p in ps]
        gd = sum((p.grad * v).sum() for p, v in zip(ps, d) if p.grad is not None)
        eps = 1e-6
        with torch.no_grad():
            for p, v in zip(ps, d): p.add_(eps * v)
            up = m(ids, labels=ids, jacobi_iters=2).loss
            for p, v in zip(ps, d): p.sub_(2 * eps * v)
            dn = m(ids, labels=ids, jacobi_iters=2).loss
            for p, v in zip(ps, d): p.add_(eps * v)
        assert abs((up - dn) / (2 * eps) - gd) < 1e-6 * max(1.0, abs(gd))


def test_train_iters_sampling_and_eval_default():
    m = model_of('gpt_neox', train_iters=[2, 3]).train()
    ids = ids_of(1, 6)
    torch.manual_seed(0)
    ks = {m(ids).metrics['jacobi_iters'] for _ in range(30)}
    assert ks == {2.0, 3.0}
    assert model_of('gpt_neox', train_iters=4).train()(ids).metrics['jacobi_iters'] == 4.0
    m.eval()
    out = m(ids)       # 'tol': stops once below tolerance, never beyond T·N passes
    assert 1 <= out.metrics['jacobi_iters'] <= 6 and out.metrics['residual_last'] < 1e-9
    assert model_of('gpt_neox', eval_iters=3)(ids).metrics['jacobi_iters'] == 3.0


def test_stream_positions():
    m = torch.tensor([[0, 1, 1], [1, 1, 0]])
    assert stream_positions(m, 1, 'sequential').tolist() == [[[0, 1], [0, 1], [2, 3]], [[0, 1], [2, 3], [2, 3]]]
    assert stream_positions(m, 2, 'reuse')[1].tolist() == [[0, 0, 0], [1, 1, 1], [1, 1, 1]]


def test_save_load_round_trip(tmp_path):
    m, ids = model_of('gpt2', 2, 'sequential', train_iters=[2, 3], eval_iters=5, prefill_tol=1e-10, thought_init='plain'), ids_of(2, 6)
    m.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / 'latent_config.json').read_text())
    assert cfg['method'] == 'latent' and cfg['n_thoughts'] == 2 and cfg['train_iters'] == [2, 3] and cfg['thought_init'] == 'plain'
    for cls in (MethodLM, LatentThoughtLM):
        back = cls.from_pretrained(tmp_path).double().eval()
        assert type(back) is LatentThoughtLM and back.method_config() == m.method_config()
        assert torch.equal(back(ids).logits, m(ids).logits)
    assert LatentThoughtLM.from_pretrained(tmp_path, n_thoughts=1).n_thoughts == 1
    # continual pretraining from plain HF weights, fresh pretraining from a config
    m.lm.save_pretrained(tmp_path / 'hf')
    cpt = LatentThoughtLM.from_base(tmp_path / 'hf', n_thoughts=1)
    assert torch.equal(cpt.lm.lm_head.weight, m.lm.lm_head.weight)
    assert LatentThoughtLM.from_config(m.lm.config, n_thoughts=3).n_thoughts == 3


def test_bad_input():
    lm = lm_of('gpt_neox')
    ids = ids_of(2, 6)
    with pytest.raises(ValueError, match='n_thoughts'): LatentThoughtLM(lm, n_thoughts=-1)
    with pytest.raises(ValueError, match='position_mode'): LatentThoughtLM(lm, position_mode='shared')
    with pytest.raises(ValueError, match='grad_mode'): LatentThoughtLM(lm, grad_mode='none')
    with pytest.raises(ValueError, match="thought_init.*'grow'"): LatentThoughtLM(lm, thought_init='copy')
    with pytest.raises(ValueError, match='train_iters'): LatentThoughtLM(lm, train_iters=[2, -1])
    with pytest.raises(ValueError, match='eval_iters'): LatentThoughtLM(lm, eval_iters='auto')
    with pytest.raises(TypeError, match='causal LM'): LatentThoughtLM(torch.nn.Linear(2, 2))
    m = LatentThoughtLM(lm).eval()
    with pytest.raises(ValueError, match='does not match'): m(ids, attention_mask=torch.ones(2, 5))
    with pytest.raises(ValueError, match='does not match'): m.generate(ids, attention_mask=torch.ones(1, 6))
    with pytest.raises(ValueError, match='does not match'): sequential_hidden(m, ids, torch.ones(2, 7))
    with pytest.raises(ValueError, match='jacobi_iters'): m(ids, jacobi_iters=-2)
    with pytest.raises(ValueError, match='n_thoughts >= 1'): jacobi_trace(LatentThoughtLM(lm, n_thoughts=0), ids)
    gpt2 = lm_of('gpt2', max_positions=8)
    LatentThoughtLM(gpt2).eval()(ids)                                        # reuse: 6 positions fit in 8
    with pytest.raises(ValueError, match="out of range.*'reuse'"):
        LatentThoughtLM(gpt2, position_mode='sequential')(ids)
    with pytest.raises(ValueError, match='out of range'):
        LatentThoughtLM(gpt2).generate(ids, max_new_tokens=4)
    LatentThoughtLM(gpt2).generate(ids, max_new_tokens=3)                   # positions 0..7 fit exactly


def test_float32_and_sampling_smoke():
    lm = build_lm('llama', seed=0, **SHAPE)
    m = LatentThoughtLM(lm, n_thoughts=1).eval()
    ids = ids_of(2, 12)
    out = m(ids, labels=ids)
    assert torch.isfinite(out.loss) and out.residuals[-1] < default_tol(torch.float32)
    g = torch.Generator().manual_seed(0)
    a = m.generate(ids, max_new_tokens=4, do_sample=True, top_k=5, generator=g)
    b = m.generate(ids, max_new_tokens=4, do_sample=True, top_k=5, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == (2, 16)


@pytest.mark.slow
@pytest.mark.parametrize('arch,N,mode', [(a, n, m) for a in ARCHS for n in (1, 3) for m in ('reuse', 'sequential')])
def test_longer_sequences_slow(arch, N, mode):
    m, ids = model_of(arch, N, mode), ids_of(2, 24, seed=7)
    mask = torch.ones_like(ids); mask[1, 17:] = 0
    H = sequential_hidden(m, ids, mask)
    out = m(ids, attention_mask=mask, jacobi_iters=24 * N)
    assert (out.logits[0] - m.head(H[0, :, N])).abs().max() < 1e-9
    assert (out.logits[1, :17] - m.head(H[1, :17, N])).abs().max() < 1e-9
    assert torch.equal(m.generate(ids[:1, :8], max_new_tokens=8), greedy_reference(m, ids[:1, :8], 8, use_cache=False))


def test_tolerance_cap_warns_and_records():
    "A run to tolerance that stops at prefill_max_iters says so: metrics, prefill state, one warning per call site."
    ids = ids_of(2, 8)
    ok = model_of('gpt_neox', 2)                       # cap 64 >= T·N = 16: always converges
    with warnings.catch_warnings():
        warnings.simplefilter('error', JacobiNotConverged)
        out = ok(ids)
        assert out.metrics['jacobi_converged'] == 1.0 and out.metrics['residual_rel'] < default_tol(torch.float64)
        assert ok.prefill(ids, torch.ones_like(ids))[1]['jacobi_converged'] is True
        assert 'jacobi_converged' not in ok(ids, jacobi_iters=3).metrics     # a fixed K has no tolerance to meet
    capped = model_of('gpt_neox', 2, prefill_max_iters=2)
    with pytest.warns(JacobiNotConverged, match='Raise prefill_max_iters'):
        out = capped(ids)
    assert out.metrics['jacobi_iters'] == 2.0 and out.metrics['jacobi_converged'] == 0.0
    tol = default_tol(torch.float64)
    assert out.metrics['residual_rel'] > tol and out.metrics['residual_rel'] == pytest.approx(ok(ids, jacobi_iters=2).metrics['residual_rel'])
    with pytest.warns(JacobiNotConverged):
        _, st = capped.prefill(ids, torch.ones_like(ids))
    assert st['jacobi_converged'] is False and st['residual_rel'] > tol
    # Python's default filter: once per call site of the user's code (the warning points here, not into the library)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('default')
        for _ in range(3): capped(ids)
        capped(ids)
    assert len(w) == 2 and all(x.filename == __file__ for x in w), [(x.filename, x.lineno) for x in w]


@pytest.mark.parametrize('arch', ARCHS)
def test_embed_scale_scales_tokens_not_thoughts(arch):
    "With embed_scale the stream's token entries are scaled embeddings; thoughts are the raw hidden states (by hand)."
    m, ids = model_of(arch, 2), ids_of(2, 5)
    m.embed_scale = 2.0
    E2 = 2.0 * m.lm.get_input_embeddings()(ids)
    T, base = ids.size(1), m.lm.base_model
    h0 = base(inputs_embeds=E2).last_hidden_state                                   # plain pass on scaled tokens
    grow1 = torch.stack([E2, h0], 2).reshape(2, 2 * T, -1)                            # e(x_1), θ_1^1, e(x_2), …
    seen = []
    hook = base.register_forward_hook(lambda mod, a, kw, o: seen.append((kw['inputs_embeds'].clone(), o.last_hidden_state)),
                                      with_kwargs=True)
    try: m(ids, jacobi_iters=1)
    finally: hook.remove()
    assert len(seen) == 4                                                             # plain, growing, 1 Jacobi, loss pass
    torch.testing.assert_close(seen[0][0], E2, rtol=0, atol=0)
    torch.testing.assert_close(seen[1][0], grow1, rtol=0, atol=1e-12)
    H1 = seen[1][1].view(2, T, 2, -1)
    jac = torch.stack([E2, H1[:, :, 0], H1[:, :, 1]], 2).reshape(2, 3 * T, -1)        # tokens scaled, thoughts as computed
    torch.testing.assert_close(seen[2][0], jac, rtol=0, atol=1e-12)
    # decoding: the new token enters scaled, its thoughts are the raw outputs fed back
    _, st = m.prefill(ids[:, :4], torch.ones_like(ids[:, :4]))
    seen.clear()
    hook = base.register_forward_hook(lambda mod, a, kw, o: seen.append((kw['inputs_embeds'].clone(), o.last_hidden_state)),
                                      with_kwargs=True)
    try: m.decode(ids[:, 4], st)
    finally: hook.remove()
    torch.testing.assert_close(seen[0][0][:, 0], E2[:, 4], rtol=0, atol=0)
    for a, b in zip(seen, seen[1:]): torch.testing.assert_close(b[0], a[1], rtol=0, atol=0)
    # and the scale matters: the logits differ from the unscaled model's, and Jacobi still equals the definition
    H = sequential_hidden(m, ids, use_cache=False)
    assert (m(ids, jacobi_iters=10).logits - m.head(H[:, :, 2])).abs().max() < 1e-9
    m.embed_scale = 1.0
    assert (m(ids, jacobi_iters=10).logits - m.head(H[:, :, 2])).abs().max() > 1e-6

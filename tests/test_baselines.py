"""Baselines (pause, looped, pondering): vanilla at zero extra steps, KV-cache = full recompute,
batched = one-by-one, padding, checkpoints, training, on every architecture, in float64."""
import tempfile
from pathlib import Path
import pytest
import torch
from latent_thoughts.core import build_lm, VanillaLM, MethodLM, METHODS
from latent_thoughts.baselines import PauseLM, LoopedLM, PonderingLM, double_params_model

ARCHS = ('gpt_neox', 'llama', 'gpt2')
V = 61

def tiny(arch, dtype=torch.float64, seed=0):
    return build_lm(arch, seed=seed, vocab_size=V, d_model=32, n_layer=2, n_head=4, max_positions=128,
                    attn_implementation='sdpa', dtype=dtype)

def variants(arch):
    return [PauseLM(tiny(arch), n_pause=2), PauseLM(tiny(arch), n_pause=2, position_mode='sequential', distinct_pauses=True),
            LoopedLM(tiny(arch), n_loops=3), LoopedLM(tiny(arch), n_loops=2, feedback='post_norm'),
            PonderingLM(tiny(arch), n_ponder=2), PonderingLM(tiny(arch), n_ponder=2, accumulate=False, scale_by_steps=True)]

def greedy_recompute(m, ids, n):
    for _ in range(n): ids = torch.cat([ids, m(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids

def test_registered():
    assert {'pause', 'looped', 'pondering', 'vanilla'} <= set(METHODS)

@pytest.mark.parametrize('arch', ARCHS)
def test_zero_extra_steps_is_vanilla(arch):
    lm = tiny(arch).eval()   # GPT-2 has dropout
    ids = torch.randint(0, V, (3, 9))
    am = torch.ones_like(ids); am[1, 6:] = 0
    ref = lm(ids).logits
    van = VanillaLM(lm).eval()
    for m in (PauseLM(lm, n_pause=0), PauseLM(lm, n_pause=0, position_mode='sequential', distinct_pauses=True), LoopedLM(lm, n_loops=1),
              LoopedLM(lm, n_loops=1, feedback='post_norm'), PonderingLM(lm, n_ponder=0), PonderingLM(lm, n_ponder=0, scale_by_steps=True)):
        m.eval()
        with torch.no_grad():
            assert (m(ids).logits - ref).abs().max() < 1e-10
            assert (m(ids, attention_mask=am).logits - van(ids, attention_mask=am).logits).abs().max() < 1e-10
            assert abs(m(ids, labels=ids).loss - van(ids, labels=ids).loss) < 1e-10
            assert torch.equal(m.generate(ids[:1], max_new_tokens=4), van.generate(ids[:1], max_new_tokens=4))

@pytest.mark.parametrize('arch', ARCHS)
def test_extra_steps_change_the_model(arch):
    ids = torch.randint(0, V, (2, 7))
    ref = tiny(arch).eval()(ids).logits
    for m in variants(arch):
        with torch.no_grad(): assert (m.eval()(ids).logits - ref).abs().max() > 1e-3, m.method

@pytest.mark.parametrize('arch', ARCHS)
def test_generation_cache_batching_padding(arch):
    torch.manual_seed(1)
    ids = torch.randint(1, V, (3, 7))
    am = torch.ones_like(ids); am[1, 4:] = 0; am[2, 2:] = 0
    for m in variants(arch):
        m.eval()
        with torch.no_grad():
            n = 6
            # KV-cached greedy == full recomputation
            assert torch.equal(m.generate(ids, max_new_tokens=n), greedy_recompute(m, ids, n)), m.method
            # batched with different prompt lengths (right padding, moved left inside) == one by one
            gen = m.generate(ids, am, max_new_tokens=n)
            for i, L in enumerate(am.sum(1).tolist()):
                alone = m.generate(ids[i:i + 1, :L], max_new_tokens=n)
                assert torch.equal(gen[i, -n:], alone[0, -n:]), (m.method, i)
            # left-padded prompts give the same as right-padded ones
            lp = torch.zeros_like(ids); lam = torch.zeros_like(am)
            for i, L in enumerate(am.sum(1).tolist()): lp[i, -L:] = ids[i, :L]; lam[i, -L:] = 1
            assert torch.equal(m.generate(lp, lam, max_new_tokens=n)[:, -n:], gen[:, -n:])
            # padded rows score like unpadded rows
            s = m.score(ids, am)
            for i, L in enumerate(am.sum(1).tolist()):
                assert (s[i, :L - 1] - m.score(ids[i:i + 1, :L])[0]).abs().max() < 1e-10
                assert (m(ids, attention_mask=am).logits[i, :L] - m(ids[i:i + 1, :L]).logits[0]).abs().max() < 1e-10

def test_sampling_with_cache_matches_recompute():
    m = PonderingLM(tiny('llama'), n_ponder=1).eval()
    ids = torch.randint(1, V, (2, 5))
    g1 = m.generate(ids, max_new_tokens=5, do_sample=True, generator=torch.Generator().manual_seed(3))
    # the same sampler driven by full recomputation
    g = torch.Generator().manual_seed(3); seq = ids
    from latent_thoughts.core import sample_next
    with torch.no_grad():
        for _ in range(5): seq = torch.cat([seq, sample_next(m(seq).logits[:, -1], True, generator=g)[:, None]], 1)
    assert torch.equal(g1, seq)

@pytest.mark.parametrize('cls,args', [(PauseLM, dict(n_pause=2, position_mode='sequential', distinct_pauses=False)),
                                      (PauseLM, dict(n_pause=3, position_mode='reuse', distinct_pauses=True)),
                                      (LoopedLM, dict(n_loops=2, feedback='residual')), (LoopedLM, dict(n_loops=3, feedback='post_norm')),
                                      (PonderingLM, dict(n_ponder=3, accumulate=True, scale_by_steps=False)),
                                      (PonderingLM, dict(n_ponder=2, accumulate=False, scale_by_steps=True))])
def test_checkpoint_round_trip(cls, args, tmp_path):
    m = cls(tiny('gpt2'), **args).eval()
    assert m.method_config() == args
    m.save_pretrained(tmp_path)
    m2 = MethodLM.from_pretrained(tmp_path).eval()
    assert type(m2) is cls and m2.method_config() == args
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad(): assert (m2(ids).logits.double() - m(ids).logits).abs().max() < 1e-5
    with pytest.raises(TypeError, match='not a'):
        (LoopedLM if cls is not LoopedLM else PauseLM).from_pretrained(tmp_path)

def test_bad_input():
    lm = tiny('llama')
    for f, msg in [(lambda: PauseLM(lm, n_pause=-1), 'n_pause'), (lambda: PauseLM(lm, n_pause=True), 'integer'),
                   (lambda: PauseLM(lm, position_mode='x'), 'position_mode'), (lambda: LoopedLM(lm, n_loops=0), 'n_loops'),
                   (lambda: PonderingLM(lm, n_ponder=-2), 'n_ponder'), (lambda: PauseLM(lm, distinct_pauses='yes'), 'distinct_pauses'),
                   (lambda: LoopedLM(lm, feedback='pre_norm'), 'feedback'), (lambda: PonderingLM(lm, accumulate=None), 'accumulate'),
                   (lambda: PonderingLM(lm, scale_by_steps=1), 'scale_by_steps')]:
        with pytest.raises(ValueError, match=msg): f()
    with pytest.raises(TypeError, match='causal LM'): LoopedLM(torch.nn.Linear(2, 2))
    ids = torch.randint(0, V, (2, 6))
    for m in (PauseLM(lm), LoopedLM(lm), PonderingLM(lm)):
        with pytest.raises(ValueError, match='does not match'): m(ids, attention_mask=torch.ones(2, 5))
    g = build_lm('gpt2', vocab_size=V, d_model=32, n_layer=1, n_head=4, max_positions=20)
    with pytest.raises(ValueError, match="position_mode='reuse'"): PauseLM(g, n_pause=2, position_mode='sequential')(torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(ValueError, match='no 2x-parameter pair'): double_params_model('tiny')

def _train(m, steps=12, lr=3e-3):
    torch.manual_seed(0)
    batch = torch.randint(1, V, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = m(batch, labels=batch).loss
        opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
    return losses

@pytest.mark.parametrize('cls,args', [(PauseLM, dict(n_pause=1)), (PauseLM, dict(n_pause=2, position_mode='sequential')),
                                      (PauseLM, dict(n_pause=2, distinct_pauses=True)), (LoopedLM, dict(n_loops=2)),
                                      (LoopedLM, dict(n_loops=2, feedback='post_norm')), (PonderingLM, dict(n_ponder=1)),
                                      (PonderingLM, dict(n_ponder=2, accumulate=False, scale_by_steps=True))])
def test_adamw_loss_decreases(cls, args):
    m = cls(tiny('gpt_neox', dtype=torch.float32), **args)
    before = {k: v.detach().clone() for k, v in m.named_parameters()}
    losses = _train(m)
    assert losses[-1] < losses[0] - 0.2, losses
    assert all(not torch.equal(before[k], v) for k, v in m.named_parameters() if v.requires_grad), 'a parameter got no update'

def test_trainer_runs_every_baseline(tmp_path):
    tr = pytest.importorskip('latent_thoughts.trainer')
    from latent_thoughts.config import Config, ModelConfig, DataConfig, TrainConfig
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(1, 4, (48, 1), generator=g), torch.randint(0, 64, (48, 1), generator=g)
    blocks = (a * torch.arange(32) + b) % 64
    for method, args in [('pause', dict(n_pause=1)), ('looped', dict(n_loops=2)), ('pondering', dict(n_ponder=1)), ('vanilla', {})]:
        cfg = Config(ModelConfig(preset='micro', d_model=32, n_layer=1, n_head=2, vocab_size=64, max_positions=64,
                                 method=method, method_args=args),
                     DataConfig(block_size=32, batch_size=8, eval_batch_size=16),
                     TrainConfig(steps=12, lr=1e-2, warmup=2, min_lr=1e-3, out_dir=str(tmp_path/method), progress=False,
                                 mixed_precision='no'))
        t = tr.Trainer(cfg, train_blocks=blocks, val_blocks=blocks[:16])
        s = t.fit()
        losses = [r['loss'] for r in t.history]
        assert losses[-1] < losses[0], (method, losses)
        assert t.flops_per_token and t.history[-1]['flops'] > 0, method
        m = MethodLM.from_pretrained(Path(s['checkpoint'])/'model')
        assert m.method == method and m.method_config() == t.model.method_config()

# -- each baseline against a short by-hand definition (float64), written with the plain HF model only

def pause_by_hand(lm, ids, p, reuse=True):
    "[e(x_t), p_1 .. p_M] for every token, one plain HF call, logits at each token's last pause."
    E, (B, T), M = lm.get_input_embeddings(), ids.shape, p.size(0)
    rows = []
    for t in range(T): rows += [E(ids[:, t])] + [p[i].expand(B, -1) for i in range(M)]
    pos = torch.arange(T).repeat_interleave(M + 1) if reuse else torch.arange(T * (M + 1))
    out = lm(inputs_embeds=torch.stack(rows, 1), position_ids=pos[None].expand(B, -1),
             attention_mask=torch.ones(B, T * (M + 1), dtype=torch.long)).logits
    return out[:, M::M + 1]

@pytest.mark.parametrize('arch', ARCHS)
def test_pause_by_hand(arch):
    lm = tiny(arch).eval()
    ids = torch.randint(0, V, (2, 6))
    shared, distinct = PauseLM(lm, n_pause=3).eval(), PauseLM(lm, n_pause=3, distinct_pauses=True).eval()
    assert shared.pause_embeds.shape == (1, 32) and distinct.pause_embeds.shape == (3, 32)
    seq = PauseLM(lm, n_pause=2, position_mode='sequential').eval()
    with torch.no_grad():
        assert (shared(ids).logits - pause_by_hand(lm, ids, shared.pause_embeds[0].expand(3, -1))).abs().max() < 1e-10
        assert (distinct(ids).logits - pause_by_hand(lm, ids, distinct.pause_embeds)).abs().max() < 1e-10
        assert (seq(ids).logits - pause_by_hand(lm, ids, seq.pause_embeds[0].expand(2, -1), reuse=False)).abs().max() < 1e-10

def test_one_pause_vector_is_tied_across_slots():
    # the shared vector is the distinct model with all M vectors equal: same loss, and its gradient is the sum over slots
    lm = tiny('llama')
    ids = torch.randint(0, V, (2, 6))
    one, many = PauseLM(lm, n_pause=3), PauseLM(lm, n_pause=3, distinct_pauses=True)
    with torch.no_grad(): many.pause_embeds.copy_(one.pause_embeds.expand(3, -1))
    l1, l3 = one(ids, labels=ids).loss, many(ids, labels=ids).loss
    assert abs(l1 - l3) < 1e-12
    g1, = torch.autograd.grad(l1, one.pause_embeds)
    g3, = torch.autograd.grad(l3, many.pause_embeds)
    assert (g1[0] - g3.sum(0)).abs().max() < 1e-12 and (g3[0] - g3[1]).abs().max() > 1e-8

def test_pause_checkpoint_with_other_pause_layout(tmp_path):
    m = PauseLM(tiny('gpt_neox'), n_pause=2, distinct_pauses=True)
    m.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match='distinct_pauses=True'): MethodLM.from_pretrained(tmp_path, distinct_pauses=False)
    assert MethodLM.from_pretrained(tmp_path).pause_embeds.shape == (2, 32)

def unrolled(lm, n):
    "The plain HF model with its L layers repeated n times (Saunshi et al.'s looped model written out)."
    import copy, re
    from transformers import AutoModelForCausalLM
    L = lm.config.num_hidden_layers
    cfg = copy.deepcopy(lm.config); cfg.num_hidden_layers = L * n
    deep = AutoModelForCausalLM.from_config(cfg).to(lm.dtype)
    sd = {}
    for k, v in lm.state_dict().items():
        g = re.search(r'\.(layers|h)\.(\d+)\.', k)
        for r in (range(n) if g else [None]):
            sd[k if g is None else k.replace(g.group(0), f'.{g.group(1)}.{int(g.group(2)) + r * L}.')] = v
    deep.load_state_dict(sd)
    return deep.eval()

@pytest.mark.parametrize('arch', ARCHS)
def test_looped_by_hand(arch):
    lm = tiny(arch).eval()
    ids = torch.randint(0, V, (3, 7))
    am = torch.ones_like(ids); am[1, 5:] = 0
    pos = (am.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        for n in (2, 3):
            deep = unrolled(lm, n)
            m = LoopedLM(lm, n_loops=n).eval()
            assert (m(ids).logits - deep(ids).logits).abs().max() < 1e-10
            ref = deep(ids, attention_mask=am, position_ids=pos).logits
            assert ((m(ids, attention_mask=am).logits - ref) * am[..., None]).abs().max() < 1e-10
        # the 'post_norm' option: the HF base model applied n times to its own normed output
        h = lm.get_input_embeddings()(ids)
        for _ in range(3): h = lm.base_model(inputs_embeds=h, attention_mask=torch.ones_like(ids)).last_hidden_state
        post = LoopedLM(lm, n_loops=3, feedback='post_norm').eval()(ids).logits
        assert (post - lm.get_output_embeddings()(h)).abs().max() < 1e-10
        assert (post - LoopedLM(lm, n_loops=3).eval()(ids).logits).abs().max() > 1e-3

def test_looped_stand_ins_do_not_outlive_a_loop():
    lm = tiny('gpt2', seed=1)
    m = LoopedLM(lm, n_loops=3)
    kinds = lambda: [type(mod).__name__ for mod in (lm.transformer.ln_f, lm.transformer.wpe, lm.transformer.drop)]
    m(torch.randint(0, V, (1, 5)), labels=torch.randint(0, V, (1, 5))).loss.backward()
    m.eval().generate(torch.randint(0, V, (1, 4)), max_new_tokens=3)
    assert kinds() == ['LayerNorm', 'Embedding', 'Dropout']
    assert set(dict(lm.named_parameters())) == set(dict(tiny('gpt2').named_parameters()))
    with pytest.raises(Exception): m(torch.randint(0, V, (1, 200)))   # past GPT-2's 128 positions, inside a loop
    assert kinds() == ['LayerNorm', 'Embedding', 'Dropout']

def test_looped_under_torch_compile():
    # a compiled base model must not replay one loop's graph for another (forward hooks did: dynamo does not guard them;
    # GPT-2 is the case that showed it, its three swapped modules all differ between loops)
    lm = tiny('gpt2').eval()
    ids = torch.randint(0, V, (2, 5))
    m = LoopedLM(lm, n_loops=3).eval()
    with torch.no_grad():
        ref = m(ids).logits
        from torch._dynamo.utils import counters
        counters.clear()
        lm.base_model.compile(backend='eager')   # dynamo's tracing and guards, no code generation (fast, CPU-only machines)
        try:
            for _ in range(3): assert (m(ids).logits - ref).abs().max() < 1e-10
            assert counters['stats']['unique_graphs'] == 3   # one graph per kind of loop (first, middle, last), not one per call
        finally: torch._dynamo.reset()

def ponder_by_hand(lm, ids, P, accumulate=True, scale_by_steps=False, s=1.0):
    "P plain HF passes, each adding softmax(logits) @ (s·W_E) to the running input (or to the start), then the final pass."
    W = lm.get_input_embeddings().weight * s
    x0 = lm.get_input_embeddings()(ids) * s * (P if scale_by_steps else 1)
    x = x0
    for _ in range(P):
        x = (x if accumulate else x0) + lm(inputs_embeds=x, attention_mask=torch.ones_like(ids)).logits.softmax(-1) @ W
    return lm(inputs_embeds=x, attention_mask=torch.ones_like(ids)).logits

@pytest.mark.parametrize('arch', ARCHS)
def test_pondering_by_hand(arch):
    lm = tiny(arch).eval()
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        for acc in (True, False):
            for sbs in (False, True):
                m = PonderingLM(lm, n_ponder=3, accumulate=acc, scale_by_steps=sbs).eval()
                assert (m(ids).logits - ponder_by_hand(lm, ids, 3, acc, sbs)).abs().max() < 1e-10, (acc, sbs)
        assert (PonderingLM(lm, n_ponder=2).eval()(ids).logits - ponder_by_hand(lm, ids, 2, False)).abs().max() > 1e-6
    assert PonderingLM.interpolates_embeddings and not any(getattr(c, 'interpolates_embeddings', False) for c in (PauseLM, LoopedLM))

def test_embedding_scale_reaches_every_baseline_input():
    # e(x), the pause vector and the interpolated pondering embedding are all scaled like token embeddings
    lm = tiny('gpt_neox').eval()
    probe = PonderingLM(lm)
    if not hasattr(probe, 'embed_scale'): pytest.skip('MethodLM.embed_scale not in core yet')
    ids = torch.randint(0, V, (2, 6))
    with torch.no_grad():
        m = PonderingLM(lm, n_ponder=2).eval(); m.embed_scale = 3.0
        assert (m(ids).logits - ponder_by_hand(lm, ids, 2, s=3.0)).abs().max() < 1e-10
        p = PauseLM(lm, n_pause=2).eval(); p.embed_scale = 3.0
        E = lm.get_input_embeddings()
        class Scaled(torch.nn.Module):   # the HF model with its token embeddings times 3
            def __init__(s): super().__init__(); s.lm = lm
            def __call__(s, inputs_embeds, **kw): return lm(inputs_embeds=inputs_embeds, **kw)
            def get_input_embeddings(s): return lambda t: 3.0 * E(t)
        assert (p(ids).logits - pause_by_hand(Scaled(), ids, 3.0 * p.pause_embeds[0].expand(2, -1))).abs().max() < 1e-10
        lp = LoopedLM(lm, n_loops=2).eval(); lp.embed_scale = 3.0
        assert (lp(ids).logits - unrolled(lm, 2)(inputs_embeds=3.0 * E(ids)).logits).abs().max() < 1e-10

def test_authors_recipe_per_baseline():
    "embed_scale='authors' follows each of the authors' files: √d for pause and pondering, √(2.5·d) for the loop; N+1 per method."
    import math
    from latent_thoughts.config import ModelConfig, build_model, init_streams
    d = 64
    build = lambda method, **a: build_model(ModelConfig(d_model=d, n_layer=2, n_head=4, method=method, method_args=a), seed=0)
    pa, po, lo = build('pause', n_pause=2), build('pondering', n_ponder=2), build('looped', n_loops=3)
    assert (pa.embed_scale, po.embed_scale) == (pytest.approx(math.sqrt(d)), pytest.approx(math.sqrt(d)))
    assert lo.embed_scale == pytest.approx(math.sqrt(2.5 * d))
    assert (init_streams(pa), init_streams(po), init_streams(lo)) == (1, 3, 3)
    s = math.sqrt(2 / (5 * d))   # the pause vector is drawn like W_E (truncated normal), not with HF's 0.02
    assert pa.pause_embeds.std().item() == pytest.approx(0.9866 * s, rel=0.25) and pa.pause_embeds.abs().max() <= 3 * s
    w = po.lm.gpt_neox.layers[0].mlp.dense_4h_to_h.weight   # PonderingLM's √(2L(P+1)) = √12
    assert w.std().item() == pytest.approx(0.9866 * s / math.sqrt(12), rel=0.1)

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
    return [PauseLM(tiny(arch), n_pause=2), PauseLM(tiny(arch), n_pause=1, position_mode='sequential'),
            LoopedLM(tiny(arch), n_loops=3), PonderingLM(tiny(arch), n_ponder=2)]

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
    for m in (PauseLM(lm, n_pause=0), PauseLM(lm, n_pause=0, position_mode='sequential'), LoopedLM(lm, n_loops=1), PonderingLM(lm, n_ponder=0)):
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

@pytest.mark.parametrize('cls,args', [(PauseLM, dict(n_pause=2, position_mode='sequential')), (LoopedLM, dict(n_loops=2)),
                                      (PonderingLM, dict(n_ponder=3))])
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
                   (lambda: PonderingLM(lm, n_ponder=-2), 'n_ponder')]:
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
                                      (LoopedLM, dict(n_loops=2)), (PonderingLM, dict(n_ponder=1))])
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

"""The FLOPs ledger: Table 3 and 3 + 2K, the detailed count against torch's FLOP counter for every
method (latent and adaptive included when importable), the trainer hook and the CLI."""
import json
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from latent_thoughts.core import build_lm, VanillaLM, PRESETS, hf_config, preset_shape
from latent_thoughts.baselines import PauseLM, LoopedLM, PonderingLM
from latent_thoughts.flops import flops_per_token, train_flops_per_token, model_counts, cli, LEDGER

def test_table3_paper_ratios():
    P = 'llama-1.4b'
    two = [('latent', dict(n_thoughts=1)), ('looped', dict(n_loops=2)), ('pause', dict(n_pause=1)), ('pondering', dict(n_ponder=1))]
    four = [('looped', dict(n_loops=4)), ('pause', dict(n_pause=3)), ('pondering', dict(n_ponder=3))]
    for m, a in two: assert flops_per_token(m, P, **a)['paper_inference_ratio'] == 2
    for m, a in four: assert flops_per_token(m, P, **a)['paper_inference_ratio'] == 4
    for m, a in two + four:   # the detailed count stays near the paper's number at 2048 tokens
        r = flops_per_token(m, P, **a)
        assert abs(r['inference_ratio'] / r['paper_inference_ratio'] - 1) < 0.2, (m, a, r)
    assert flops_per_token('latent', P, n_thoughts=1, train_iters=[2, 3])['paper_training_ratio'] == 8
    for K in range(6): assert flops_per_token('latent', P, train_iters=K)['paper_training_ratio'] == 3 + 2 * K
    # chains: the first estimate is N growing passes over 1..N stages ('grow', the default) or one plain pass
    for N, K in [(2, 2), (3, 3), (4, 2)]:
        grow = flops_per_token('latent', P, n_thoughts=N, train_iters=K)['paper_training_ratio']
        plain = flops_per_token('latent', P, n_thoughts=N, train_iters=K, thought_init='plain')['paper_training_ratio']
        assert (grow, plain) == (sum(range(1, N + 1)) + (N + 1) * K + N + 1, 1 + (N + 1) * K + N + 1)
    for m, a in four: assert flops_per_token(m, P, **a)['paper_training_ratio'] == 4

def _llama_shape(preset='llama-1.4b'):
    cfg = hf_config(**preset_shape(preset))
    assert cfg.num_key_value_heads == cfg.num_attention_heads and not cfg.tie_word_embeddings   # what the arithmetic assumes
    return cfg.hidden_size, cfg.num_hidden_layers, cfg.vocab_size, cfg.intermediate_size

def test_hand_count_vanilla_llama():
    # independent arithmetic for LLaMA-1.4B: q,k,v,o + SwiGLU MLP, causal attention over 2048 tokens, LM head
    (d, L, V, ff), T = _llama_shape(), 2048
    per_layer = 2 * (4 * d * d + 3 * d * ff) + 4 * d * (T + 1) / 2
    want = L * per_layer + 2 * d * V
    r = flops_per_token('vanilla', 'llama-1.4b', seq_len=T)
    assert r['inference_flops_per_token'] == pytest.approx(want, rel=1e-12)
    assert r['training_flops_per_token'] == pytest.approx(3 * want, rel=1e-12)
    assert r['params'] == L * (4 * d * d + 3 * d * ff + 2 * d) + d + 2 * V * d   # + RMSNorms, untied embeddings
    # the 6N rule of thumb (N = non-embedding params) plus attention (~8%) and the LM head (~5%)
    assert 1.1 < r['training_flops_per_token'] / (6 * r['params_non_embedding']) < 1.2

def test_double_params_oracle():
    for small, big in [('llama-1.4b', 'llama-2.8b'), ('pythia-1.4b', 'pythia-2.8b')]:
        a, b = flops_per_token('vanilla', small), flops_per_token('vanilla', big)
        assert 1.7 < b['inference_flops_per_token'] / a['inference_flops_per_token'] < 2.3

def _counted(model, ids, train):
    with FlopCounterMode(display=False) as fc:
        out = model(ids, labels=ids if train else None)
        if train: out.loss.backward()
    return fc.get_total_flops() / ids.numel()

def _models(lm):
    ms = [VanillaLM(lm), PauseLM(lm, n_pause=2), PauseLM(lm, n_pause=1, position_mode='sequential'),
          PauseLM(lm, n_pause=3, distinct_pauses=True), LoopedLM(lm, n_loops=3), LoopedLM(lm, n_loops=2, feedback='post_norm'),
          PonderingLM(lm, n_ponder=2), PonderingLM(lm, n_ponder=3, accumulate=False, scale_by_steps=True)]
    try:
        from latent_thoughts.latent import LatentThoughtLM
        ms += [LatentThoughtLM(lm, n_thoughts=1, train_iters=2), LatentThoughtLM(lm, n_thoughts=2, train_iters=3, grad_mode='last')]
        ms += [LatentThoughtLM(lm, n_thoughts=N, train_iters=2, thought_init=init) for N in (2, 3) for init in ('grow', 'plain')]
    except ImportError: pass
    try:
        from latent_thoughts.adaptive import AdaptiveLatentLM
        ms += [AdaptiveLatentLM(lm, k_max=3, router='none'), AdaptiveLatentLM(lm, k_max=3, adaptive_weight=0.5)]
    except ImportError: pass
    return ms

@pytest.mark.parametrize('arch', ['llama', 'gpt_neox', 'gpt2'])
def test_ledger_equals_torch_flop_counter(arch):
    # eager attention: the full masked score matrix as plain matmuls, which the counter sees ('dense')
    lm = build_lm(arch, vocab_size=64, d_model=32, n_layer=2, n_head=4, max_positions=64, attn_implementation='eager')
    ids = torch.randint(0, 64, (2, 10))
    for m in _models(lm):
        r = flops_per_token(m, seq_len=10, attention='dense')
        m.train()
        assert _counted(m, ids, True) == pytest.approx(r['training_flops_per_token'], rel=1e-9), m.method
        if m.method in ('latent',): continue   # eval forward runs Jacobi to a tolerance; inference = decoding cost
        m.eval()
        with torch.no_grad(): assert _counted(m, ids, False) == pytest.approx(r['inference_flops_per_token'], rel=1e-9), m.method

def test_latent_decoding_cost():
    LatentThoughtLM = pytest.importorskip('latent_thoughts.latent').LatentThoughtLM
    lm = build_lm('llama', vocab_size=64, d_model=32, n_layer=2, n_head=4, max_positions=64, attn_implementation='eager')
    m = LatentThoughtLM(lm, n_thoughts=1).eval()
    ids = torch.randint(0, 64, (1, 6))
    # one decoded token costs N+1 entry-passes and one LM-head projection, attention aside
    with torch.no_grad():
        _, st = m.prefill(ids, torch.ones_like(ids))
        with FlopCounterMode(display=False) as fc: m.decode(torch.tensor([3]), st)
    c = model_counts(lm)
    attn = fc.get_total_flops() - (2 * 2 * c['matmul_params'] + 2 * c['head_params'])
    assert 0 <= attn < 0.5 * fc.get_total_flops()

def test_train_flops_per_token_live_models():
    lm = build_lm('gpt_neox', vocab_size=64, d_model=32, n_layer=2, n_head=4, max_positions=128)
    for m in _models(lm):
        f = train_flops_per_token(m, seq_len=64)
        assert isinstance(f, float) and f > 0
        assert f == flops_per_token(m.method, lm.config, seq_len=64, **{k: v for k, v in m.method_config().items()
                                    if k not in ('eval_iters', 'prefill_tol', 'prefill_max_iters', 'position_mode', 'halt_threshold',
                                                 'router_bias', 'attn_backend', 'prune_threshold')})['training_flops_per_token']
    v = train_flops_per_token(VanillaLM(lm))
    assert v == flops_per_token('vanilla', lm.config, seq_len=128)['training_flops_per_token']  # default: the model's context

def test_grow_passes_hand_count():
    # 'grow' minus 'plain' = the growing passes over k = 2..N stages: k·T entries, each a full stack over k·T causal keys
    (d, L, V, ff), T, N = _llama_shape(), 2048, 3
    entry = lambda S: L * (2 * (4 * d * d + 3 * d * ff) + 4 * d * (S + 1) / 2)
    r = {i: flops_per_token('latent', 'llama-1.4b', seq_len=T, n_thoughts=N, thought_init=i) for i in ('grow', 'plain')}
    extra = sum(k * entry(k * T) for k in range(2, N + 1))
    assert r['grow']['training_flops_per_token'] - r['plain']['training_flops_per_token'] == pytest.approx(3 * extra, rel=1e-12)
    assert r['grow']['inference_flops_per_token'] == r['plain']['inference_flops_per_token']
    with pytest.raises(ValueError, match="'grow' or 'plain'"): flops_per_token('latent', 'micro', thought_init='none')

def test_trainer_call_with_executed_steps():
    # the trainer's call for the adaptive method: train_flops_per_token(model, seq_len=..., train_steps=executed mean)
    AdaptiveLatentLM = pytest.importorskip('latent_thoughts.adaptive').AdaptiveLatentLM
    lm = build_lm('llama', vocab_size=64, d_model=32, n_layer=2, n_head=4, max_positions=128)
    m = AdaptiveLatentLM(lm, k_max=4, prune_threshold=0.4, router='learned', router_hidden=0, adaptive_weight=0.1)
    f = [train_flops_per_token(m, seq_len=64, train_steps=s) for s in (1.0, 2.0, 4.0)]
    assert f[0] < f[1] < f[2] == train_flops_per_token(m, seq_len=64)
    # one executed step: the vanilla model, plus the linear router (d weights, fwd+bwd) and the no-grad target-probability probe
    van = flops_per_token('vanilla', lm.config, seq_len=64)['training_flops_per_token']
    assert f[0] == pytest.approx(van + 3 * 2 * 32 + 2 * model_counts(lm)['head_params'], rel=1e-12)
    with pytest.raises(ValueError, match='train_steps'): train_flops_per_token(m, seq_len=64, train_steps=5.0)

def test_live_model_options_the_ledger_does_not_know():
    m = PauseLM(build_lm('llama', vocab_size=64, d_model=32, n_layer=2, n_head=4), n_pause=1)
    m.method_config = lambda: dict(n_pause=1, position_mode='reuse', distinct_pauses=False, some_new_option=3)
    assert flops_per_token(m, seq_len=16) == flops_per_token('pause', m.lm.config, seq_len=16, n_pause=1)
    with pytest.raises(ValueError, match='valid'): flops_per_token(m, seq_len=16, some_new_option=3)   # typed by hand: an error

def test_adaptive_steps():
    a = [flops_per_token('adaptive', 'llama-1.4b', k_max=4, mean_steps=s) for s in (1, 2, 3, 4)]
    inf = [r['inference_ratio'] for r in a]
    assert inf == sorted(inf) and abs(inf[0] - 1) < 0.01
    t = [flops_per_token('adaptive', 'llama-1.4b', k_max=4, train_steps=s)['training_ratio'] for s in (1.5, 4)]
    assert t[0] < t[1]

def test_bad_input():
    with pytest.raises(ValueError, match='ledger knows'): flops_per_token('moe', 'micro')
    with pytest.raises(ValueError, match='valid'): flops_per_token('pause', 'micro', n_pauses=2)
    with pytest.raises(ValueError, match='preset'): flops_per_token('pause', 'nope')
    with pytest.raises(ValueError, match='preset name or a config'): flops_per_token('pause')
    with pytest.raises(ValueError, match="'causal'"): flops_per_token('vanilla', 'micro', attention='flash')
    with pytest.raises(ValueError, match='seq_len'): flops_per_token('vanilla', 'micro', seq_len=0)
    with pytest.raises(ValueError, match='train_iters'): flops_per_token('latent', 'micro', train_iters=[])

def test_cli(capsys):
    assert cli(['--preset', 'llama-1.4b']) is None   # the CLI's exit status
    out = capsys.readouterr().out
    for name in ('vanilla 2x params (llama-2.8b)', 'pause n_pause=3', 'looped n_loops=4', 'pondering n_ponder=1', 'latent n_thoughts=1'):
        assert name in out
    cli(['--preset', 'tiny', '--seq-len', '256', '--json'])
    assert {r['method'] for r in json.loads(capsys.readouterr().out)} == set(LEDGER)
    with pytest.raises(SystemExit): cli(['--preset', 'nope'])

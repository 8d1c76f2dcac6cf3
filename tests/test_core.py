"Core recipe: presets against their names, no dropout, the embedding scale and the authors' initialisation."
import glob, math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from latent_thoughts.core import (ARCHS, PRESETS, DOUBLE_PARAMS, VanillaLM, MethodLM, build_lm, hf_config, init_weights,
                                  nominal_params, preset_params, preset_shape, resolve_embed_scale)
from latent_thoughts.config import ModelConfig, build_model, load_config, model_shape

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted(glob.glob(str(ROOT/'configs'/'*.yaml')))

def by_hand_params(arch, d_model, n_layer, vocab_size, max_positions, d_ff=None, tie_word_embeddings=None, **_):
    "Parameter count from the architecture's formula (independent of any model object)."
    d, L, V = d_model, n_layer, vocab_size
    if arch == 'gpt_neox':   # biased qkv/out/MLP, two LayerNorms per block, final LayerNorm, untied head
        ff = d_ff or 4 * d
        block = (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d
        return 2 * V * d + L * block + 2 * d
    if arch == 'llama':      # no biases, SwiGLU (3 matrices), two RMSNorms per block, final RMSNorm, untied head
        block = 4 * d * d + 3 * d * d_ff + 2 * d
        return 2 * V * d + L * block + d
    if arch == 'gpt2':       # biased Conv1Ds, learned positions, head tied unless told otherwise
        ff = d_ff or 4 * d
        block = (3 * d * d + 3 * d) + (d * d + d) + (d * ff + ff) + (ff * d + d) + 2 * 2 * d
        head = 0 if tie_word_embeddings in (None, True) else V * d
        return V * d + max_positions * d + L * block + 2 * d + head
    raise ValueError(arch)

@pytest.mark.parametrize('name', sorted(PRESETS))
def test_preset_counts_its_name(name):
    shape = preset_shape(name)
    n = preset_params(name)
    assert n == by_hand_params(**shape)
    nominal = nominal_params(name)
    if name in ('micro', 'tiny'): assert nominal is None; return
    assert abs(n / nominal - 1) < 0.05, f"{name}: {n / 1e9:.3f}B"

def test_pythia_counts_are_the_suites():
    published = {'pythia-70m': 70_426_624, 'pythia-160m': 162_322_944, 'pythia-410m': 405_334_016,
                 'pythia-1b': 1_011_781_632, 'pythia-1.4b': 1_414_647_808, 'pythia-2.8b': 2_775_208_960}
    assert {k: preset_params(k) for k in published} == published

def test_authors_llama_shapes():
    # llama_config/{410m,834m,1.4b,2.8b}/config.json of the PonderLM-2 repository: (hidden, layers, heads, MLP, vocab)
    theirs = {'llama-405m': (1024, 24, 16, 2752, 50304), 'llama-834m': (1536, 24, 24, 4128, 50304),
              'llama-1.4b': (2048, 24, 32, 5504, 50304), 'llama-2.6b': (2048, 48, 32, 5504, 50304)}
    for name, t in theirs.items():
        c = hf_config(**preset_shape(name))
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.intermediate_size, c.vocab_size, c.tie_word_embeddings) == (*t, False)
    for small, big in DOUBLE_PARAMS.items(): assert 1.6 < preset_params(big) / preset_params(small) < 2.8, (small, big)   # pythia-1b -> 2.8b: 2.74, gpt2-834m -> 1.4b: 1.69

@pytest.mark.parametrize('path', CONFIGS, ids=lambda p: Path(p).stem)
def test_config_counts_its_name(path):
    cfg, stem = load_config(path), Path(path).stem
    if cfg.model.init_from:   # continual pretraining of a released model: its shape is the release's, named by its maker
        from latent_thoughts.flops import HUB_SHAPES
        published = {'meta-llama/Llama-3.2-3B': 3_212_749_824}   # Meta's model card: 3.21B
        from transformers import AutoModelForCausalLM
        with torch.device('meta'): m = AutoModelForCausalLM.from_config(hf_config(**HUB_SHAPES[cfg.model.init_from]))
        assert sum(p.numel() for p in m.parameters()) == published[cfg.model.init_from], path
        return
    if stem in ('micro', 'tiny') or stem.endswith('-latent'):   # the paper's fresh-pretraining runs: the measured default recipe
        assert cfg.model.init_from is None and (cfg.model.embed_scale, cfg.model.init) == ('authors', 'authors')
        assert (ModelConfig().embed_scale, ModelConfig().init) == ('authors', 'authors')
    nominal = nominal_params(stem)
    if stem in ('micro', 'tiny'): assert nominal is None; return
    assert cfg.model.vocab_size is not None, f"{path}: set model.vocab_size (the tokenizer's length is not the padded vocabulary)"
    assert abs(by_hand_params(**model_shape(cfg.model)) / nominal - 1) < 0.05

@pytest.mark.parametrize('name', sorted(PRESETS))
def test_presets_have_no_dropout(name):
    cfg = hf_config(**preset_shape(name))
    drops = {k: v for k, v in cfg.to_dict().items() if 'drop' in k and not k.startswith('classifier')}
    assert drops and all(v == 0 for v in drops.values()), drops

def test_gpt2_trains_deterministically():
    "No dropout: two training-mode forwards of a GPT-2 preset shape give the same loss."
    m = VanillaLM(build_lm(**preset_shape('gpt2-405m', d_model=32, n_layer=2, n_head=2, vocab_size=64, max_positions=32))).train()
    ids = torch.randint(0, 64, (2, 16))
    assert m(ids, labels=ids).loss == m(ids, labels=ids).loss

def test_resolve_embed_scale():
    assert resolve_embed_scale(None, 1024) == resolve_embed_scale('none', 1024) == 1.0
    assert resolve_embed_scale('authors', 1024) == pytest.approx(50.596, abs=1e-3)       # √(2.5·1024)
    assert resolve_embed_scale('authors', 1024, interpolates=True) == 32.0             # √1024
    assert resolve_embed_scale(7, 1024) == 7.0
    for bad in ('auto', 0, -2.0, float('nan'), True):
        with pytest.raises(ValueError, match='embed_scale'): resolve_embed_scale(bad, 1024)

@pytest.mark.parametrize('arch', ARCHS)
def test_embed_scale_scales_token_embeddings_only(arch):
    lm = build_lm(arch, vocab_size=64, d_model=32, n_layer=2, n_head=4, max_positions=64, dtype=torch.float64).eval()
    m = VanillaLM(lm)
    assert m.embed_scale == 1.0 and MethodLM.interpolates_embeddings is False
    ids = torch.randint(0, 64, (2, 9))
    assert torch.equal(m(ids).logits, lm(ids).logits)                                  # wrapping changes nothing
    m.embed_scale = 3.5
    want = lm(inputs_embeds=lm.get_input_embeddings()(ids) * 3.5).logits                # by hand: HF on scaled embeddings
    torch.testing.assert_close(m(ids).logits, want, rtol=0, atol=1e-12)
    torch.testing.assert_close(m.embed(ids), lm.get_input_embeddings()(ids) * 3.5, rtol=0, atol=0)

def _authors_std(name, d, L, n_streams):
    "The authors' std for parameter `name` (PonderLM-2 `_init_weights`), None for norms and biases."
    if name.endswith('bias') or 'norm' in name or name.endswith(('ln_1.weight', 'ln_2.weight', 'ln_f.weight')): return None
    s = math.sqrt(2 / (5 * d))
    out = ('attention.dense.weight', 'dense_4h_to_h.weight', 'o_proj.weight', 'down_proj.weight', 'attn.c_proj.weight', 'mlp.c_proj.weight')
    return s / math.sqrt(2 * L * n_streams) if name.endswith(out) else s

TRUNC = 0.98658   # std of N(0,1) truncated at ±3

@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('n_streams', [1, 3])
def test_authors_init(arch, n_streams):
    d, L = 96, 3
    torch.manual_seed(0)
    lm = build_lm(arch, seed=1, vocab_size=2048, d_model=d, n_layer=L, n_head=4, max_positions=256,
                  **({'tie_word_embeddings': False} if arch == 'gpt2' else {}))
    # make every tensor non-trivial first, so the test sees what init_weights sets
    with torch.no_grad():
        for p in lm.parameters(): p.uniform_(-1, 1)
    init_weights(lm, 'authors', n_streams=n_streams)
    checked = 0
    for name, p in lm.named_parameters():
        std = _authors_std(name, d, L, n_streams)
        if std is None:
            want = 0.0 if name.endswith('bias') else 1.0
            assert torch.all(p == want), name
            continue
        assert p.abs().max() <= 3 * std * (1 + 1e-6), name                      # truncated at ±3σ
        assert p.std().item() == pytest.approx(TRUNC * std, rel=0.12 if p.numel() < 20000 else 0.04), name
        assert abs(p.mean().item()) < 0.1 * std, name
        checked += 1
    assert checked >= 2 + 4 * L

def test_init_weights_options():
    lm = build_lm('llama', vocab_size=64, d_model=32, n_layer=2, n_head=4)
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    assert init_weights(lm, 'hf') is lm and all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
    with pytest.raises(ValueError, match='init scheme'): init_weights(lm, 'xavier')
    with pytest.raises(ValueError, match='n_streams'): init_weights(lm, n_streams=0)
    torch.manual_seed(3); a = init_weights(build_lm('llama', seed=None, vocab_size=64, d_model=32, n_layer=2, n_head=4)).state_dict()
    torch.manual_seed(3); b = init_weights(build_lm('llama', seed=None, vocab_size=64, d_model=32, n_layer=2, n_head=4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)                                     # seeded: reproducible
    bf = init_weights(build_lm('gpt_neox', vocab_size=64, d_model=32, n_layer=2, n_head=4, dtype=torch.bfloat16))
    assert bf.gpt_neox.embed_in.weight.dtype == torch.bfloat16 and bf.gpt_neox.embed_in.weight.abs().max() > 0

def test_build_model_applies_the_recipe_to_fresh_models_only(tmp_path):
    d, L = 64, 2
    fresh = build_model(ModelConfig(preset='micro', embed_scale='authors', init='authors', method='latent',
                                    method_args={'n_thoughts': 2}), vocab_size=512)
    assert fresh.embed_scale == pytest.approx(math.sqrt(2.5 * d))
    w = fresh.lm.gpt_neox.layers[1].attention.dense.weight
    assert w.std().item() == pytest.approx(TRUNC * math.sqrt(2 / (5 * d)) / math.sqrt(2 * L * 3), rel=0.05)   # N+1 = 3
    plain = build_model(ModelConfig(preset='micro', embed_scale=None, init='hf'), vocab_size=512)
    assert plain.embed_scale == 1.0
    assert plain.lm.gpt_neox.layers[1].attention.dense.weight.std().item() == pytest.approx(0.02, rel=0.05)   # HF: N(0, 0.02²)
    # continual pretraining: the source's weights and scale, whatever the config says
    src = VanillaLM(build_lm(vocab_size=512, d_model=64, n_layer=2, n_head=4, max_positions=512))
    src.lm.save_pretrained(tmp_path/'hf')
    cont = build_model(ModelConfig(init_from=str(tmp_path/'hf'), embed_scale='authors', init='authors', method='latent'))
    assert cont.embed_scale == 1.0
    assert all(torch.equal(v, src.lm.state_dict()[k]) for k, v in cont.lm.state_dict().items())
    src.embed_scale = 2.0; src.save_pretrained(tmp_path/'ours')
    assert build_model(ModelConfig(init_from=str(tmp_path/'ours'), embed_scale=None, method='latent')).embed_scale == 2.0

@pytest.mark.parametrize('method,args,n', [('vanilla', {}, 1), ('latent', {'n_thoughts': 2}, 3), ('looped', {'n_loops': 3}, 3),
                                           ('adaptive', {'k_max': 4}, 4), ('pause', {'n_pause': 2}, 1), ('pondering', {'n_ponder': 2}, 3)])
def test_init_streams_per_method(method, args, n):
    "N+1 of the authors' init: latent N+1, looped passes, pondering P+1 (their GPT-NeoX files), adaptive K_max (our choice), pause 1."
    from latent_thoughts.config import init_streams
    m = build_model(ModelConfig(preset='micro', d_model=32, n_layer=2, method=method, method_args=args, init='authors'), vocab_size=128)
    assert init_streams(m) == n
    w = m.lm.gpt_neox.layers[0].mlp.dense_4h_to_h.weight
    assert w.std().item() == pytest.approx(TRUNC * math.sqrt(2 / (5 * 32)) / math.sqrt(2 * 2 * n), rel=0.05)

def test_embed_scale_factor_per_method():
    "'authors' is √(factor·d) with the method's class factor: 2.5 by default, as in the authors' PonderLM-2 files."
    assert MethodLM.embed_scale_factor == 2.5
    assert resolve_embed_scale('authors', 64, factor=1.0) == 8.0 and resolve_embed_scale('authors', 40, factor=2.5) == 10.0
    class Narrow(VanillaLM): embed_scale_factor = 1.0                                     # a method with the √d rule
    assert build_model(ModelConfig(d_model=40, n_layer=1, n_head=4)).embed_scale == pytest.approx(10.0)   # √(2.5·40)
    m = Narrow(build_lm('llama', vocab_size=64, d_model=64, n_layer=1, n_head=4, max_positions=32))
    assert resolve_embed_scale('authors', m.config.hidden_size, factor=m.embed_scale_factor) == 8.0

def test_save_warns_once_per_model(tmp_path):
    import json, warnings
    from latent_thoughts.core import SCALE_KEY
    m = VanillaLM(build_lm('llama', vocab_size=64, d_model=32, n_layer=1, n_head=4, max_positions=32)); m.embed_scale = 2.0
    def n_warnings(model, d):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always'); model.save_pretrained(d)
        return sum('plain Hugging Face load' in str(x.message) for x in w)
    assert [n_warnings(m, tmp_path/'a'), n_warnings(m, tmp_path/'b'), n_warnings(m, tmp_path/'c')] == [1, 0, 0]
    assert json.loads((tmp_path/'c'/'config.json').read_text())[SCALE_KEY] == 2.0          # the record is still written
    other = VanillaLM(build_lm('llama', vocab_size=64, d_model=32, n_layer=1, n_head=4, max_positions=32)); other.embed_scale = 2.0
    assert n_warnings(other, tmp_path/'d') == 1                                           # another model warns again

def test_init_weights_draws_a_pause_embedding():
    class Paused(torch.nn.Module):
        def __init__(self, lm): super().__init__(); self.lm, self.pause_embeds = lm, torch.nn.Parameter(torch.zeros(4, 256))
    w = Paused(build_lm('llama', vocab_size=64, d_model=256, n_layer=1, n_head=4, max_positions=32))
    init_weights(w)
    s = math.sqrt(2 / (5 * 256))
    assert w.pause_embeds.std().item() == pytest.approx(0.9866 * s, rel=0.1) and w.pause_embeds.abs().max() <= 3 * s

def test_load_names_a_shape_mismatch_not_corruption(tmp_path):
    from latent_thoughts.core import _load_weights
    VanillaLM(build_lm('llama', vocab_size=64, d_model=32, n_layer=1, n_head=4, max_positions=32)).save_pretrained(tmp_path)
    wide = VanillaLM(build_lm('llama', vocab_size=64, d_model=64, n_layer=1, n_head=4, max_positions=32))
    with pytest.raises(ValueError) as e: _load_weights(wide, tmp_path/'model.safetensors')
    assert 'checkpoint (64, 32) vs model (64, 64)' in str(e.value) and 'corrupt' not in str(e.value)
    (tmp_path/'model.safetensors').write_bytes(b'\x08' + b'\x00' * 7 + b'{"a":')          # a truncated header: a read error
    with pytest.raises(ValueError, match='corrupt or truncated'): _load_weights(wide, tmp_path/'model.safetensors')

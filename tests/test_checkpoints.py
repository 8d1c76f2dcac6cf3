"Checkpoints: Hugging Face-native layout, older checkpoints, the authors' released PonderLM-2 format, one loader."
import inspect, json, math, warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from latent_thoughts.core import (ARCHS, LATENT_CONFIG, METHOD_WEIGHTS, WEIGHTS, MethodLM, VanillaLM, build_lm,
                                  checkpoint_kind, load_method_lm, _load_weights)
from latent_thoughts.config import import_methods

import_methods()
from latent_thoughts.latent import LatentThoughtLM
from latent_thoughts.adaptive import AdaptiveLatentLM
from latent_thoughts.baselines import PauseLM

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=97, d_model=32, n_layer=2, n_head=4, max_positions=64)

def _tiny(arch='gpt_neox', dtype=torch.float64, **kw):
    return build_lm(arch, dtype=dtype, **{**SHAPE, **kw}).eval()

@pytest.mark.parametrize('arch,tie', [('gpt_neox', False), ('llama', False), ('gpt2', True), ('gpt2', False)])
@pytest.mark.parametrize('method', ['vanilla', 'latent', 'pause', 'adaptive'])
def test_checkpoint_is_a_hf_checkpoint(tmp_path, arch, tie, method):
    lm = _tiny(arch, **({'tie_word_embeddings': tie} if arch == 'gpt2' else {}))
    m = {'vanilla': lambda: VanillaLM(lm), 'latent': lambda: LatentThoughtLM(lm, n_thoughts=1, eval_iters=2),
         'pause': lambda: PauseLM(lm, n_pause=1), 'adaptive': lambda: AdaptiveLatentLM(lm, k_max=2)}[method]().eval()
    with torch.no_grad():   # method parameters (pause embedding, router) away from their init, so a lost one shows
        for p in m.method_state_dict().values(): p.add_(torch.randn_like(p))
    m.save_pretrained(tmp_path)
    # stock names, nothing else, in model.safetensors: AutoModelForCausalLM loads it with a clean report
    with safe_open(str(tmp_path/WEIGHTS), 'pt') as f: keys = set(f.keys())
    assert not any(k.startswith('lm.') for k in keys)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True, dtype=torch.float64)
    assert {k: list(v) for k, v in info.items() if v} == {}
    ids = torch.randint(0, 97, (2, 7))
    torch.testing.assert_close(hf(ids).logits, lm(ids).logits, rtol=0, atol=1e-12)    # = the wrapped model's base (scale 1)
    # the method's own parameters, in their own file
    own = m.method_state_dict()
    if own:
        saved = load_file(str(tmp_path/METHOD_WEIGHTS))
        assert set(saved) == set(own) and all(torch.equal(saved[k], own[k]) for k in own)
    else: assert not (tmp_path/METHOD_WEIGHTS).exists()
    # and the whole method loads back, equal
    back = MethodLM.from_pretrained(tmp_path, dtype=torch.float64).eval()
    assert type(back) is type(m) and back.method_config() == m.method_config()
    assert set(back.state_dict()) == set(m.state_dict())
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in back.state_dict().items())
    torch.testing.assert_close(back(ids).logits, m(ids).logits, rtol=0, atol=0)

def test_trainer_style_load_into_existing_model(tmp_path):
    "`_load_weights(model, dir/model.safetensors)` (the trainer's resume) reads the HF layout and the method file."
    m = AdaptiveLatentLM(_tiny('gpt_neox', dtype=torch.float32), k_max=2)
    m.save_pretrained(tmp_path)
    other = AdaptiveLatentLM(build_lm('gpt_neox', seed=5, **SHAPE), k_max=2)
    assert not torch.equal(other.lm.gpt_neox.embed_in.weight, m.lm.gpt_neox.embed_in.weight)
    _load_weights(other, tmp_path/WEIGHTS)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in other.state_dict().items())
    (tmp_path/METHOD_WEIGHTS).unlink()
    with pytest.raises(ValueError, match='missing'): _load_weights(other, tmp_path/WEIGHTS)

def test_embed_scale_round_trip_and_warning(tmp_path):
    lm = _tiny()
    m = LatentThoughtLM(lm, n_thoughts=1, eval_iters=2)
    assert m.embed_scale == 1.0                                      # wrapping never scales
    m.embed_scale = math.sqrt(2.5 * 32)
    with pytest.warns(UserWarning, match='without the scale'): m.save_pretrained(tmp_path)
    assert json.loads((tmp_path/LATENT_CONFIG).read_text())['embed_scale'] == m.embed_scale
    assert 'embed_scale' not in m.method_config()                    # recorded by the base class, not the method
    back = load_method_lm(tmp_path, dtype=torch.float64)
    assert back.embed_scale == m.embed_scale
    ids = torch.randint(0, 97, (2, 7))
    torch.testing.assert_close(back.eval()(ids).logits, m.eval()(ids).logits, rtol=0, atol=0)
    assert load_method_lm(tmp_path, embed_scale=1.0).embed_scale == 1.0   # an explicit override wins
    # without latent_config.json the plain-HF directory still tells its scale, with a warning
    (tmp_path/LATENT_CONFIG).unlink()
    with pytest.warns(UserWarning, match='embed_scale'): v = load_method_lm(tmp_path)
    assert type(v) is VanillaLM and v.embed_scale == m.embed_scale
    # saving again with scale 1 removes the key
    v.embed_scale = 1.0; v.save_pretrained(tmp_path)
    assert 'latent_thoughts_embed_scale' not in json.loads((tmp_path/'config.json').read_text())

@pytest.mark.parametrize('name', ['micro-vanilla', 'micro-latent'])
def test_older_checkpoints_still_load(tmp_path, name):
    "assets/ were written before the HF-native layout: one file of `lm.`-prefixed names; they load, and re-save as HF."
    d = ROOT/'assets'/name
    with safe_open(str(d/WEIGHTS), 'pt') as f: old = all(k.startswith('lm.') for k in f.keys())
    m = load_method_lm(d).eval()
    assert m.embed_scale == 1.0
    sd = load_file(str(d/WEIGHTS)) if old else {'lm.' + k: v for k, v in load_file(str(d/WEIGHTS)).items()}
    if old:   # by hand: the stored tensors are the model's
        for k, v in m.state_dict().items():
            assert torch.equal(v, sd[k]) or (k.endswith('lm_head.weight') and torch.equal(v, sd['lm.embed_out.weight'])), k
    m.save_pretrained(tmp_path)
    again = load_method_lm(tmp_path).eval()
    ids = torch.randint(0, 4096, (1, 12))
    torch.testing.assert_close(again(ids).logits, m(ids).logits, rtol=0, atol=0)
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if v} == {}

@pytest.mark.parametrize('arch', ['gpt_neox', 'gpt2'])
def test_older_layout_written_by_hand_loads(tmp_path, arch):
    "The layout before HF-native checkpoints, written here as that code did: the wrapper's whole state dict, `lm.` names."
    from safetensors.torch import save_model
    m = PauseLM(_tiny(arch, dtype=torch.float32), n_pause=1).eval()
    m.lm.config.save_pretrained(tmp_path)
    (tmp_path/LATENT_CONFIG).write_text(json.dumps({'method': 'pause', **m.method_config(), 'latent_thoughts_version': '0.1.0'}))
    save_model(m, str(tmp_path/WEIGHTS))
    back = load_method_lm(tmp_path).eval()
    assert back.embed_scale == 1.0 and type(back) is PauseLM
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in back.state_dict().items())
    other = PauseLM(build_lm(arch, seed=3, **SHAPE), n_pause=1)
    _load_weights(other, tmp_path/WEIGHTS)                                       # the trainer's path too
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in other.state_dict().items())

def test_one_loader_for_every_kind(tmp_path):
    lm = _tiny()
    lm.save_pretrained(tmp_path/'plain')
    LatentThoughtLM(lm).save_pretrained(tmp_path/'ours')
    assert (checkpoint_kind(tmp_path/'plain'), checkpoint_kind(tmp_path/'ours')) == ('hf', 'latent_thoughts')
    assert type(load_method_lm(tmp_path/'plain')) is VanillaLM
    assert type(MethodLM.from_pretrained(tmp_path/'plain')) is VanillaLM
    with pytest.raises(TypeError, match='from_base'): LatentThoughtLM.from_pretrained(tmp_path/'plain')
    with pytest.raises(TypeError, match='LatentThoughtLM'): VanillaLM.from_pretrained(tmp_path/'ours')
    with pytest.raises(FileNotFoundError, match='does not exist'): load_method_lm(tmp_path/'nope')

def test_unreachable_hub_id_says_so(monkeypatch):
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, 'HF_HUB_OFFLINE', True)
    with pytest.raises(FileNotFoundError, match='reachable hub repo'): load_method_lm('zeng123/PonderLM-2-Pythia-410m')

# ---------------------------------------------------------------- the authors' released format (item 5)

MARKER = 'EXECUTED_REMOTE_CODE'

def authors_checkpoint(d, N=1, K=3, random=True, scale_embeds=True, seed=0):
    """A local directory in the released PonderLM-2 layout: stock GPT-NeoX weights (`embed_out`, `gpt_neox.*`) and the
    config.json their LLaMA-Factory fork writes (transformers 4.4x field names, their fields, an auto_map to code)."""
    d = Path(d); d.mkdir(parents=True, exist_ok=True)
    lm = build_lm('gpt_neox', seed=seed, vocab_size=97, d_model=32, n_layer=2, n_head=4, max_positions=128)
    lm.save_pretrained(d)
    cfg = {"architectures": ["GPTNeoXForCausalLM"], "auto_map": {"AutoConfig": "configuration_gpt_neox.GPTNeoXConfig",
           "AutoModelForCausalLM": "modeling_gpt_neox.GPTNeoXForCausalLM"},
           "bos_token_id": 0, "eos_token_id": 0, "hidden_act": "gelu", "hidden_size": 32, "initializer_range": 0.02,
           "intermediate_size": 128, "layer_norm_eps": 1e-05, "max_position_embeddings": 128, "model_type": "gpt_neox",
           "num_attention_heads": 4, "num_hidden_layers": 2, "rotary_emb_base": 10000, "rotary_pct": 0.25,
           "tie_word_embeddings": False, "torch_dtype": "float32", "transformers_version": "4.46.1", "use_cache": True,
           "use_parallel_residual": True, "vocab_size": 97,
           "num_latent_thoughts": N, "num_jacobi_iterations": K, "random_jacobi_iterations": random, "scale_embeds": scale_embeds,
           "interpolation": False, "interpolation_use_topk": False, "recurrent_model": True, "output_hidden_states": False}
    (d/'config.json').write_text(json.dumps(cfg, indent=2))
    for f in ('modeling_gpt_neox.py', 'configuration_gpt_neox.py'):   # code that must never run
        (d/f).write_text(f"open({str(d/MARKER)!r}, 'w').write('ran')\nraise RuntimeError('remote code executed')\n")
    return lm

def authors_forward(lm, ids, N, K, scale):
    """The authors' eval-mode forward (GPT-NeoX `modeling_gpt_neox.py` of PonderLM-2), re-implemented by hand: token
    embeddings x scale; N growing passes (pass k runs the k stages built so far, refreshes them and appends the next);
    K Jacobi passes over all N+1 stages; a final pass; logits at each token's last stage. Stages interleave as
    [e(x1), s1(x1), .., e(x2), ..], every stage reuses its token's position id, causal attention over the stream."""
    base, (B, T) = lm.gpt_neox, ids.shape
    E = base.embed_in(ids) * scale
    pos = torch.arange(T).expand(B, T)
    def run(stages):
        S = len(stages)
        x = torch.empty(B, T * S, E.size(-1), dtype=E.dtype); p = torch.empty(B, T * S, dtype=torch.long)
        for s, st in enumerate(stages): x[:, s::S], p[:, s::S] = st, pos
        causal = torch.full((T * S, T * S), float('-inf'), dtype=E.dtype).triu(1)[None, None].expand(B, 1, -1, -1)
        h = base(inputs_embeds=x, position_ids=p, attention_mask=causal).last_hidden_state
        return [h[:, s::S] for s in range(S)]
    stages = [E]
    for k in range(N):
        hs = run(stages)
        for j in range(k): stages[j + 1] = hs[j]
        stages.append(hs[k])
    for _ in range(K if N > 0 else 0):
        hs = run(stages)
        for i in range(N): stages[i + 1] = hs[i]
    return lm.get_output_embeddings()(run(stages)[N])

def _grow_supported(): return 'thought_init' in inspect.signature(LatentThoughtLM.__init__).parameters

@pytest.mark.parametrize('N', [1, 2])
def test_authors_checkpoint_loads_and_runs_as_theirs(tmp_path, N):
    if N > 1 and not _grow_supported(): pytest.skip("LatentThoughtLM has no thought_init='grow' (the authors' N>1 passes) yet")
    src = authors_checkpoint(tmp_path, N=N, K=3)
    assert checkpoint_kind(tmp_path) == 'ponderlm2'
    m = load_method_lm(tmp_path, dtype=torch.float64).eval()
    assert not (tmp_path/MARKER).exists()                                       # their code never ran
    assert type(m) is LatentThoughtLM and m.n_thoughts == N and m.eval_iters == 3
    assert tuple(m.train_iters) == (2, 3, 4)                                    # random_jacobi_iterations, GPT-NeoX file
    assert m.embed_scale == pytest.approx(math.sqrt(2.5 * 32))
    want_sd = {k: v.double() for k, v in src.state_dict().items()}
    assert all(torch.equal(v, want_sd[k]) for k, v in m.lm.state_dict().items())   # their weights, all of them
    ids = torch.randint(0, 97, (2, 11))
    ref = authors_forward(m.lm, ids, N, 3, m.embed_scale)
    torch.testing.assert_close(m(ids).logits, ref, rtol=0, atol=1e-10)         # their num_jacobi_iterations by default
    for k in (0, 1, 5):                                                         # any jacobi_iters= given
        torch.testing.assert_close(m(ids, jacobi_iters=k).logits, authors_forward(m.lm, ids, N, k, m.embed_scale), rtol=0, atol=1e-10)
    m5 = load_method_lm(tmp_path, dtype=torch.float64, eval_iters=5).eval()     # or as a load-time override
    torch.testing.assert_close(m5(ids).logits, authors_forward(m5.lm, ids, N, 5, m.embed_scale), rtol=0, atol=1e-10)
    # their loss: mean next-token cross-entropy of those logits
    ce = torch.nn.functional.cross_entropy(ref[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(m(ids, labels=ids).loss, ce, rtol=0, atol=1e-10)

def test_authors_checkpoint_fields_map(tmp_path):
    authors_checkpoint(tmp_path/'a', N=1, K=4, random=False, scale_embeds=False)
    m = load_method_lm(tmp_path/'a')
    assert (m.eval_iters, tuple(m.train_iters), m.embed_scale) == (4, (4,), 1.0)
    assert type(MethodLM.from_pretrained(tmp_path/'a')) is LatentThoughtLM
    assert type(LatentThoughtLM.from_pretrained(tmp_path/'a')) is LatentThoughtLM
    with pytest.raises(TypeError, match='holds a LatentThoughtLM'): VanillaLM.from_pretrained(tmp_path/'a')
    cfg = json.loads((tmp_path/'a'/'config.json').read_text())
    (tmp_path/'a'/'config.json').write_text(json.dumps({**cfg, 'interpolation': True}))
    with pytest.raises(ValueError, match='interpolation=true'): load_method_lm(tmp_path/'a')
    assert not (tmp_path/'a'/MARKER).exists()

def test_training_continues_from_the_authors_checkpoint(tmp_path):
    authors_checkpoint(tmp_path/'theirs', N=1)
    m = load_method_lm(tmp_path/'theirs').train()
    ids = torch.randint(0, 97, (4, 16))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    torch.manual_seed(0)
    losses = []
    for _ in range(8):
        loss = m(ids, labels=ids).loss
        opt.zero_grad(); loss.backward(); opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    assert m.lm.gpt_neox.embed_in.weight.grad is not None and m.lm.gpt_neox.embed_in.weight.grad.abs().sum() > 0
    # the continued model is saved in our format, keeps the authors' scale, and loads back equal
    m.eval()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore'); m.save_pretrained(tmp_path/'ours')
    back = load_method_lm(tmp_path/'ours').eval()
    assert checkpoint_kind(tmp_path/'ours') == 'latent_thoughts' and back.embed_scale == m.embed_scale
    torch.testing.assert_close(back(ids).logits, m.eval()(ids).logits, rtol=0, atol=0)
    # and through the config, as continual pretraining (init_from keeps their weights and scale)
    from latent_thoughts.config import ModelConfig, build_model
    c = build_model(ModelConfig(init_from=str(tmp_path/'theirs'), method='latent', method_args={'n_thoughts': 1}))
    assert c.embed_scale == pytest.approx(math.sqrt(2.5 * 32))

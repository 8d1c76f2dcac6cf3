"""Attention backends on CPU: config/trainer errors, init_from, and HF's flash-attention code path (with reference
kernels, `attention.emulate_flash_attention`) against SDPA in float64 for the latent-thought model."""
import subprocess, sys
from pathlib import Path

import pytest, torch
from latent_thoughts.attention import (emulate_flash_attention, set_attention_backend, sees_whole_stream, backend_status,
                                       keep_streams_whole)
from latent_thoughts.config import Config, ModelConfig, DataConfig, TrainConfig, load_config, build_model
from latent_thoughts.core import build_lm, VanillaLM
from latent_thoughts.latent import LatentThoughtLM
from latent_thoughts.trainer import Trainer, latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ('gpt_neox', 'llama', 'gpt2')

def tiny_lm(arch='llama', dtype=torch.float64, seed=0):
    return build_lm(arch, seed=seed, vocab_size=50, d_model=32, n_layer=2, n_head=2, max_positions=64, dtype=dtype)

def toy_blocks(n=32, T_=16, V=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, V, (n, T_), generator=g)

def toy_cfg(d, attn='sdpa', **train):
    return Config(ModelConfig(preset='micro', d_model=32, n_layer=1, n_head=2, vocab_size=64, max_positions=64, attn_implementation=attn),
                  DataConfig(block_size=16, batch_size=4, eval_batch_size=8),
                  TrainConfig(**{**dict(steps=4, lr=1e-2, warmup=1, out_dir=str(d), progress=False, mixed_precision='no'), **train}))

def test_import_never_needs_flash_attn():
    "Every module imports with flash_attn made unimportable."
    code = ("import sys; sys.modules['flash_attn'] = None\n"
            "import latent_thoughts, latent_thoughts.attention, latent_thoughts.trainer, latent_thoughts.adaptive, latent_thoughts.cli\n"
            "assert not latent_thoughts.attention.backend_status('flash_attention_2')[0]")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT)

@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the errors of a machine without a CUDA GPU')
@pytest.mark.parametrize('backend', ['flash_attention_2', 'flex_attention'])
def test_unavailable_backend_stops_the_trainer_before_anything(tmp_path, backend):
    with pytest.raises(RuntimeError, match='model.attn_implementation=sdpa'):
        Trainer(toy_cfg(tmp_path, backend), train_blocks=toy_blocks(), val_blocks=toy_blocks(8, seed=1)).fit()
    assert latest_checkpoint(tmp_path) is None and not (tmp_path/'metrics.jsonl').exists()

def test_unknown_backend_is_a_config_error():
    with pytest.raises(ValueError, match="choose one of"): load_config(None, ['model.attn_implementation=flash_attn'])

def test_resume_under_another_backend(tmp_path):
    "The kernel is not the model: a run started on SDPA resumes on eager attention."
    Trainer(toy_cfg(tmp_path), train_blocks=toy_blocks(), val_blocks=toy_blocks(8, seed=1)).fit(stop_at=2)
    tr = Trainer(toy_cfg(tmp_path, 'eager'), train_blocks=toy_blocks(), val_blocks=toy_blocks(8, seed=1))
    s = tr.fit(resume=True)
    assert s['step'] == 4 and tr.history[0]['step'] == 3 and tr.model.config._attn_implementation == 'eager'

def test_init_from_gets_the_backend(tmp_path):
    tiny_lm(dtype=torch.float32).save_pretrained(tmp_path/'hf')
    m = build_model(ModelConfig(init_from=str(tmp_path/'hf'), method='latent', attn_implementation='eager',
                                method_args={'n_thoughts': 1}))
    assert isinstance(m, LatentThoughtLM) and m.config._attn_implementation == 'eager'
    with emulate_flash_attention():
        m = build_model(ModelConfig(init_from=str(tmp_path/'hf'), method='latent', attn_implementation='flash_attention_2',
                                    method_args={'n_thoughts': 1}), device='cpu')
        assert m.config._attn_implementation == 'flash_attention_2'
        assert sees_whole_stream(m, torch.arange(5).repeat_interleave(2))

@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('fix', ['keep_streams_whole', 'wrap'])
def test_flash_path_splits_the_stream_unless_fixed(arch, fix):
    """The trap is real on HF's flash path (one row, reused positions); the hook fixes it, and every MethodLM installs it
    when it wraps a model loaded with flash attention by other means (no `set_attention_backend`)."""
    lm = tiny_lm(arch).eval()
    with emulate_flash_attention():
        lm.config._attn_implementation = 'flash_attention_2'
        assert not sees_whole_stream(lm, torch.arange(4).repeat_interleave(2))
        m = keep_streams_whole(lm) if fix == 'keep_streams_whole' else LatentThoughtLM(lm, n_thoughts=1)
        assert sees_whole_stream(m, torch.arange(4).repeat_interleave(2))

@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('rows', ['one', 'padded'])
def test_latent_on_flash_path_equals_sdpa(arch, rows):
    "Forward logits, gradients and cached greedy generation of a latent model on the flash path equal SDPA (float64)."
    torch.manual_seed(0)
    x = torch.randint(1, 50, (2, 7))
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    if rows == 'one': x, am = x[1:], am[1:]
    out = {}
    for impl in ('sdpa', 'flash_attention_2'):
        lm = tiny_lm(arch)
        with emulate_flash_attention():
            set_attention_backend(lm, impl, 'cpu')
            m = LatentThoughtLM(lm, n_thoughts=2, train_iters=2).eval()   # eval: no dropout (GPT-2 has some)
            o = m(x, labels=x, attention_mask=am, jacobi_iters=2)
            o.loss.backward()
            g = torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None])
            out[impl] = (o.logits.detach()[am.bool()], g, m.generate(x, attention_mask=am, max_new_tokens=4))
    (a, ga, sa), (b, gb, sb) = out['sdpa'], out['flash_attention_2']
    torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-10)
    assert torch.equal(sa, sb)

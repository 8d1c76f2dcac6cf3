"""The GPU path. Tests marked `cuda` skip with their reason (printed by `-ra`) where there is no CUDA GPU or no
flash-attn: every available attention backend against SDPA for the latent-thought model and for the adaptive
model's flex path (its 2-D mask), in fp32 and bf16, forward logits and gradients; the latent stream stays one
sequence on flash attention; a compiled bf16 training run. The CPU smoke run of `bench/bench_gpu.py` is not
marked cuda (it runs in the default suite).

Tolerances. fp32: relative error (Frobenius norm) against SDPA at most 1e-4 for logits and 1e-3 for gradients
(different kernels sum in different orders; TF32 is off by default). bf16 (autocast over fp32 weights, as the
trainer runs): both the backend and SDPA itself are compared with the fp32 SDPA result, and the backend may be
at most twice as far from it as SDPA is, plus 2e-3. A split stream or a wrong mask gives errors of order 1.
"""
import json, os, subprocess, sys
from contextlib import nullcontext
from pathlib import Path

import pytest, torch
from latent_thoughts.attention import backend_status, set_attention_backend, sees_whole_stream
from latent_thoughts.core import build_lm
from latent_thoughts.latent import LatentThoughtLM
from latent_thoughts.adaptive import AdaptiveLatentLM

ROOT = Path(__file__).resolve().parents[1]
ARCHS = ('gpt_neox', 'llama', 'gpt2')
BACKENDS = ('eager', 'flash_attention_2', 'flex_attention')

def need_cuda():
    if not torch.cuda.is_available(): pytest.skip('no CUDA GPU (torch.cuda.is_available() is False)')

def need_backend(name):
    need_cuda()
    ok, why = backend_status(name, 'cuda')
    if not ok: pytest.skip(why)

def gpu_lm(arch, seed=0, dtype=torch.float32):
    return build_lm(arch, seed=seed, vocab_size=256, d_model=128, n_layer=2, n_head=4, max_positions=256, dtype=dtype).cuda()

def batch(rows:str, T:int=24):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(1, 256, (2, T), generator=g)
    am = torch.ones_like(x); am[0, :5] = 0            # row 0 left-padded
    if rows == 'one': x, am = x[1:], am[1:]            # one full row: the case HF would split on flash
    return x.cuda(), am.cuda()

def rel(a, b): return ((a.float() - b.float()).norm() / b.float().norm()).item()

def grads(m): return torch.cat([p.grad.float().flatten() for p in m.parameters() if p.grad is not None])

def run(build, dtype:str, x, am):
    "Logits at real positions and all gradients of one forward/backward (eval mode: no dropout)."
    m = build().eval()
    with (torch.autocast('cuda', dtype=torch.bfloat16) if dtype == 'bf16' else nullcontext()):
        out = m(x, labels=x, attention_mask=am)
    out.loss.backward()
    return out.logits.detach().float()[am.bool()], grads(m)

def check(got, ref, sdpa_low, dtype, what):
    "`got`, `ref` (fp32 SDPA) and, for bf16, `sdpa_low` (SDPA in bf16): (logits, grads) pairs."
    for i, (name, tol32) in enumerate((('logits', 1e-4), ('grads', 1e-3))):
        e = rel(got[i], ref[i])
        if dtype == 'fp32': assert e <= tol32, f"{what} {name}: relative error {e:.2e} > {tol32:.0e} against SDPA"
        else:
            e0 = rel(sdpa_low[i], ref[i])
            print(f"{what} {name}: bf16 error {e:.2e} (SDPA bf16: {e0:.2e})")
            assert e <= 2 * e0 + 2e-3, f"{what} {name}: bf16 error {e:.2e} against fp32 SDPA, SDPA's own bf16 error {e0:.2e}"

# ---------------------------------------------------------------- latent thoughts, every backend vs SDPA
@pytest.mark.cuda
@pytest.mark.parametrize('arch', ARCHS)
@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
@pytest.mark.parametrize('rows', ['one', 'padded'])
def test_latent_backend_matches_sdpa(arch, backend, dtype, rows):
    need_backend(backend)
    if backend == 'flash_attention_2' and dtype == 'fp32':
        pytest.skip('flash-attn kernels take fp16/bf16 only (fp32 runs use SDPA); bf16 is covered')
    x, am = batch(rows)
    def build(impl):
        def f():
            lm = gpu_lm(arch)
            set_attention_backend(lm, impl, 'cuda')
            return LatentThoughtLM(lm, n_thoughts=1, train_iters=2, eval_iters=2)
        return f
    ref = run(build('sdpa'), 'fp32', x, am)
    low = run(build('sdpa'), 'bf16', x, am) if dtype == 'bf16' else None
    check(run(build(backend), dtype, x, am), ref, low, dtype, f"latent {arch} {backend} {rows}")

@pytest.mark.cuda
@pytest.mark.parametrize('arch', ARCHS)
def test_latent_stream_is_one_sequence_on_flash(arch):
    "Reused position ids (0,0,1,1,...) in one row: HF alone would split the stream on flash; the library keeps it whole."
    need_backend('flash_attention_2')
    reuse = torch.arange(8).repeat_interleave(2)
    lm = gpu_lm(arch, dtype=torch.bfloat16).eval()
    lm.set_attn_implementation('flash_attention_2')             # HF's own switch, without the library's hook
    assert not sees_whole_stream(lm, reuse), "HF no longer splits the stream: the hook may be unnecessary"
    set_attention_backend(lm, 'flash_attention_2', 'cuda')
    assert sees_whole_stream(lm, reuse)
    # and cached generation of a latent model at batch 1 (prefill is one row of T(N+1) entries) matches SDPA
    p = torch.randint(1, 256, (1, 12), device='cuda')
    logits = {}
    for impl in ('sdpa', 'flash_attention_2'):
        set_attention_backend(lm, impl, 'cuda')
        m = LatentThoughtLM(lm, n_thoughts=1).eval()
        with torch.no_grad(): logits[impl] = m.prefill(p, torch.ones_like(p), jacobi_iters=3)[0].float()
    assert rel(logits['flash_attention_2'], logits['sdpa']) < 2e-2

# ---------------------------------------------------------------- adaptive: flex (2-D mask as a BlockMask) vs SDPA
@pytest.mark.cuda
@pytest.mark.parametrize('dtype', ['fp32', 'bf16'])
@pytest.mark.parametrize('rows', ['one', 'padded'])
def test_adaptive_flex_matches_sdpa(dtype, rows):
    need_backend('flex_attention')
    x, am = batch(rows)
    def build(backend):
        def f():
            lm = gpu_lm('llama')
            torch.manual_seed(3)   # the same router initialisation for both
            return AdaptiveLatentLM(lm, k_max=3, attn_backend=backend, prune_threshold=0.0).cuda()
        return f
    ref = run(build('sdpa'), 'fp32', x, am)
    low = run(build('sdpa'), 'bf16', x, am) if dtype == 'bf16' else None
    check(run(build('flex'), dtype, x, am), ref, low, dtype, f"adaptive flex {rows}")

# ---------------------------------------------------------------- trainer: bf16 + compile (+ flash) on the GPU
@pytest.mark.cuda
@pytest.mark.parametrize('attn', ['sdpa', 'flash_attention_2'])
def test_compiled_bf16_training_on_gpu(tmp_path, attn):
    need_backend(attn)
    from latent_thoughts.config import Config, ModelConfig, DataConfig, TrainConfig
    from latent_thoughts.core import MethodLM
    from latent_thoughts.trainer import Trainer, latest_checkpoint, evaluate
    g = torch.Generator().manual_seed(0)
    blocks, val = torch.randint(0, 256, (64, 64), generator=g), torch.randint(0, 256, (16, 64), generator=g)
    cfg = Config(ModelConfig(preset='micro', d_model=128, n_layer=2, n_head=4, vocab_size=256, max_positions=256,
                             method='latent', method_args={'n_thoughts': 1, 'train_iters': [2]}, attn_implementation=attn),
                 DataConfig(block_size=64, batch_size=8, eval_batch_size=8),
                 TrainConfig(steps=8, lr=3e-3, warmup=1, out_dir=str(tmp_path), progress=False, mixed_precision='bf16', compile=True))
    tr = Trainer(cfg, train_blocks=blocks, val_blocks=val)
    s = tr.fit()
    assert tr.model.lm.base_model._compiled_call_impl is not None
    assert all(torch.isfinite(torch.tensor(r['loss'])) for r in tr.history) and s['skipped'] == 0
    m = MethodLM.from_pretrained(latest_checkpoint(tmp_path)/'model').cuda()   # a plain (uncompiled, SDPA) model
    e = evaluate(m, val, 8, autocast=lambda: torch.autocast('cuda', dtype=torch.bfloat16))['loss']
    assert abs(e - s['eval_loss']) < 2e-2, (e, s['eval_loss'])

# ---------------------------------------------------------------- the benchmark's CPU smoke run (not cuda)
def test_bench_gpu_cpu_smoke(tmp_path):
    out = tmp_path/'bench.json'
    r = subprocess.run([sys.executable, str(ROOT/'bench'/'bench_gpu.py'), '--preset', 'micro', '--device', 'cpu', '--steps', '2',
                        '--json', str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'paper 3+2K' in r.stdout and 'Table 3' in r.stdout
    res = json.loads(out.read_text())
    assert set(res['train']) == {'vanilla', 'latent N=1 K=2', 'latent N=1 K=3'}
    assert [res['train'][k]['paper_train_ratio'] for k in ('vanilla', 'latent N=1 K=2', 'latent N=1 K=3')] == [1.0, 7.0, 9.0]
    assert all(v['train_tokens_per_s'] > 0 and 0 < v['mfu'] < 1 for v in res['train'].values())
    assert {k.split(' b=')[1] for k in res['decode']} == {'1', '8'}
    assert all(v['decode_tokens_per_s'] > 0 for v in res['decode'].values())

"""Trainer: exact resume after SIGKILL, atomic checkpoints, non-finite losses, config and preflight errors."""
import json, math, os, signal, subprocess, sys, time
from pathlib import Path

import pytest, torch
from latent_thoughts.config import Config, ModelConfig, DataConfig, TrainConfig, load_config, build_model
from latent_thoughts.core import VanillaLM, MethodLM, build_lm
from latent_thoughts import trainer as T
from latent_thoughts.trainer import Trainer, latest_checkpoint, NonFiniteLossError
from latent_thoughts.testing import toy_blocks
from conftest import toy_config

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, '-m', 'latent_thoughts.cli']
RESUME_TOL = 1e-6  # same process count, same thread count, CPU: the resumed curve is the same arithmetic

def losses(run_dir):
    out = {}
    for line in (Path(run_dir)/'metrics.jsonl').read_text().splitlines():
        try: r = json.loads(line)
        except json.JSONDecodeError: continue  # a line being written while we read
        if 'loss' in r: out[r['step']] = r['loss']
    return out

toy_cfg = toy_config   # the shared toy run (`testing.toy_train_config`, any field overridable)

def toy_trainer(d, model=None, **train):
    return Trainer(toy_cfg(d, **train), model=model, train_blocks=toy_blocks(), val_blocks=toy_blocks(16, seed=1))

# ---------------------------------------------------------------- resume after SIGKILL
def test_resume_after_sigkill_is_exact(tmp_path):
    "A latent-thought micro run killed with SIGKILL mid-way and resumed ends with the uninterrupted loss curve."
    common = ['train', '--config', 'micro', 'model.method=latent', 'model.method_args={n_thoughts: 1, train_iters: [2, 3]}',
              'train.steps=30', 'train.save_every=3', 'train.keep_last=2', 'train.progress=false', 'train.warmup=2',
              'data.batch_size=4', 'data.eval_max_blocks=4']
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    ref, cut = tmp_path/'ref', tmp_path/'cut'
    subprocess.run(CLI + common + [f'train.out_dir={ref}'], check=True, cwd=ROOT, env=env, capture_output=True)
    p = subprocess.Popen(CLI + common + [f'train.out_dir={cut}'], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 300:  # kill once step 5 is logged: checkpoint 3 exists, steps 4-5 are lost
        if (cut/'metrics.jsonl').exists() and max(losses(cut), default=0) >= 5: break
        if p.poll() is not None: pytest.fail('the run ended before it could be killed')
        time.sleep(0.02)
    p.send_signal(signal.SIGKILL); p.wait()
    killed_at = max(losses(cut))
    assert killed_at < 30, 'killed too late to test anything'
    assert int(latest_checkpoint(cut).name[5:]) < killed_at + 1
    ck = latest_checkpoint(cut).name
    r = subprocess.run(CLI + common + [f'train.out_dir={cut}', '--resume'], check=True, cwd=ROOT, env=env, capture_output=True, text=True)
    assert f'resumed from {cut/"checkpoints"/ck} (step {int(ck[5:])})' in r.stdout  # it continued, it did not start over
    a, b = losses(ref), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 31))
    diff = max(abs(a[s] - b[s]) for s in a)
    print(f'killed after step {killed_at}; max |loss difference| over 30 steps: {diff:.2e}')
    assert diff <= RESUME_TOL

# ---------------------------------------------------------------- atomic checkpoints
def test_partial_checkpoint_is_never_loaded(tmp_path, monkeypatch):
    "A crash while a checkpoint is written leaves the previous one in force; resuming uses it."
    toy_trainer(tmp_path, steps=12).fit(stop_at=4)
    real_publish = T.publish_checkpoint
    def crash(tmp, keep_last=2): raise KeyboardInterrupt('simulated crash before the rename')
    monkeypatch.setattr(T, 'publish_checkpoint', crash)
    with pytest.raises(KeyboardInterrupt): toy_trainer(tmp_path, steps=12).fit(resume=True, stop_at=8)
    assert (tmp_path/'checkpoints'/'.tmp-step_00000008').is_dir()   # the partial write is there...
    assert latest_checkpoint(tmp_path).name == 'step_00000004'       # ...and never chosen
    # a truncated step directory (no weights) is skipped too, even if `latest` points at it
    bad = tmp_path/'checkpoints'/'step_00000009'; (bad/'model').mkdir(parents=True)
    (tmp_path/'checkpoints'/'latest').write_text('step_00000009')
    assert latest_checkpoint(tmp_path).name == 'step_00000004'
    monkeypatch.setattr(T, 'publish_checkpoint', real_publish)
    tr = toy_trainer(tmp_path, steps=12); tr.fit(resume=True)
    assert tr.history[0]['step'] == 5 and not (tmp_path/'checkpoints'/'.tmp-step_00000008').exists()
    ref = toy_trainer(tmp_path/'ref', steps=12); ref.fit()
    assert max(abs(x['loss'] - y['loss']) for x, y in zip(ref.history[4:], tr.history)) <= RESUME_TOL

def test_checkpoint_is_a_loadable_model(tmp_path):
    s = toy_trainer(tmp_path).fit()
    m = MethodLM.from_pretrained(latest_checkpoint(tmp_path)/'model')
    assert abs(T.evaluate(m, toy_blocks(16, seed=1))['loss'] - s['eval_loss']) < 1e-6

# ---------------------------------------------------------------- non-finite losses
class NaNAt(VanillaLM):
    "Loss is NaN on the training calls listed in `bad`."
    def __init__(self, lm, bad=()): super().__init__(lm); self.bad, self.calls = set(bad), 0
    def forward(self, input_ids, labels=None, **kw):
        out = super().forward(input_ids, labels=labels, **kw)
        if self.training:
            self.calls += 1
            if self.calls in self.bad: out.loss = out.loss * float('nan')
        return out

def nan_model(bad): return NaNAt(build_lm(vocab_size=64, d_model=32, n_layer=1, n_head=2, max_positions=64), bad)

def test_isolated_nonfinite_steps_are_skipped_and_counted(tmp_path):
    m = nan_model({2, 5, 6})
    w = {k: v.clone() for k, v in m.state_dict().items()}
    tr = toy_trainer(tmp_path, model=m, steps=8, grad_accum=1)
    s = tr.fit()
    assert s['skipped'] == 3 and math.isfinite(s['eval_loss'])
    assert [r['skipped'] for r in tr.history] == [0, 1, 1, 1, 2, 3, 3, 3]
    assert all(torch.isfinite(p).all() for p in m.parameters())

def test_fp16_scaler_skips_overflow_and_resumes_its_scale(tmp_path, monkeypatch):
    "fp16 as accelerate sets it up on CUDA (native AMP + GradScaler), emulated on CPU: a non-finite step is skipped by the\n    scaler, which halves its scale; training goes on; the scale is checkpointed and restored on resume."
    from latent_thoughts import trainer as T
    make = T.make_accelerator
    def fp16_acc(t, out_dir):
        acc = make(t, out_dir); acc.scaler = torch.amp.GradScaler('cpu', init_scale=2.**8); acc.native_amp = True
        return acc
    monkeypatch.setattr(T, 'make_accelerator', fp16_acc)
    tr = toy_trainer(tmp_path, model=nan_model({2}), steps=4, grad_accum=1, mixed_precision='fp16')
    s = tr.fit(stop_at=3)
    assert s['skipped'] == 1 and [r['skipped'] for r in tr.history] == [0, 1, 1]
    assert tr.acc.scaler.get_scale() == 2.**7
    tr2 = toy_trainer(tmp_path, model=nan_model(()), steps=4, grad_accum=1, mixed_precision='fp16')
    s2 = tr2.fit(resume=True)
    assert s2['step'] == 4 and s2['skipped'] == 1 and tr2.acc.scaler.get_scale() == 2.**7

def test_adaptive_validation_is_cross_entropy(tmp_path):
    "The validation loss is the next-token CE, not CE + the adaptive router penalty."
    from latent_thoughts.adaptive import AdaptiveLatentLM
    from latent_thoughts.trainer import evaluate
    m = AdaptiveLatentLM(build_lm(vocab_size=64, d_model=32, n_layer=1, n_head=2, max_positions=64), k_max=3,
                         adaptive_weight=5.0)
    blocks = toy_blocks(8, seed=1)
    r = evaluate(m, blocks, batch_size=8)
    x = torch.stack([torch.as_tensor(b) for b in blocks])
    with torch.no_grad(): out = m.eval()(x, labels=x)
    assert r['loss'] == pytest.approx(out.metrics['ce'], rel=1e-6) and out.loss.item() > r['loss'] + 1e-4

def test_nonfinite_with_grad_accum_skips_whole_step(tmp_path):
    tr = toy_trainer(tmp_path, model=nan_model({3}), steps=4, grad_accum=2)  # call 3 = step 2, micro-batch 1
    s = tr.fit()
    assert s['skipped'] == 1 and [r['skipped'] for r in tr.history] == [0, 1, 1, 1]

def test_consecutive_nonfinite_stop_with_last_good_checkpoint(tmp_path):
    m = nan_model(range(4, 1000))
    tr = toy_trainer(tmp_path, model=m, steps=20, max_bad_steps=3)
    good = None
    with pytest.raises(NonFiniteLossError, match=r"3 consecutive steps.*last good weights are saved in .*step_00000006"):
        tr.fit()
    ck = latest_checkpoint(tmp_path)
    assert ck.name == 'step_00000006'
    loaded = MethodLM.from_pretrained(ck/'model')
    assert all(torch.isfinite(p).all() for p in loaded.parameters())
    # the saved weights are those after step 3, the last good update
    ref = toy_trainer(tmp_path/'ref', model=nan_model(()), steps=20); ref.fit(stop_at=3)
    ref_w = MethodLM.from_pretrained(latest_checkpoint(tmp_path/'ref')/'model').state_dict()
    assert all(torch.equal(ref_w[k], v) for k, v in loaded.state_dict().items())

# ---------------------------------------------------------------- config and preflight errors
def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key 'train\.stepz'.*'steps'"): load_config(None, ['train.stepz=3'])
    (tmp_path/'c.yaml').write_text('trian: {}\n')
    with pytest.raises(ValueError, match="valid sections"): load_config(tmp_path/'c.yaml')
    with pytest.raises(ValueError, match=r"not arguments of .*valid: \[.*n_thoughts"):
        load_config(None, ['model.method=latent', 'model.method_args={n_thought: 1}'])
    with pytest.raises(ValueError, match="registered methods"): load_config(None, ['model.method=quantum'])
    with pytest.raises(ValueError, match="known presets"): load_config(None, ['model.preset=pythia-7b'])
    with pytest.raises(ValueError, match="must be >= 1"): load_config(None, ['data.batch_size=0'])
    with pytest.raises(FileNotFoundError, match="configs/"): load_config(tmp_path/'missing.yaml')

def test_resume_with_other_model_is_an_error(tmp_path):
    toy_trainer(tmp_path, steps=4).fit()
    cfg = toy_cfg(tmp_path, steps=8); cfg.model.n_layer = 2
    with pytest.raises(ValueError, match=r"different model config \(model\.n_layer: saved 1, now 2\)"):
        Trainer(cfg, train_blocks=toy_blocks(), val_blocks=toy_blocks(16, seed=1)).fit(resume=True)
    with pytest.raises(FileExistsError, match="--resume"): toy_trainer(tmp_path, steps=8).fit()

def test_unwritable_or_full_disk_fails_before_training(tmp_path, monkeypatch):
    (tmp_path/'a_file').write_text('x')
    tr = toy_trainer(tmp_path/'a_file'/'run')
    with pytest.raises(RuntimeError, match="cannot write to train.out_dir"): tr.fit()
    assert tr.history == []
    import shutil, collections
    Usage = collections.namedtuple('Usage', 'total used free')
    monkeypatch.setattr(shutil, 'disk_usage', lambda p: Usage(10**9, 10**9 - 10**5, 10**5))
    tr = toy_trainer(tmp_path/'full')
    with pytest.raises(RuntimeError, match=r"not enough free disk .* 0\.00 GB free"): tr.fit()
    assert tr.history == [] and not (tmp_path/'full'/'metrics.jsonl').exists()

def test_build_model_from_config():
    m = build_model(ModelConfig(preset='micro', method='latent', method_args={'n_thoughts': 1, 'train_iters': [2, 3]}), 128)
    assert m.method == 'latent' and m.config.vocab_size == 128 and m.config.hidden_size == 64

def test_init_from_pretrained_hf_model(tmp_path):
    "Continual pretraining: model.init_from wraps a saved HF causal LM (its weights, its shape) in the chosen method."
    lm = build_lm(vocab_size=96, d_model=32, n_layer=1, n_head=2, max_positions=64, seed=3)
    lm.save_pretrained(tmp_path/'hf')
    m = build_model(ModelConfig(init_from=str(tmp_path/'hf'), method='latent', method_args={'n_thoughts': 1, 'train_iters': [2]}))
    assert m.method == 'latent' and m.config.vocab_size == 96
    ref = lm.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in m.lm.state_dict().items())

# ---------------------------------------------------------------- train.compile
@pytest.mark.slow
def test_compiled_run_checkpoints_plain_weights_and_resumes(tmp_path):
    "train.compile=True: the checkpoint has plain parameter names, loads into a fresh model, and a compiled resume continues the curve."
    from safetensors import safe_open
    from latent_thoughts.core import WEIGHTS
    def run(d, compile, stop_at=None, resume=False, steps=4):
        cfg = toy_cfg(d, steps=steps, save_every=2, compile=compile)
        cfg.model.method, cfg.model.method_args = 'latent', {'n_thoughts': 1, 'train_iters': [2]}
        cfg.data.block_size, cfg.data.batch_size = 16, 4
        tr = Trainer(cfg, train_blocks=toy_blocks(T=16), val_blocks=toy_blocks(8, T=16, seed=1))
        return tr, tr.fit(resume=resume, stop_at=stop_at)
    ref, _ = run(tmp_path/'plain', False)
    run(tmp_path/'compiled', True, stop_at=2)
    ck = latest_checkpoint(tmp_path/'compiled')
    with safe_open(str(ck/'model'/WEIGHTS), 'pt') as f: saved = {k: f.get_tensor(k) for k in f.keys()}
    assert saved and not any('_orig_mod' in k for k in saved)
    m = MethodLM.from_pretrained(ck/'model')      # a fresh, uncompiled model: loading is strict (no missing/unexpected names)
    assert sum(p.numel() for p in m.state_dict().values()) >= sum(v.numel() for v in saved.values())
    tr, s = run(tmp_path/'compiled', True, resume=True)
    assert tr.history[0]['step'] == 3 and s['step'] == 4
    assert tr.model.lm.base_model._compiled_call_impl is not None and ref.model.lm.base_model._compiled_call_impl is None
    a, b = [r['loss'] for r in ref.history], [v for _, v in sorted(losses(tmp_path/'compiled').items())]
    print('plain vs compiled+resumed losses:', a, b)
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4   # compiled kernels round differently; same arithmetic otherwise
    m = MethodLM.from_pretrained(latest_checkpoint(tmp_path/'compiled')/'model')
    assert abs(T.evaluate(m, toy_blocks(8, T=16, seed=1))['loss'] - s['eval_loss']) < 1e-4

# ---------------------------------------------------------------- training FLOPs of a pruned adaptive run
def test_adaptive_flops_count_the_executed_steps(tmp_path):
    "The logged FLOPs of a pruning adaptive run are the ledger at each step's executed latent steps (below the nominal\n    all-steps count), summed over steps; the sum is checkpointed, so a resumed run logs the same numbers."
    from latent_thoughts.flops import train_flops_per_token
    def run(d, **fit):
        cfg = toy_cfg(d, steps=4, save_every=2)
        cfg.model.method, cfg.model.method_args = 'adaptive', {'k_max': 4, 'router_bias': -1.0}   # gates ~0.27: pruned at step 2-3
        tr = Trainer(cfg, train_blocks=toy_blocks(), val_blocks=toy_blocks(16, seed=1)); tr.fit(**fit)
        return tr
    tr = run(tmp_path/'a')
    nominal = train_flops_per_token(tr.model, seq_len=32)                 # every token runs all k_max = 4 steps
    step_tokens, total = 8 * 32, 0.0
    for r in tr.history:
        assert 1 <= r['steps_executed'] < 4
        want = train_flops_per_token(tr.model, seq_len=32, train_steps=r['steps_executed'])
        assert r['train_flops_per_token'] == pytest.approx(want, rel=1e-12) and want < nominal
        total += want * step_tokens
        assert r['flops'] == pytest.approx(total, rel=1e-12)
    print(f"executed steps {[round(r['steps_executed'], 3) for r in tr.history]}: logged {total:.4g} FLOPs, nominal {nominal * tr.tokens:.4g}")
    assert total < 0.8 * nominal * tr.tokens
    run(tmp_path/'b', stop_at=2); b = run(tmp_path/'b', resume=True)
    assert [r['step'] for r in b.history] == [3, 4]
    assert [r['flops'] for r in b.history] == pytest.approx([r['flops'] for r in tr.history[2:]], rel=1e-9)
    # methods that measure nothing keep the ledger's constant per token
    v = toy_trainer(tmp_path/'v', steps=2); v.fit()
    assert v.history[-1]['flops'] == pytest.approx(train_flops_per_token(v.model, seq_len=32) * v.tokens, rel=1e-12)


# ---------------------------------------------------------------- a streamed Hugging Face dataset
def test_streamed_dataset_starts_at_once_and_resumes_exactly(tmp_path, monkeypatch):
    "A HF dataset (here a local one, read by datasets.load_dataset(dir, streaming=True) like a hub dataset) is streamed:\n    training reads only what its batches need, the loader state is in every checkpoint and a resumed run reads the same tokens."
    import json as _json
    from latent_thoughts.data import TokenStream, StreamLoader, train_tokenizer
    monkeypatch.setenv('LATENT_THOUGHTS_DATA', str(tmp_path/'data'))
    src = tmp_path/'ds'; src.mkdir()
    for sp, n in (('train', 20_000), ('validation', 200)):
        (src/f'{sp}.jsonl').write_text(''.join(_json.dumps({'text': f'{sp} {i}: ' + 'the cat sat on a mat. ' * (i % 6)}) + '\n' for i in range(n)))
    tok = train_tokenizer(src/'validation.jsonl', vocab_size=300)
    def run(d, **fit):
        cfg = toy_cfg(d, steps=6, save_every=3)
        cfg.data.source, cfg.data.eval_max_blocks, cfg.model.vocab_size = str(src), 8, None
        tr = Trainer(cfg, tokenizer=tok); tr.fit(**fit)
        return tr
    a = run(tmp_path/'a')
    assert isinstance(a.train_blocks, TokenStream) and isinstance(a.loader, StreamLoader)
    assert a.train_blocks.docs_read <= 200                               # 6 steps x 8 x 32 tokens, of a 20,000-document split
    assert len(a.val_blocks) == 8                                        # validation: what evaluation reads, not the split
    run(tmp_path/'b', stop_at=3)
    ck = latest_checkpoint(tmp_path/'b')
    st = torch.load(ck/'rng_0.pt', weights_only=False)['loader']
    assert st['stream'] == a.train_blocks.key and st['start'] is not None
    b = run(tmp_path/'b', resume=True)
    assert [r['step'] for r in b.history] == [4, 5, 6]
    assert max(abs(x['loss'] - y['loss']) for x, y in zip(a.history[3:], b.history)) <= RESUME_TOL


@pytest.mark.parametrize('name', ['llama-410m-adaptive', 'llama-1.4b-adaptive'])
def test_adaptive_paper_configs(name):
    "The adaptive paper's runs: LLaMA 410M / 1.4B, 26B Pile tokens in 50k steps of 256 x 2048, streamed, pruning in training."
    from latent_thoughts.core import preset_params, nominal_params
    cfg = load_config(ROOT/'configs'/f'{name}.yaml')
    d, t = cfg.data, cfg.train
    processes = 8                                                         # the header's launch
    assert d.batch_size * t.grad_accum * processes == 256 and d.block_size == 2048
    assert t.steps == 50_000 and t.steps * 256 * 2048 == pytest.approx(26e9, rel=0.01)
    assert T.streams(d)                                                   # a HF dataset: streamed, not tokenized whole first
    assert cfg.model.method == 'adaptive' and cfg.model.method_args['prune_threshold'] > 0
    assert preset_params(cfg.model.preset) == pytest.approx(nominal_params(name), rel=0.05)
    small = load_config(ROOT/'configs'/f'{name}.yaml', ['model.preset=micro', 'model.vocab_size=64'])
    m = build_model(small.model)
    assert m.method == 'adaptive' and m.k_max == 3 and m.prune_threshold == 0.1

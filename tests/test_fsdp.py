"""Sharded training (train.parallel=fsdp: torch FSDP2 through accelerate) on CPU processes (gloo), against one process.

The multi-process runs go through `torchrun`: the CLI (`-m latent_thoughts.cli train`) for the end-to-end tests, and this
file itself as a worker (`torchrun tests/test_fsdp.py SPECS OUT`) that trains several small runs in one launch.
"""
import json, os, signal, socket, subprocess, sys, time
from pathlib import Path

import pytest, torch
from latent_thoughts.config import Config, ModelConfig, DataConfig, TrainConfig
from latent_thoughts.core import load_method_lm
from latent_thoughts import trainer as T
from latent_thoughts.trainer import Trainer, latest_checkpoint, check_parallel
from latent_thoughts.testing import toy_blocks
from conftest import toy_config
from latent_thoughts.flops import activation_bytes, measure_activation_bytes, memory_per_device, config_memory, GiB

ROOT = Path(__file__).resolve().parents[1]
# per-step training loss, float32, FSDP on 2 processes vs one process on the same global batch: only the order of the
# gradient reduction differs (reduce-scatter vs local sum). Measured: 0 to 1.2e-6 (test output prints it per run).
FSDP_TOL = 1e-5
RESUME_TOL = 1e-6   # same processes, same sharding: a resumed run repeats the same arithmetic (measured: 0)
ENV = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'HF_HUB_OFFLINE': '1'}

def free_port() -> int:
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def torchrun(nproc:int, *args, background=False, **kw):
    "Run `torchrun` with `nproc` CPU processes (finished, with output captured; or started in the background)."
    exe = Path(sys.executable).parent/'torchrun'
    cmd = [str(exe) if exe.exists() else 'torchrun', '--nproc_per_node', str(nproc), '--master_port', str(free_port()), *args]
    if background: return subprocess.Popen(cmd, cwd=ROOT, env=ENV, **kw)
    return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, **kw)

def losses(run_dir) -> dict:
    out = {}
    for line in (Path(run_dir)/'metrics.jsonl').read_text().splitlines():
        try: r = json.loads(line)
        except json.JSONDecodeError: continue   # a line being written while we read
        if 'loss' in r: out[r['step']] = r['loss']
    return out

# ---------------------------------------------------------------- small runs on synthetic blocks (worker and reference)
def toy_cfg(out_dir, **fields):
    "The shared toy run (`conftest.toy_config`) at this file's scale: 2 layers, batch 4 × 2 micro-batches, 5 steps."
    return toy_config(out_dir, **{**dict(n_layer=2, batch_size=4, steps=5, save_every=0, grad_accum=2), **fields})

def toy_run(spec:dict, resume=False) -> dict:
    "Train one small run of `spec` (toy_cfg keywords + name); return its losses, final eval loss and how its parameters are held."
    spec = {k: v for k, v in spec.items() if k not in ('name', 'die_in_save', 'resume')}
    tr = Trainer(toy_cfg(**spec), train_blocks=toy_blocks(), val_blocks=toy_blocks(16, seed=1))
    s = tr.fit(resume=resume)
    ps = list(tr.pmodel.parameters())
    local = sum((p.to_local() if hasattr(p, 'to_local') else p).numel() for p in ps)
    return dict(losses=[r['loss'] for r in tr.history], steps=[r['step'] for r in tr.history], eval_loss=s['eval_loss'],
                params=sum(p.numel() for p in ps), local_params=local, sharded=tr.sharded,
                mesh=list(tr.acc.torch_device_mesh.shape) if getattr(tr.acc, 'torch_device_mesh', None) is not None else None)

def worker(specs_file, out_file):
    "torchrun entry: train every spec of `specs_file` in turn (same process group); rank 0 writes the results."
    specs, res = json.loads(Path(specs_file).read_text()), {}
    for sp in specs:
        if 'die_in_save' in sp:   # SIGKILL this rank right after it wrote its optimizer shard of that step's checkpoint
            step, rank = sp['die_in_save']
            real = Trainer._save_sharded_optimizer
            def dying(self, d, real=real, step=step, rank=rank):
                real(self, d)
                if self.step == step and self.acc.process_index == rank: os.kill(os.getpid(), signal.SIGKILL)
            Trainer._save_sharded_optimizer = dying
        res[sp['name']] = toy_run(sp, resume=sp.get('resume', False))
    if int(os.environ.get('RANK', '0')) == 0: Path(out_file).write_text(json.dumps(res))

def run_worker(tmp_path, specs, nproc=2, expect_ok=True):
    f, out = tmp_path/'specs.json', tmp_path/'results.json'
    f.write_text(json.dumps(specs)); out.unlink(missing_ok=True)
    r = torchrun(nproc, str(Path(__file__).resolve()), str(f), str(out))
    if expect_ok: assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return (json.loads(out.read_text()) if out.exists() else None), r

def compare(name, a, b, tol=FSDP_TOL):
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f'{name}: max |loss difference| over {len(a)} steps: {diff:.2e}')
    assert len(a) == len(b) and diff <= tol, (name, a, b)
    return diff

# ---------------------------------------------------------------- default run (about 40 s)
def test_parallel_settings_are_checked():
    check_parallel(Config(train=TrainConfig(parallel='fsdp')), world_size=2)
    with pytest.raises(ValueError, match='train.parallel must be one of'): check_parallel(Config(train=TrainConfig(parallel='zero3')))
    hyb = TrainConfig(parallel='fsdp', fsdp_sharding='hybrid', fsdp_shard_size=3)
    with pytest.raises(ValueError, match='must divide the 4 processes'): check_parallel(Config(train=hyb), world_size=4)
    ac = Config(ModelConfig(method='adaptive'), train=TrainConfig(activation_checkpointing=True))
    with pytest.raises(ValueError, match='KV cache'): check_parallel(ac)

def test_fsdp_matches_one_process_and_its_checkpoint_loads_in_one_process(tmp_path):
    "A latent-thoughts model sharded over 2 CPU processes: the one-process losses; its checkpoint is a plain model."
    spec = dict(name='latent', method='latent', method_args={'n_thoughts': 1, 'train_iters': [2, 3]}, batch_size=2,
                parallel='fsdp', steps=4, out_dir=str(tmp_path/'fsdp'))
    res, _ = run_worker(tmp_path, [spec])
    got, ref = res['latent'], toy_run(dict(spec, batch_size=4, parallel='ddp', out_dir=str(tmp_path/'one')))
    compare('latent, FSDP 2 x batch 2 vs 1 process batch 4', got['losses'], ref['losses'])
    assert got['sharded'] and got['local_params'] < 0.6 * got['params']
    # the memory ledger's sharded parameter bytes are what each process holds (FSDP2 pads dim 0 to a multiple of 2)
    led = memory_per_device('latent', load_method_lm(latest_checkpoint(tmp_path/'one')/'model').lm.config, 32, devices=2,
                            mixed_precision='no', n_thoughts=1, train_iters=[2, 3])
    assert abs(4 * got['local_params'] / led['params'] - 1) < 0.01
    ck = latest_checkpoint(tmp_path/'fsdp')
    assert sorted(p.name for p in (ck/'optimizer').iterdir()) == ['.metadata', '__0_0.distcp', '__1_0.distcp']  # sharded
    assert torch.load(ck/'trainer_state.pt', weights_only=False)['optimizer'] is None
    # written by 2 processes, read by one: the library's loader gives the run's final validation loss...
    m = load_method_lm(ck/'model')
    assert abs(T.evaluate(m, toy_blocks(16, seed=1))['loss'] - got['eval_loss']) < 1e-6
    # ...and the base model is a plain Hugging Face checkpoint with the same weights
    from transformers import AutoModelForCausalLM
    hf, own = AutoModelForCausalLM.from_pretrained(ck/'model').state_dict(), m.lm.state_dict()
    assert sorted(hf) == sorted(own) and all(torch.equal(v, own[k]) for k, v in hf.items())

# ---------------------------------------------------------------- the memory ledger against CPU measurements
# (arch, method, method_args, bf16, activation checkpointing, relative tolerance); None: the ledger is an upper bound
L1, K2 = dict(n_thoughts=1, train_iters=[2]), dict(n_thoughts=2, train_iters=[1])
LEDGER_CASES = [('llama', 'vanilla', {}, False, False, .02), ('llama', 'latent', L1, False, False, .02), ('llama', 'latent', L1, True, False, .02),
                ('llama', 'latent', K2, True, False, .02), ('llama', 'latent', L1, True, True, .1), ('llama', 'pause', {'n_pause': 1}, False, False, .02),
                ('llama', 'looped', {'n_loops': 2}, True, True, .1), ('llama', 'pondering', {'n_ponder': 1}, True, False, .02),
                ('llama', 'mor', {'n_recursions': 3}, False, False, .02), ('llama', 'adaptive', {'k_max': 3, 'prune_threshold': 0.0}, False, False, .1),
                ('llama', 'mor', {'n_recursions': 3, 'routing': 'token'}, False, False, None),
                ('gpt_neox', 'vanilla', {}, True, False, .02), ('gpt_neox', 'latent', L1, False, False, .02), ('gpt_neox', 'latent', L1, False, True, .1),
                ('gpt_neox', 'pondering', {'n_ponder': 1}, False, False, .02), ('gpt_neox', 'adaptive', {'k_max': 2, 'prune_threshold': 0.0}, False, False, .1),
                ('gpt2', 'vanilla', {}, False, False, .02), ('gpt2', 'latent', K2, True, False, .02), ('gpt2', 'pause', {'n_pause': 1}, True, True, .1),
                ('gpt2', 'mor', {'n_recursions': 2, 'sharing': 'cycle'}, False, False, .02)]

@pytest.mark.parametrize('arch,method,args,bf16,ac,tol', LEDGER_CASES, ids=lambda v: str(v) if not isinstance(v, dict) else '')
def test_activation_ledger_matches_cpu_measurement(arch, method, args, bf16, ac, tol):
    "Bytes a training forward leaves for the backward (live storages, measured on CPU) against the ledger's count."
    from latent_thoughts.config import build_model
    m = build_model(ModelConfig(preset='micro', arch=arch, d_model=64, n_layer=3, n_head=4, vocab_size=128, method=method, method_args=args))
    if bf16: m = m.to(torch.bfloat16)   # FSDP computes with gathered bf16 weights (and the trainer's autocast)
    if ac: T.enable_activation_checkpointing(m)
    x = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    got = measure_activation_bytes(m, x, torch.bfloat16 if bf16 else None)
    want = 2 * activation_bytes(method, m.lm.config, 32, 2 if bf16 else 4, ac, **args)['total']
    print(f'{arch} {method} {args} bf16={bf16} ac={ac}: measured {got}, ledger {want:.0f} ({want / got - 1:+.2%})')
    if tol is None: assert got <= want <= 1.5 * got
    else: assert abs(want / got - 1) <= tol

def test_activation_checkpointing_keeps_a_fraction():
    "At the 3B config's shape, checkpointing keeps each block's input only: the latent run's activations drop about 15x."
    from latent_thoughts.flops import HUB_SHAPES
    from latent_thoughts.core import hf_config
    c = hf_config(**HUB_SHAPES['meta-llama/Llama-3.2-3B'])
    full, ac = (activation_bytes('latent', c, 2048, 2, a, n_thoughts=1, train_iters=[2, 3])['total'] for a in (False, True))
    assert 10 < full / ac < 20

@pytest.mark.parametrize('name', ['latent', 'vanilla'])
def test_cpt_config_header_is_the_ledger(name):
    "configs/llama3-3b-cpt-*.yaml: 5B tokens in 0.5M-token steps on 8 GPUs, and the memory header is what the ledger prints now."
    from latent_thoughts.config import load_config
    path = ROOT/'configs'/f'llama3-3b-cpt-{name}.yaml'
    cfg = load_config(path)
    assert cfg.model.init_from == 'meta-llama/Llama-3.2-3B' and cfg.model.method == name and cfg.train.parallel == 'fsdp'
    assert cfg.data.batch_size * cfg.train.grad_accum * 8 * cfg.data.block_size == 524288
    assert abs(cfg.train.steps * 524288 / 5e9 - 1) < 1e-3
    r = config_memory(cfg, devices=8)
    total = [l for l in path.read_text().splitlines() if l.startswith('#') and 'total' in l][0]
    assert f"{r['total'] / GiB:.2f} GiB" in total, (total, r['total'] / GiB)
    assert r['total'] < 70 * GiB   # fits an 80 GB GPU with room for the CUDA context

# ---------------------------------------------------------------- slow: every method, hybrid sharding, faults
METHODS = {'vanilla': {}, 'latent': {'n_thoughts': 2, 'train_iters': [1, 2]}, 'adaptive': {'k_max': 3, 'router_bias': -1.0},
           'pause': {'n_pause': 1}, 'looped': {'n_loops': 2}, 'pondering': {'n_ponder': 1},
           'mor': {'n_recursions': 2, 'sharing': 'cycle'}}
AC_METHODS = ('latent', 'looped', 'mor')   # activation checkpointing: the stack run many times, and blocks called directly (MoR)

@pytest.mark.slow
def test_every_method_trains_under_fsdp(tmp_path):
    "Each method sharded over 2 processes (batch 2 each) gives the losses of one process with batch 4; with activation checkpointing too."
    specs = [dict(name=m, method=m, method_args=a, batch_size=2, parallel='fsdp', out_dir=str(tmp_path/m)) for m, a in METHODS.items()]
    specs += [dict(name=m + '+ac', method=m, method_args=METHODS[m], batch_size=2, parallel='fsdp', activation_checkpointing=True,
                   out_dir=str(tmp_path/(m + '-ac'))) for m in AC_METHODS]
    # continual pretraining as the 3B configs do it: a pretrained LLaMA with tied embeddings, wrapped with latent thoughts
    from latent_thoughts.core import build_lm
    base = tmp_path/'llama-tied'
    build_lm('llama', vocab_size=64, d_model=32, n_layer=2, n_head=2, max_positions=64, tie_word_embeddings=True).save_pretrained(base)
    specs.append(dict(name='cpt-tied+ac', method='latent', method_args=METHODS['latent'], init_from=str(base), batch_size=2,
                      parallel='fsdp', activation_checkpointing=True, out_dir=str(tmp_path/'cpt')))
    res, _ = run_worker(tmp_path, specs)
    for sp in specs:
        ref = toy_run(dict(sp, batch_size=4, parallel='ddp', activation_checkpointing=False, out_dir=str(tmp_path/'ref'/sp['name'])))
        got = res[sp['name']]
        assert got['sharded'] and got['local_params'] < 0.6 * got['params']   # each process holds about half of every tensor
        compare(f"{sp['name']}: FSDP 2 x 2 vs 1 x 4", got['losses'], ref['losses'])
        assert abs(got['eval_loss'] - ref['eval_loss']) <= FSDP_TOL
        assert got['losses'][-1] < got['losses'][0]
    m = load_method_lm(latest_checkpoint(tmp_path/'cpt')/'model')   # written by 2 processes: one model, embeddings still tied
    assert m.lm.lm_head.weight is m.lm.get_input_embeddings().weight
    assert abs(T.evaluate(m, toy_blocks(16, seed=1))['loss'] - res['cpt-tied+ac']['eval_loss']) < 1e-6

@pytest.mark.slow
def test_hybrid_sharding_on_four_processes(tmp_path):
    "HSDP: shard over groups of 2 processes, replicate across the 2 groups: the one-process losses, half of each tensor per process."
    specs = [dict(name='hsdp', method='latent', method_args=METHODS['latent'], batch_size=1, parallel='fsdp', fsdp_sharding='hybrid',
                  fsdp_shard_size=2, out_dir=str(tmp_path/'hsdp'), steps=3)]
    res, _ = run_worker(tmp_path, specs, nproc=4)
    got = res['hsdp']
    ref = toy_run(dict(specs[0], batch_size=4, parallel='ddp', out_dir=str(tmp_path/'ref')))
    assert got['mesh'] == [2, 2]
    assert 0.45 * got['params'] < got['local_params'] < 0.6 * got['params']   # sharded in 2, not 4
    compare('latent, HSDP 2 x 2 processes x batch 1 vs 1 x 4', got['losses'], ref['losses'])

@pytest.mark.slow
def test_kill_during_sharded_checkpoint_write_keeps_the_previous_one(tmp_path):
    "Rank 1 is SIGKILLed right after writing its optimizer shard of checkpoint 4: checkpoint 2 stays in force, loads, and resumes exactly."
    base = dict(method='latent', method_args=METHODS['latent'], batch_size=2, parallel='fsdp', steps=6, save_every=2)
    (tmp_path/'a').mkdir()
    run_worker(tmp_path/'a', [dict(base, name='ref', out_dir=str(tmp_path/'ref'))])
    cut = tmp_path/'cut'
    res, r = run_worker(tmp_path/'a', [dict(base, name='cut', out_dir=str(cut), die_in_save=[4, 1])], expect_ok=False)
    assert res is None and r.returncode != 0
    assert (cut/'checkpoints'/'.tmp-step_00000004'/'optimizer').is_dir()   # the write was under way...
    ck = latest_checkpoint(cut)
    assert ck.name == 'step_00000002'                                      # ...and never published
    # the previous one loads in one process, with the weights of the uninterrupted run at that step
    ev = lambda d: T.evaluate(load_method_lm(d/'model'), toy_blocks(16, seed=1))['loss']
    assert ev(ck) == ev(tmp_path/'ref'/'checkpoints'/'step_00000002')
    res, _ = run_worker(tmp_path/'a', [dict(base, name='cut', out_dir=str(cut), resume=True)])
    assert res['cut']['steps'] == [3, 4, 5, 6]
    a, b = losses(tmp_path/'ref'), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 7))
    compare('resumed after a kill in a checkpoint write', [a[s] for s in a], [b[s] for s in a], RESUME_TOL)
    assert not (cut/'checkpoints'/'.tmp-step_00000004').exists()

def _rank_pid(parent:int, rank:int) -> int|None:
    "The pid of the torchrun worker with RANK=`rank` among `parent`'s children."
    for p in Path('/proc').iterdir():
        if not p.name.isdigit(): continue
        try:
            if int((p/'stat').read_text().rsplit(')', 1)[1].split()[1]) != parent: continue
            if f'RANK={rank}'.encode() in (p/'environ').read_bytes().split(b'\0'): return int(p.name)
        except (OSError, IndexError, ValueError): continue
    return None

@pytest.mark.slow
def test_sigkill_of_one_rank_then_resume_is_exact(tmp_path):
    "A sharded latent run whose rank 1 is SIGKILLed mid-run, resumed with --resume, ends with the uninterrupted losses."
    args = ['-m', 'latent_thoughts.cli', 'train', '--config', 'micro', 'train.steps=10', 'train.progress=false',
            'data.eval_max_blocks=4', 'train.warmup=2', 'model.method=latent', 'model.method_args={n_thoughts: 1, train_iters: [2, 3]}',
            'data.block_size=64', 'data.batch_size=2', 'train.parallel=fsdp', 'train.save_every=3']
    ref, cut = tmp_path/'ref', tmp_path/'cut'
    r = torchrun(2, *args, f'train.out_dir={ref}'); assert r.returncode == 0, r.stderr[-4000:]
    p = torchrun(2, *args, f'train.out_dir={cut}', background=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while time.time() - t0 < 300:   # once step 5 is logged: checkpoint 3 exists, step 4-5 work is lost
        if (cut/'metrics.jsonl').exists() and max(losses(cut), default=0) >= 5: break
        if p.poll() is not None: pytest.fail('the run ended before it could be killed')
        time.sleep(0.05)
    pid = _rank_pid(p.pid, 1)
    assert pid, 'rank 1 not found'
    os.kill(pid, signal.SIGKILL)
    assert p.wait(timeout=120) != 0   # torchrun stops the other rank and fails
    killed_at = max(losses(cut))
    ck = latest_checkpoint(cut).name
    assert killed_at < 10 and int(ck[5:]) <= killed_at
    r = torchrun(2, *args, f'train.out_dir={cut}', '--resume'); assert r.returncode == 0, r.stderr[-4000:]
    assert f'resumed from {cut/"checkpoints"/ck} (step {int(ck[5:])})' in r.stdout
    a, b = losses(ref), losses(cut)
    assert sorted(a) == sorted(b) == list(range(1, 11))
    print(f'rank 1 killed after step {killed_at}, resumed from {ck}')
    compare('resumed after SIGKILL of rank 1', [a[s] for s in a], [b[s] for s in a], RESUME_TOL)

if __name__ == '__main__': worker(*sys.argv[1:])

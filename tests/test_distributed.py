"""Data-parallel training for real: 2 CPU processes (gloo, torchrun) vs one process with the same global batch."""
import json, os, shutil, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
DDP_TOL = 1e-5  # per-step loss, float32: only the order of the gradient all-reduce differs (measured ~1e-6)

def records(d):
    return [r for r in map(json.loads, (Path(d)/'metrics.jsonl').read_text().splitlines()) if 'loss' in r]

METHODS = {'vanilla': [],
           # pruning adaptive model: each process measures its own executed steps; the FLOPs log must use their mean
           'adaptive': ['model.method=adaptive', 'model.method_args={k_max: 3, router_bias: -1.0}']}

@pytest.mark.parametrize('method', list(METHODS))
def test_ddp_two_cpu_processes_match_single_process(tmp_path, method):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false'}
    args = ['train', '--config', 'micro', 'train.steps=6', 'train.progress=false', 'data.eval_max_blocks=8',
            'train.warmup=2', 'train.grad_accum=2', *METHODS[method]]
    torchrun = shutil.which('torchrun', path=str(Path(sys.executable).parent)) or shutil.which('torchrun')
    assert torchrun, 'torchrun not found'
    r = subprocess.run([torchrun, '--nproc_per_node', '2', '--master_port', '29517', '-m', 'latent_thoughts.cli', *args,
                        'data.batch_size=2', f'train.out_dir={tmp_path/"ddp"}'], cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = subprocess.run([sys.executable, '-m', 'latent_thoughts.cli', *args, 'data.batch_size=4', f'train.out_dir={tmp_path/"one"}'],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    ra, rb = records(tmp_path/'ddp'), records(tmp_path/'one')
    a, b = [x['loss'] for x in ra], [x['loss'] for x in rb]
    assert len(a) == len(b) == 6
    diff = max(abs(x - y) for x, y in zip(a, b))
    print(f'{method}: DDP (2 x batch 2, grad_accum 2) vs 1 process (batch 4, grad_accum 2): max |loss difference| {diff:.2e}')
    assert diff <= DDP_TOL
    assert a[-1] < a[0]  # it trains
    # the FLOPs log is the same: for the adaptive model, the executed steps are averaged over both processes
    fa, fb = [x['flops'] for x in ra], [x['flops'] for x in rb]
    assert max(abs(x / y - 1) for x, y in zip(fa, fb)) < 1e-6, (fa, fb)
    if method == 'adaptive':
        assert all(1 <= x['steps_executed'] <= 3 for x in ra) and ra[0]['steps_executed'] < 3   # pruned at the start
        assert max(abs(x['steps_executed'] - y['steps_executed']) for x, y in zip(ra, rb)) < 1e-6
    # the checkpoint was written once, by rank 0, with a loader/RNG state per process
    ck = sorted((tmp_path/'ddp'/'checkpoints').glob('step_*'))[-1]
    assert (ck/'rng_0.pt').exists() and (ck/'rng_1.pt').exists()

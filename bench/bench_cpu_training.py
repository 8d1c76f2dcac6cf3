"""CPU training speed of the micro preset: torch threads, two workers, batch size, torch.compile and bf16, in one run.

    nice -n 10 python bench/bench_cpu_training.py [--preset micro] [--steps 12] [--reps 3] [--json out.json]

For the vanilla model and latent thoughts (N=1, K sampled from {2, 3}) it times full training steps as the
trainer runs them (forward, backward, AdamW step) on one batch of real shape (batch x 128 tokens), and prints
training tokens per second of every setting and its ratio to the baseline (2 threads, batch 8, eager, fp32).
"2 workers x 1 thread" runs two single-threaded trainings at once (two processes) and counts the tokens of both:
what `latent-thoughts suite train --jobs 2` does with independent runs.
Settings are timed in interleaved rounds (medians), so load from other processes hits them alike; compile time
is reported apart (it is paid once per run and per new sequence length). The reproduction suite's micro
defaults (suite.yaml) use what this shows helps.
"""
import argparse, json, multiprocessing as mp, os, statistics, time, warnings

import torch

from latent_thoughts.config import ModelConfig, TrainConfig, build_model
from latent_thoughts.trainer import make_optimizer, compile_base

METHODS = {'vanilla': {}, 'latent': {'n_thoughts': 1, 'train_iters': [2, 3]}}


def make_step(method:str, preset:str, batch:int, seq:int, compile:bool=False, bf16:bool=False, seed:int=0):
    "A closure running one training step, and the seconds its construction (and compilation) took."
    t0 = time.perf_counter()
    model = build_model(ModelConfig(preset=preset, method=method, method_args=METHODS[method]), seed=seed, device='cpu')
    if compile: compile_base(model)
    opt = make_optimizer(model, TrainConfig())
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    def step():
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16):
            loss = model(ids, labels=ids).loss
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
    for _ in range(3 if compile else 1): step()   # warm-up; compiled: both stream lengths of K in {2, 3} and T/2T shapes
    return step, time.perf_counter() - t0


def timed(fn, steps:int, threads:int) -> float:
    torch.set_num_threads(threads)
    t = time.perf_counter()
    for _ in range(steps): fn()
    return (time.perf_counter() - t) / steps


def _worker(conn, barrier, method, preset, batch, seq):
    "A single-threaded training process: build once, then time `steps` steps whenever told (both workers start together)."
    warnings.filterwarnings('ignore')
    torch.set_num_threads(1)
    step, _ = make_step(method, preset, batch, seq)
    while True:
        steps = conn.recv()
        if steps is None: return
        barrier.wait()
        conn.send(timed(step, steps, 1))


class Workers:
    "Two (or `n`) single-threaded training processes timed together; aggregate tokens/s over them."
    def __init__(self, n, method, preset, batch, seq):
        ctx = mp.get_context('spawn')
        self.barrier, self.conns, self.procs = ctx.Barrier(n), [], []
        for _ in range(n):
            a, b = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(b, self.barrier, method, preset, batch, seq), daemon=True); p.start()
            self.conns.append(a); self.procs.append(p)
        self.tokens = batch * seq
    def __call__(self, steps):
        "Seconds per step of one worker-equivalent: 1 / (aggregate steps per second)."
        for c in self.conns: c.send(steps)
        per = [c.recv() for c in self.conns]
        return 1 / sum(1 / s for s in per)
    def close(self):
        for c in self.conns: c.send(None)
        for p in self.procs: p.join(timeout=30)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', default='micro', help='core.PRESETS name (default: %(default)s)')
    ap.add_argument('--seq', type=int, default=128, help='tokens per sequence (default: %(default)s, as configs/micro.yaml)')
    ap.add_argument('--steps', type=int, default=8, help='training steps per timing (default: %(default)s)')
    ap.add_argument('--reps', type=int, default=3, help='interleaved timing rounds; the median is reported (default: %(default)s)')
    ap.add_argument('--batches', default='8,16,32', help='batch sizes to compare (default: %(default)s)')
    ap.add_argument('--no-compile', action='store_true', help='skip the torch.compile settings')
    ap.add_argument('--json', default=None, help='also write the numbers here')
    a = ap.parse_args(argv)
    warnings.filterwarnings('ignore')
    n_threads = torch.get_num_threads()
    batches = [int(b) for b in a.batches.split(',')]
    settings = {}   # name -> (method, threads, batch, compile, bf16)
    for m in METHODS:
        for th in sorted({1, 2}):
            settings[f'{m} threads={th} batch=8'] = (m, th, 8, False, False)
        for b in batches:
            if b != 8: settings[f'{m} threads=2 batch={b}'] = (m, 2, b, False, False)
        settings[f'{m} 2 workers x 1 thread batch=8'] = (m, -2, 8, False, False)   # threads < 0: that many 1-thread workers
        settings[f'{m} threads=2 batch=8 bf16'] = (m, 2, 8, False, True)
        if not a.no_compile: settings[f'{m} threads=2 batch=8 compile'] = (m, 2, 8, True, False)
    t_start, load0 = time.perf_counter(), f"{os.getloadavg()[0]:.2f}"
    steps, build_s = {}, {}
    torch.set_num_threads(2)
    for name, (m, th, b, c, bf) in settings.items():
        if th < 0:
            t0 = time.perf_counter(); steps[name] = Workers(-th, m, a.preset, b, a.seq); build_s[name] = time.perf_counter() - t0
        else: steps[name], build_s[name] = make_step(m, a.preset, b, a.seq, compile=c, bf16=bf)
    times = {k: [] for k in settings}
    for _ in range(a.reps):
        for k, (m, th, b, c, bf) in settings.items():
            times[k].append(steps[k](a.steps) if th < 0 else timed(steps[k], a.steps, th))
    for k, (m, th, b, c, bf) in settings.items():
        if th < 0: steps[k].close()
    torch.set_num_threads(n_threads)
    rows = []
    for k, (m, th, b, c, bf) in settings.items():
        s = statistics.median(times[k])
        rows.append(dict(setting=k, method=m, threads=abs(th), workers=1 if th > 0 else -th, batch=b, compile=c, bf16=bf, s_per_step=s,
                         tokens_per_s=b * a.seq / s, setup_s=build_s[k]))
    base = {m: next(r for r in rows if r['method'] == m and r['threads'] == 2 and r['workers'] == 1 and r['batch'] == 8 and not r['compile']
                    and not r['bf16'])['tokens_per_s'] for m in METHODS}
    print(f"preset {a.preset}, {a.seq} tokens per sequence, {a.steps} steps x {a.reps} interleaved rounds (medians); "
          f"machine: {torch.get_num_threads()} torch threads by default, torch {torch.__version__}")
    print(f"load average before: {load0}; after: {os.getloadavg()[0]:.2f} (other processes share these cores)")
    print(f"{'setting':<36}{'ms/step':>9}{'tokens/s':>10}{'x baseline':>11}{'setup s':>9}")
    for r in rows:
        r['ratio'] = r['tokens_per_s'] / base[r['method']]
        print(f"{r['setting']:<36}{r['s_per_step']*1e3:>9.1f}{r['tokens_per_s']:>10.0f}{r['ratio']:>11.2f}{r['setup_s']:>9.1f}")
    lat = next(r for r in rows if r['setting'] == 'latent threads=2 batch=8')
    van = next(r for r in rows if r['setting'] == 'vanilla threads=2 batch=8')
    print(f"latent / vanilla time per step (threads 2, batch 8): {lat['s_per_step'] / van['s_per_step']:.2f}x")
    print(f"baseline = threads=2 batch=8, eager, fp32; total {time.perf_counter() - t_start:.0f} s")
    if a.json:
        with open(a.json, 'w') as f: json.dump({'preset': a.preset, 'seq': a.seq, 'rows': rows}, f, indent=2)
    return rows


if __name__ == '__main__': main()

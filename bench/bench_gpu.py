"""GPU throughput of latent thoughts vs vanilla: training tokens/s and MFU, decode tokens/s, in one run.

    python bench/bench_gpu.py [--preset pythia-160m] [--batch 4] [--seq-len 2048] [--compile] [--attn flash_attention_2]
    python bench/bench_gpu.py --preset micro --device cpu --steps 2      # CPU smoke test (seconds)

Training: vanilla and latent N=1 with K=2 and K=3 Jacobi passes (grad through every pass, as in the paper) on
the same Pythia-160M-shaped model, bf16 autocast over fp32 weights (what `train.mixed_precision=bf16` does),
AdamW and gradient clipping as in the trainer. Tokens/s counts input tokens (B x T), not stream entries.
MFU = tokens/s x model FLOPs per token (the FLOPs ledger, `latent_thoughts.flops.train_flops_per_token`,
causal attention included) / `--peak-flops` (default 989e12: H100 SXM dense bf16).
Decode: greedy `generate` at batch 1 and 8 after a prompt; decode tokens/s excludes the prompt's prefill
(latent: Jacobi to tolerance), which is timed separately.

Timings are medians over `--rounds` interleaved rounds (every configuration once per round, so drift and
other load hit all alike), after untimed warm-up steps (which absorb compilation). The paper's cost model
is printed next to the measured ratios: training 3 + 2K forward-pass equivalents for N=1 (7 for K=2, 9 for
K=3), inference 2x (N+1 stream entries per token), and its Table 3 throughput, 221.19 (vanilla) vs 111.55
(latent) tokens/s = 1.98x.

Without a CUDA GPU and without `--device`, the script says so and exits 0 (it is part of `make bench`).
No GPU figures have been measured with this script yet (it was written on a CPU-only machine).
"""
import argparse, copy, json, statistics, sys, time
from contextlib import nullcontext

import torch

from latent_thoughts.core import build_lm, preset_shape, PRESETS, VanillaLM
from latent_thoughts.latent import LatentThoughtLM
from latent_thoughts.attention import set_attention_backend, BACKENDS
from latent_thoughts.flops import flops_per_token, train_flops_per_token
from latent_thoughts.trainer import compile_base, make_optimizer
from latent_thoughts.config import TrainConfig

PAPER_TABLE3 = {'vanilla': 221.19, 'latent': 111.55}   # tokens/s, paper Table 3


def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)


def timed(fn, dev):
    sync(dev); t = time.perf_counter(); fn(); sync(dev)
    return time.perf_counter() - t


def interleaved(fns:dict, rounds:int, dev) -> dict:
    "Median seconds of each function over `rounds` rounds, every function once per round."
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items(): times[k].append(timed(f, dev))
    return {k: statistics.median(v) for k, v in times.items()}


def models(lm):
    "The configurations compared, each on its own copy of the same initial weights."
    return {'vanilla': VanillaLM(copy.deepcopy(lm)),
            'latent N=1 K=2': LatentThoughtLM(copy.deepcopy(lm), n_thoughts=1, train_iters=2),
            'latent N=1 K=3': LatentThoughtLM(copy.deepcopy(lm), n_thoughts=1, train_iters=3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--preset', default='pythia-160m', help=f"one of {', '.join(PRESETS)}")
    p.add_argument('--device', default=None, help='cuda (default when present) or cpu')
    p.add_argument('--batch', type=int, default=None, help='training sequences per step (cuda 4, cpu 2)')
    p.add_argument('--seq-len', type=int, default=None, help="training tokens per sequence (cuda: min(2048, the preset's context); cpu 64)")
    p.add_argument('--steps', type=int, default=5, help='timed training steps per configuration and round')
    p.add_argument('--warmup', type=int, default=None, help='untimed training steps first (cuda 3, cpu 1; absorb compilation)')
    p.add_argument('--rounds', type=int, default=None, help='interleaved rounds, median kept (cuda 3, cpu 1)')
    p.add_argument('--dtype', default=None, choices=['bf16', 'fp32'], help='autocast dtype (cuda bf16, cpu fp32)')
    p.add_argument('--attn', default='sdpa', choices=BACKENDS, help='attention backend (model.attn_implementation)')
    p.add_argument('--compile', action='store_true', help='torch.compile the base model (train.compile)')
    p.add_argument('--peak-flops', type=float, default=989e12, help='peak FLOP/s for MFU (default: H100 SXM dense bf16)')
    p.add_argument('--prompt', type=int, default=None, help='decode: prompt tokens (cuda 128, cpu 8)')
    p.add_argument('--new', type=int, default=None, help='decode: new tokens (cuda 128, cpu 4)')
    p.add_argument('--decode-batches', default='1,8', help='decode batch sizes')
    p.add_argument('--json', default=None, help='also write the numbers here')
    a = p.parse_args(argv)
    if a.device is None and not torch.cuda.is_available():
        print("bench_gpu: no CUDA GPU here: nothing measured (pass --device cpu for a smoke run)")
        return None
    dev = torch.device(a.device or 'cuda')
    gpu = dev.type == 'cuda'
    ctx = PRESETS[a.preset][5] if a.preset in PRESETS else 2048
    batch = a.batch or (4 if gpu else 2)
    seq = a.seq_len or (min(2048, ctx) if gpu else 64)
    warmup = a.warmup if a.warmup is not None else (3 if gpu else 1)
    rounds = a.rounds or (3 if gpu else 1)
    dtype = a.dtype or ('bf16' if gpu else 'fp32')
    prompt, new = a.prompt or (128 if gpu else 8), a.new or (128 if gpu else 4)
    dec_batches = [int(b) for b in a.decode_batches.split(',') if b]
    amp = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if dtype == 'bf16' else nullcontext

    lm = build_lm(**preset_shape(a.preset)).to(dev)
    set_attention_backend(lm, a.attn, dev)
    ms = models(lm)
    del lm
    for m in ms.values():
        if a.compile: compile_base(m)
    V = ms['vanilla'].config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (batch, seq), generator=g).to(dev)
    name = torch.cuda.get_device_name(dev) if gpu else 'cpu'
    prec = 'bf16 autocast' if dtype == 'bf16' else 'fp32'
    print(f"{a.preset} on {name}: train batch {batch}x{seq}, {prec}, attention {a.attn}, compile {a.compile}, "
          f"{warmup} warm-up + {rounds} round(s) x {a.steps} steps, torch {torch.__version__}", flush=True)

    # -- training
    tc = TrainConfig(lr=1e-6)
    opts = {k: make_optimizer(m, tc) for k, m in ms.items()}
    def step(k):
        m, opt = ms[k], opts[k]
        def f():
            for _ in range(a.steps):
                with amp(): loss = m(ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
                opt.step(); opt.zero_grad(set_to_none=True)
        return f
    peak_mem = {}
    for k, m in ms.items():
        m.train()
        if gpu: torch.cuda.reset_peak_memory_stats(dev)
        t = time.perf_counter()
        for _ in range(warmup):
            with amp(): loss = m(ids, labels=ids).loss
            loss.backward(); opts[k].zero_grad(set_to_none=True)
        sync(dev)
        if gpu: peak_mem[k] = torch.cuda.max_memory_allocated(dev) / 2**30
        print(f"  warm-up {k}: {time.perf_counter() - t:.1f} s", flush=True)
    train_s = interleaved({k: step(k) for k in ms}, rounds, dev)
    rows = {}
    for k, m in ms.items():
        tok_s = batch * seq * a.steps / train_s[k]
        f = train_flops_per_token(m, seq_len=seq)
        led = flops_per_token(m, seq_len=seq)
        rows[k] = dict(train_tokens_per_s=tok_s, train_flops_per_token=f, mfu=tok_s * f / a.peak_flops,
                       ledger_train_ratio=led['training_ratio'], paper_train_ratio=led['paper_training_ratio'],
                       peak_mem_gib=peak_mem.get(k))
    for m in ms.values():   # free the training state before decoding
        m.zero_grad(set_to_none=True)
    del opts
    if gpu: torch.cuda.empty_cache()

    # -- decoding
    dec = {}
    for b in dec_batches:
        pr = torch.randint(1, V, (b, prompt), generator=g).to(dev)
        am = torch.ones_like(pr)
        def gen(m):
            def f():
                with torch.no_grad(), amp(): m.generate(pr, max_new_tokens=new)
            return f
        def pre(m):
            def f():
                with torch.no_grad(), amp(): m.prefill(pr, am)
            return f
        for m in ms.values(): m.eval(); gen(m)()            # warm-up (and compilation) at this shape
        fns = {('gen', k): gen(m) for k, m in ms.items() if k != 'latent N=1 K=3'}   # K is a training choice
        fns.update({('pre', k): pre(m) for k, m in ms.items() if k != 'latent N=1 K=3'})
        t = interleaved(fns, rounds, dev)
        for k in ms:
            if ('gen', k) not in t: continue
            # generate = prefill + (new - 1) decode steps (the first new token comes from the prefill's logits)
            dt = max(t[('gen', k)] - t[('pre', k)], 1e-9)
            dec[(k, b)] = dict(decode_tokens_per_s=b * (new - 1) / dt, prefill_s=t[('pre', k)], generate_s=t[('gen', k)])

    # -- report
    v = rows['vanilla']
    print(f"\ntraining ({batch}x{seq} tokens per step; MFU at peak {a.peak_flops:.3g} FLOP/s)")
    print(f"{'method':16s} {'tokens/s':>10s} {'GFLOP/tok':>10s} {'MFU':>6s} {'time x':>7s} {'ledger x':>9s} {'paper 3+2K':>11s} {'peak GiB':>9s}")
    for k, r in rows.items():
        r['time_ratio'] = v['train_tokens_per_s'] / r['train_tokens_per_s']
        mem = f"{r['peak_mem_gib']:9.1f}" if r['peak_mem_gib'] is not None else f"{'-':>9s}"
        print(f"{k:16s} {r['train_tokens_per_s']:10.0f} {r['train_flops_per_token']/1e9:10.3f} {r['mfu']:6.1%} "
              f"{r['time_ratio']:7.2f} {r['ledger_train_ratio']:9.2f} {r['paper_train_ratio']:11.2f} {mem}")
    print(f"\ndecoding (greedy, {prompt}-token prompt, {new} new tokens; prefill timed apart)")
    print(f"{'method':16s} {'batch':>5s} {'tokens/s':>10s} {'time x':>7s} {'paper':>6s} {'Table 3':>8s} {'prefill s':>10s}")
    t3 = PAPER_TABLE3['vanilla'] / PAPER_TABLE3['latent']
    for (k, b), r in dec.items():
        r['time_ratio'] = dec[('vanilla', b)]['decode_tokens_per_s'] / r['decode_tokens_per_s']
        paper, tab = (1.0, 1.0) if k == 'vanilla' else (2.0, t3)
        print(f"{k.replace(' K=2', ''):16s} {b:5d} {r['decode_tokens_per_s']:10.1f} {r['time_ratio']:7.2f} {paper:6.2f} {tab:8.2f} {r['prefill_s']:10.3f}")
    print(f"(paper Table 3: vanilla {PAPER_TABLE3['vanilla']} vs latent {PAPER_TABLE3['latent']} tokens/s)")
    out = dict(preset=a.preset, device=name, batch=batch, seq_len=seq, dtype=dtype, attn=a.attn, compile=a.compile,
               peak_flops=a.peak_flops, steps=a.steps, rounds=rounds, train=rows,
               decode={f"{k} b={b}": r for (k, b), r in dec.items()}, prompt=prompt, new=new)
    if a.json:
        with open(a.json, 'w') as f: json.dump(out, f, indent=1)
    return out


if __name__ == '__main__': main()

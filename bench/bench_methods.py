"""Time one training step and greedy decoding for every method on the same base model and batch, in one
run, and print the measured ratios to vanilla next to the FLOPs ledger's (`python bench/bench_methods.py`).

CPU defaults (tiny preset, batch 4 x 128 tokens, decode 16 tokens at batch 1, 3 rounds) take 1-2 minutes on 2
idle cores. Methods are timed round-robin (every method once per round) and the minimum over rounds is kept, so
that load from other processes, which only ever adds time, biases all methods alike and as little as possible.
The first round is a warm-up (first calls at each new shape cost seconds on CPU) and is not timed.

Measured with `--reps 8 --threads 1` on a shared 2-core machine (load 3-7 from other processes; with 2 threads under
such load OpenMP threads wait on each other and two runs at the default settings gave meaningless ratios, e.g. vanilla
slower than pause M=1: on a loaded machine use `--threads 1`), tiny preset, ratios to vanilla (ledger = detailed count,
paper = pass count):

    method                train x  ledger  paper | decode x  ledger  paper
    pause M=1                1.58    1.71   2.00 |     1.28    1.71   2.00
    pause M=3                3.61    3.43   4.00 |     1.46    3.43   4.00
    looped L=2               1.85    1.62   2.00 |     2.33    1.62   2.00
    looped L=4               2.84    2.86   4.00 |     5.17    2.86   4.00
    pondering P=1            2.33    2.38   2.00 |     2.92    2.38   2.00
    pondering P=3            6.34    5.14   4.00 |     6.29    5.14   4.00
    latent N=1 K=2           5.13    5.00   7.00 |     4.21    1.71   2.00
    latent N=1 K=3           7.17    6.33   9.00 |     3.73    1.71   2.00
    latent N=2 K=2 grow      9.44    8.76  12.00 |     3.94    2.52   3.00
    latent N=2 K=2 plain     7.89    7.43  10.00 |     3.85    2.52   3.00
    adaptive Kmax=2          1.92    1.79   2.00 |     2.03    1.67   2.00
    adaptive Kmax=4          3.22    3.53   4.00 |     3.85    3.15   4.00

Training time follows the detailed count within 15% for every row but pondering P=3 (6.3x vs 5.1x: four full-vocabulary
softmaxes per step, whose elementwise work the ledger does not count, weigh a lot next to a 128-wide model); the
largest other gaps (looped L=2 +14%, latent K=3 +13%) are per-pass work the ledger does not count (norms, rotary,
mask building, Python), which scales with the number of passes. The
growing first estimate of N=2 ('grow') costs 9.4x against 7.9x for 'plain', as the ledger says (8.8x vs 7.4x). At this
size the paper's pass count overstates latent training (7x/9x/12x): its Jacobi passes skip the vocabulary projection,
which dominates FLOPs here; at LLaMA-1.4B scale the detailed count is 3 + 2K within 3% (`latent-thoughts flops`).

Decoding at batch 1 on a tiny model is latency-bound: time follows the number of *sequential* forward calls per new
token, not FLOPs. Pause feeds the token and its M pauses as one block (1 call: 1.3x/1.5x against 1.7x/3.4x of FLOPs);
looped needs L calls, pondering P+1, latent N+1, adaptive one per executed step. Latent decoding also pays its prompt
prefill (Jacobi to tolerance), which the per-token ledger does not count.
"""
import argparse, statistics, time
import torch
from latent_thoughts.core import build_lm, preset_shape, VanillaLM
from latent_thoughts.baselines import PauseLM, LoopedLM, PonderingLM
from latent_thoughts.flops import flops_per_token

def methods(lm):
    out = [('vanilla', VanillaLM(lm)), ('pause M=1', PauseLM(lm, n_pause=1)), ('pause M=3', PauseLM(lm, n_pause=3)),
           ('looped L=2', LoopedLM(lm, n_loops=2)), ('looped L=4', LoopedLM(lm, n_loops=4)),
           ('pondering P=1', PonderingLM(lm, n_ponder=1)), ('pondering P=3', PonderingLM(lm, n_ponder=3))]
    try:
        from latent_thoughts.latent import LatentThoughtLM
        out += [('latent N=1 K=2', LatentThoughtLM(lm, n_thoughts=1, train_iters=2)),
                ('latent N=1 K=3', LatentThoughtLM(lm, n_thoughts=1, train_iters=3)),
                ('latent N=2 K=2 grow', LatentThoughtLM(lm, n_thoughts=2, train_iters=2, thought_init='grow')),
                ('latent N=2 K=2 plain', LatentThoughtLM(lm, n_thoughts=2, train_iters=2, thought_init='plain'))]
    except ImportError as e: print(f"(latent skipped: {e})")
    try:
        from latent_thoughts.adaptive import AdaptiveLatentLM
        out += [('adaptive Kmax=2', AdaptiveLatentLM(lm, k_max=2)), ('adaptive Kmax=4', AdaptiveLatentLM(lm, k_max=4))]
    except ImportError as e: print(f"(adaptive skipped: {e})")
    return out

def sync(device):
    if device.type == 'cuda': torch.cuda.synchronize()

def timed(fn, device):
    sync(device); t = time.perf_counter(); fn(); sync(device)
    return time.perf_counter() - t

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--preset', default='tiny'); p.add_argument('--batch', type=int, default=4)
    p.add_argument('--seq-len', type=int, default=128); p.add_argument('--reps', type=int, default=3)
    p.add_argument('--prompt', type=int, default=16); p.add_argument('--new', type=int, default=16)
    p.add_argument('--threads', type=int, default=2); p.add_argument('--device', default='cpu')
    p.add_argument('--verbose', action='store_true', help='print the warm-up times')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    lm = build_lm(**preset_shape(a.preset)).to(dev)
    V = lm.config.vocab_size
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(1, V, (a.batch, a.seq_len), generator=g).to(dev)
    prompt = torch.randint(1, V, (1, a.prompt), generator=g).to(dev)
    ms = methods(lm)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-6) for name, m in ms}
    def step(name, m):
        m.train()
        loss = m(batch, labels=batch).loss
        opts[name].zero_grad(set_to_none=True); loss.backward(); opts[name].step()
    def dec(m):
        m.eval()
        with torch.no_grad(): m.generate(prompt, max_new_tokens=a.new)
    times = {name: ([], []) for name, _ in ms}
    for r in range(a.reps + 1):                    # round 0 is the warm-up
        for name, m in ms:
            tt, td = timed(lambda: step(name, m), dev), timed(lambda: dec(m), dev)
            if not r and a.verbose: print(f"warm-up {name}: train {tt:.2f} s, decode {td:.2f} s", flush=True)
            if r: times[name][0].append(tt); times[name][1].append(td)
    rows = [(name, min(times[name][0]), min(times[name][1]), flops_per_token(m, seq_len=a.seq_len)) for name, m in ms]
    v_train, v_dec = rows[0][1], rows[0][2]
    print(f"\n{a.preset} on {a.device}, train step batch {a.batch}x{a.seq_len}, greedy decode {a.new} tokens after a "
          f"{a.prompt}-token prompt (batch 1), {a.threads} threads, min of {a.reps} round-robin rounds")
    print(f"{'method':20s} {'train s':>8s} {'train x':>8s} {'ledger':>7s} {'paper':>6s} | {'decode s':>9s} {'decode x':>9s} {'ledger':>7s} {'paper':>6s}")
    for name, tt, td, r in rows:
        print(f"{name:20s} {tt:8.3f} {tt / v_train:8.2f} {r['training_ratio']:7.2f} {r['paper_training_ratio']:6.2f} | "
              f"{td:9.3f} {td / v_dec:9.2f} {r['inference_ratio']:7.2f} {r['paper_inference_ratio']:6.2f}")
    return rows

if __name__ == '__main__': main()

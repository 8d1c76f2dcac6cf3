"""Mixture-of-Recursions against vanilla and the looped transformer on the same base model, in one run: one
training step (tokens/s) and greedy KV-cached decoding (new tokens/s), with the time ratios to vanilla next to the
FLOPs ledger's (`python bench/bench_mor.py`; CPU defaults: tiny preset, batch 4 x 128, 12 new tokens after a
16-token prompt at batch 1, 3 rounds; under a minute).

Methods are timed round-robin (each once per round), the first round is an untimed warm-up, the minimum over
rounds is kept. On CPU the clock is this process's CPU time (`time.process_time`) with one thread by default: on
a shared machine wall time mostly measures the other processes (at load ~9 on 2 cores, wall-clock ratios came
out in any order), the CPU time of one thread much less. On CUDA it is synchronised wall time. The ledger's
inference ratio for MoR uses the recursion fractions the model measured on the text it decoded (threshold
routing); its training ratio the capacities (expert choice) or the fractions measured on the batch (token choice).

Measured (defaults, 38 s wall on 2 cores shared at load ~11; repeated runs move the ratios by up to ~20%):

    method               train tok/s  train x  ledger | decode tok/s  decode x  ledger  recursions/token (decode)
    vanilla                     5248     1.00    1.00 |        340.2      1.00    1.00
    looped L=2                  3442     1.52    1.62 |        167.6      2.03    1.62
    looped L=3                  2146     2.45    2.24 |        131.3      2.59    2.24
    mor expert N=3              3428     1.53    1.30 |        186.6      1.82    1.30  2.00
    mor token N=3               3547     1.48    1.30 |        190.6      1.78    1.23  1.79
    mor all-routed N=3          3320     1.58    1.62 |        172.6      1.97    1.62  3.00

MoR N=3 (middle-cycle over the tiny preset's 4 layers: the block is layers 1-2) runs 1 + 2 x sum(f_r) + 1 layer
passes per token: 6 with the default capacities (1, 2/3, 1/3), 8 when every token runs every recursion (the
layer passes of looped L=2, and the two time alike). Routing saves less time than FLOPs here (about 1.5x against
the ledger's 1.3x in training): each recursion adds a router, a top-k, a gather/scatter and a mask, which on a
128-wide model cost about what the skipped tokens save. Decoding at batch 1 is latency-bound: its time follows
the sequential layer calls per new token (2 + 2 x the recursions it runs, here), not FLOPs. On CPU, tok/s are
tokens per CPU second.
"""
import argparse, time
import torch
from latent_thoughts.core import build_lm, preset_shape, VanillaLM
from latent_thoughts.baselines import LoopedLM
from latent_thoughts.mor import MoRLM
from latent_thoughts.flops import flops_per_token

def methods(lm):
    return [('vanilla', VanillaLM(lm)), ('looped L=2', LoopedLM(lm, n_loops=2)), ('looped L=3', LoopedLM(lm, n_loops=3)),
            ('mor expert N=3', MoRLM(lm, n_recursions=3)), ('mor token N=3', MoRLM(lm, n_recursions=3, routing='token')),
            ('mor all-routed N=3', MoRLM(lm, n_recursions=3, capacity=[1, 1, 1]))]

def timed(fn, device):
    "Seconds `fn` takes: CPU time of this process on CPU, synchronised wall time on CUDA."
    clock = time.perf_counter if device.type == 'cuda' else time.process_time
    if device.type == 'cuda': torch.cuda.synchronize()
    t = clock(); fn()
    if device.type == 'cuda': torch.cuda.synchronize()
    return clock() - t

def fractions(m, ids):
    "Fractions of tokens that ran each recursion (MoR) on `ids`, in the model's current mode."
    with torch.no_grad(): met = m(ids).metrics
    return [met[f'mor_frac_r{r + 1}'] for r in range(m.n_recursions)]

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument('--preset', default='tiny'); p.add_argument('--batch', type=int, default=4)
    p.add_argument('--seq-len', type=int, default=128); p.add_argument('--reps', type=int, default=3)
    p.add_argument('--prompt', type=int, default=16); p.add_argument('--new', type=int, default=12)
    p.add_argument('--threads', type=int, default=1); p.add_argument('--device', default='cpu')
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    dev = torch.device(a.device)
    lm = build_lm(**preset_shape(a.preset)).to(dev)
    g = torch.Generator().manual_seed(0)
    batch = torch.randint(1, lm.config.vocab_size, (a.batch, a.seq_len), generator=g).to(dev)
    prompt = torch.randint(1, lm.config.vocab_size, (1, a.prompt), generator=g).to(dev)
    ms = methods(lm)
    opts = {name: torch.optim.AdamW(m.parameters(), lr=1e-6) for name, m in ms}
    gens = {}
    def step(name, m):
        m.train(); loss = m(batch, labels=batch).loss
        opts[name].zero_grad(set_to_none=True); loss.backward(); opts[name].step()
    def dec(name, m):
        m.eval()
        with torch.no_grad(): gens[name] = m.generate(prompt, max_new_tokens=a.new)
    times = {name: ([], []) for name, _ in ms}
    for r in range(a.reps + 1):                    # round 0 is the warm-up
        for name, m in ms:
            tt, td = timed(lambda: step(name, m), dev), timed(lambda: dec(name, m), dev)
            if r: times[name][0].append(tt); times[name][1].append(td)
    rows = []
    for name, m in ms:
        kw = {}
        if isinstance(m, MoRLM):
            kw['step_fractions'] = fractions(m.eval(), gens[name])
            if m.routing == 'token': kw['train_step_fractions'] = fractions(m.train(), batch)
        rows.append((name, min(times[name][0]), min(times[name][1]), flops_per_token(m, seq_len=a.seq_len, **kw), kw))
    v_train, v_dec = rows[0][1], rows[0][2]
    n_train, n_dec = batch.numel(), a.new
    clock = 'CPU time' if dev.type == 'cpu' else 'wall time'
    print(f"\n{a.preset} on {a.device} ({clock}): train step {a.batch}x{a.seq_len}, greedy decode {a.new} tokens after a {a.prompt}-token "
          f"prompt (batch 1), {a.threads} threads, min of {a.reps} round-robin rounds; x = time ratio to vanilla")
    print(f"{'method':20s} {'train tok/s':>11s} {'train x':>8s} {'ledger':>7s} | {'decode tok/s':>12s} {'decode x':>9s} {'ledger':>7s}  recursions/token (decode)")
    for name, tt, td, r, kw in rows:
        steps = f"{sum(kw['step_fractions']):.2f}" if 'step_fractions' in kw else ''
        print(f"{name:20s} {n_train / tt:11.0f} {tt / v_train:8.2f} {r['training_ratio']:7.2f} | "
              f"{n_dec / td:12.1f} {td / v_dec:9.2f} {r['inference_ratio']:7.2f}  {steps}")
    return rows

if __name__ == '__main__': main()

"""Adaptive latent CoT: training step time and inference tokens/s, K_max = 4, with pruning ÷ without ÷ fixed depth.

One run (< 3 min on 2 CPU cores):
1. micro training: a plain AdamW loop on shakespeare train blocks of 64 tokens (random tokens if the data
   module is missing) of an adaptive model with pruning; then the average latent steps per token on the
   validation split at the model's halt threshold tau;
2. with the trained weights, the time of one training step (forward + backward + AdamW) and greedy
   decoding tokens/s for: pruning on (prune_threshold), pruning off (threshold 0 = all K steps),
   fixed depth (router='none': all K steps, no router, no adaptive loss: the same parallel-masked latent CoT
   without adaptivity), and, for orientation, the Jacobi-trained LatentThoughtLM with K-1 thoughts and the
   vanilla model. Ratios are of medians measured in this run.

Usage: python bench/bench_adaptive.py [--steps 300] [--batch 8] [--k-max 4] [--prune 0.1] [--tau 0.1]
"""
import argparse, copy, statistics, time

import torch

from latent_thoughts.core import build_lm, VanillaLM
from latent_thoughts.adaptive import AdaptiveLatentLM, latent_step_stats


def timed(fn, reps):
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def train_step_fn(model, batch, **kw):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    def step():
        out = model(batch, labels=batch, **kw)
        out.loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        return out
    return step


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--steps', type=int, default=300); ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--block', type=int, default=64); ap.add_argument('--k-max', type=int, default=4)
    ap.add_argument('--prune', type=float, default=0.1); ap.add_argument('--tau', type=float, default=0.1)
    ap.add_argument('--adaptive-weight', type=float, default=0.1)
    ap.add_argument('--reps', type=int, default=5); ap.add_argument('--new-tokens', type=int, default=32)
    ap.add_argument('--threads', type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t_start = time.perf_counter()

    try:
        from latent_thoughts.data import get_blocks, get_tokenizer
        train, val = get_blocks('shakespeare', 'train', block_size=a.block), get_blocks('shakespeare', 'validation', block_size=a.block)
        vocab, source = len(get_tokenizer()), 'shakespeare (latent_thoughts.data, embedded BPE tokenizer)'
        g = torch.Generator().manual_seed(0)
        get_train = lambda: train.batch(torch.randint(0, len(train), (a.batch,), generator=g).tolist())
        val_ids = val.batch(list(range(0, min(len(val), 64))))
    except ImportError:
        vocab, source = 4096, 'random tokens (latent_thoughts.data not available)'
        g = torch.Generator().manual_seed(0)
        get_train = lambda: torch.randint(0, vocab, (a.batch, a.block), generator=g)
        val_ids = torch.randint(0, vocab, (64, a.block), generator=g)

    shape = dict(d_model=64, n_layer=2, n_head=4, vocab_size=vocab, max_positions=512)   # the 'micro' preset
    lm = build_lm('gpt_neox', seed=0, **shape)
    model = AdaptiveLatentLM(lm, k_max=a.k_max, prune_threshold=a.prune, halt_threshold=a.tau, adaptive_weight=a.adaptive_weight)
    print(f'data: {source}; model: gpt_neox micro {shape}, K_max={a.k_max}, prune_threshold={a.prune}, tau={a.tau}, '
          f'adaptive_weight={a.adaptive_weight}; torch threads={a.threads}')

    # 1. micro training run
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train(); t0 = time.perf_counter(); log = []
    for s in range(a.steps):
        out = model(b := get_train(), labels=b)
        out.loss.backward(); torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=True)
        if s % 50 == 0 or s == a.steps - 1:
            log.append((s, out.metrics['ce'], out.metrics.get('adaptive_loss', 0.0), out.metrics['steps_executed'], out.metrics['compute_frac']))
    train_s = time.perf_counter() - t0
    print(f'\nmicro training: {a.steps} AdamW steps of batch {a.batch}x{a.block} in {train_s:.1f} s')
    print(' step      ce  adaptive  steps/token(executed)  compute_frac')
    for s, ce, ad, st, cf in log: print(f'{s:5d}  {ce:6.3f}  {ad:8.4f}  {st:21.3f}  {cf:12.3f}')

    model.eval()
    with torch.no_grad():
        vs = latent_step_stats(model, val_ids, threshold=a.tau)
        v0 = model(val_ids, labels=val_ids, threshold=0.0).metrics
        vt = model(val_ids, labels=val_ids, threshold=a.tau).metrics
    print(f'\nvalidation ({val_ids.shape[0]} blocks of {a.block}): latent steps per token at tau={a.tau}: '
          f'{vs["mean_steps"]:.3f} executed, {vs["expected_steps"]:.3f} expected (sum_k k p_exit); '
          f'distribution over k=1..{a.k_max}: {[round(x, 3) for x in vs["distribution"]]}')
    print(f'validation CE: all K steps {v0["ce"]:.4f}; halting at tau {vt["ce"]:.4f}; '
          f'FLOPs/token ratio tau/all = {vt["flops_per_token"] / v0["flops_per_token"]:.3f}')

    # 2. timings with the trained weights
    fixed = AdaptiveLatentLM(copy.deepcopy(model.lm), k_max=a.k_max, router='none')
    variants = {'adaptive, pruning on': (model, dict(threshold=a.prune)),
                'adaptive, pruning off': (model, dict(threshold=0.0)),
                'fixed depth (router none)': (fixed, {})}
    try:
        from latent_thoughts.latent import LatentThoughtLM
        variants[f'LatentThoughtLM N={a.k_max - 1} (Jacobi, K=3)'] = (LatentThoughtLM(copy.deepcopy(model.lm), n_thoughts=a.k_max - 1, train_iters=3, eval_iters=3), {})
    except ImportError: print('(latent_thoughts.latent not available: no Jacobi comparison)')
    variants['vanilla'] = (VanillaLM(copy.deepcopy(model.lm)), {})

    # interleaved rounds: on a shared machine, load changes hit every variant alike; medians per variant
    batch, prompt = get_train(), val_ids[:1, :16]
    steps, gens, gen_kws, t_train, t_gen = {}, {}, {}, {n: [] for n in variants}, {n: [] for n in variants}
    for name, (m, kw) in variants.items():
        m.train(); steps[name] = train_step_fn(m, batch, **kw); steps[name]()     # warm-up (and optimizer state)
        gen_kws[name] = {'threshold': a.tau} if name == 'adaptive, pruning on' else \
                        ({'threshold': 0.0} if name == 'adaptive, pruning off' else {})
    for r in range(a.reps):
        for name, (m, kw) in variants.items():
            m.train(); t_train[name].append(timed(steps[name], 1))
            m.eval(); t_gen[name].append(timed(lambda: m.generate(prompt, max_new_tokens=a.new_tokens, **gen_kws[name]), 1))
    res = {n: (statistics.median(t_train[n]), a.new_tokens / statistics.median(t_gen[n])) for n in variants}
    # the training steps above changed the weights of 'pruning on/off' alike; steps/token of the generation runs:
    with torch.no_grad():
        model.eval(); _, st = model.prefill(prompt, torch.ones_like(prompt), threshold=a.tau)
        for t in range(8): _, st = model.decode(val_ids[:1, 16 + t], st)
    print(f'(decode at tau={a.tau}: latent steps of 8 teacher-forced tokens {torch.stack(st["steps"][1:], 1)[0].tolist()})')
    print(f'\ntimings (median of {a.reps}; train step = fwd+bwd+AdamW on {a.batch}x{a.block}; '
          f'decode = greedy, batch 1, 16-token prompt, {a.new_tokens} new tokens; halting at tau={a.tau} only for "pruning on")')
    ref_t, ref_g = res['adaptive, pruning off']
    print(f'{"variant":38s} {"train step ms":>13s} {"÷ no-prune":>10s} {"decode tok/s":>12s} {"÷ no-prune":>10s}')
    for name, (t, gps) in res.items():
        print(f'{name:38s} {1e3 * t:13.1f} {t / ref_t:10.3f} {gps:12.1f} {gps / ref_g:10.3f}')
    tp, gp = res['adaptive, pruning on']; tf, gf = res['fixed depth (router none)']
    print(f'\nratios: train step time  pruning on ÷ off ÷ fixed depth = {tp / ref_t:.3f} : 1 : {tf / ref_t:.3f}')
    print(f'        decode tokens/s   pruning on ÷ off ÷ fixed depth = {gp / ref_g:.3f} : 1 : {gf / ref_g:.3f}')
    print(f'total wall time {time.perf_counter() - t_start:.1f} s')


if __name__ == '__main__':
    main()

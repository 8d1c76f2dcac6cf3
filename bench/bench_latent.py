"""Latent thoughts vs vanilla, measured in one run: training step, greedy decode, prompt prefill.

    python bench/bench_latent.py [--preset tiny] [--batch 8] [--seq 128] [--reps 3] [--json out.json]

Prints ratios next to their theory: training step (forward + backward) ÷ vanilla against the paper's
3 + 2K (and against a prediction that counts the LM head, which both models compute once on T
positions), decode tokens/s ÷ vanilla (ideal 0.5 for N = 1), and prefill of a 256-token prompt by
Jacobi-to-tolerance ÷ one stream entry at a time. Timings are medians over `reps` rounds, each round
timing every configuration once (so load from other processes hits them alike).
"""
import argparse, json, statistics, sys, time

import torch

from latent_thoughts import LatentThoughtLM, VanillaLM, build_lm, preset_shape, sequential_hidden


def timed(fn):
    t = time.perf_counter(); fn(); return time.perf_counter() - t


def rounds(fns:dict, reps:int) -> dict:
    "Median seconds per configuration; one warm-up call each, then `reps` interleaved rounds."
    for f in fns.values(): f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items(): times[k].append(timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--preset', default='tiny'); ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--seq', type=int, default=128); ap.add_argument('--reps', type=int, default=3)
    ap.add_argument('--new-tokens', type=int, default=32); ap.add_argument('--prompt', type=int, default=256)
    ap.add_argument('--threads', type=int, default=0, help='torch threads (0: leave as is)')
    ap.add_argument('--json', default=None, help='also write the numbers here')
    a = ap.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    shape = preset_shape(a.preset)
    lm = build_lm(**shape)
    V, d = shape['vocab_size'], shape['d_model']
    body = sum(p.numel() for n, p in lm.base_model.named_parameters() if 'emb' not in n and 'wte' not in n and 'wpe' not in n)
    head = V * d
    print(f"preset {a.preset}: d={d} layers={shape['n_layer']} vocab={V}; body {body/1e6:.2f}M params, head {head/1e6:.2f}M "
          f"(head share of a vanilla forward: {head/(body+head):.0%}); torch threads {torch.get_num_threads()}")
    res = {'preset': a.preset, 'batch': a.batch, 'seq': a.seq}

    # -- training step: forward + backward, same base model and batch
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (a.batch, a.seq), generator=g)
    def step(m, **kw):
        def f():
            m.zero_grad(set_to_none=True)
            m(ids, labels=ids, **kw).loss.backward()
        return f
    van = VanillaLM(lm).train()
    fns = {'vanilla': step(van)}
    for K in (2, 3):
        for mode in ('all', 'last'):
            fns[f'K={K} {mode}'] = step(LatentThoughtLM(lm, n_thoughts=1, grad_mode=mode).train(), jacobi_iters=K)
    t = rounds(fns, a.reps)
    print(f"\ntraining step (B={a.batch}, T={a.seq}, N=1), forward+backward, ÷ vanilla ({t['vanilla']*1e3:.0f} ms):")
    print(f"  {'config':12s} {'measured':>9s} {'paper 3+2K':>11s} {'theory(no head)':>16s} {'theory(+head)':>14s}")
    res['train'] = {'vanilla_s': t['vanilla']}
    for k in fns:
        if k == 'vanilla': continue
        K, mode = int(k[2]), k.split()[1]
        passes = 3 + 2 * K
        if mode == 'all': th, thh = passes, (body * passes + head) / (body + head)
        else: th, thh = (passes + 4) / 3, (body * passes + head + 2 * (2 * body + head)) / (3 * (body + head))
        r = t[k] / t['vanilla']
        res['train'][k] = dict(ratio=r, paper=passes, theory=th, theory_head=thh, seconds=t[k])
        print(f"  {k:12s} {r:9.2f} {passes:11d} {th:16.2f} {thh:14.2f}")

    # -- greedy decode tokens/s, N=1 vs vanilla, batch 1 and 8
    lat = LatentThoughtLM(lm, n_thoughts=1).eval()
    van.eval()
    res['decode'] = {}
    print(f"\ngreedy decode ({a.new_tokens} tokens after a 16-token prompt), tokens/s latent N=1 ÷ vanilla (ideal 0.5):")
    with torch.no_grad():
        for B in (1, 8):
            p = torch.randint(0, V, (B, 16), generator=g)
            def dec(m):
                def f():
                    logits, st = m.prefill(p, torch.ones_like(p))
                    nxt = logits.argmax(-1)
                    t0 = time.perf_counter()
                    for _ in range(a.new_tokens):
                        logits, st = m.decode(nxt, st); nxt = logits.argmax(-1)
                    f.dt = time.perf_counter() - t0
                return f
            fv, fl = dec(van), dec(lat)
            tv, tl = [], []
            fv(); fl()
            for _ in range(a.reps): fv(); tv.append(fv.dt); fl(); tl.append(fl.dt)
            sv, sl = B * a.new_tokens / statistics.median(tv), B * a.new_tokens / statistics.median(tl)
            res['decode'][B] = dict(vanilla_tok_s=sv, latent_tok_s=sl, ratio=sl / sv)
            print(f"  batch {B}: vanilla {sv:8.0f} tok/s, latent {sl:8.0f} tok/s, ratio {sl/sv:.2f}")

    # -- prefill of a long prompt: Jacobi to tolerance vs one entry at a time (both fill the thoughts)
    with torch.no_grad():
        p = torch.randint(0, V, (1, a.prompt), generator=g)
        one = torch.ones_like(p)
        iters = {}
        def jac():
            iters['k'] = lat.prefill(p, one)[1]['prefill_iters']
        t = rounds({'jacobi': jac, 'sequential': lambda: sequential_hidden(lat, p, use_cache=True)}, a.reps)
        r = t['jacobi'] / t['sequential']
        res['prefill'] = dict(jacobi_s=t['jacobi'], sequential_s=t['sequential'], ratio=r, jacobi_iters=iters['k'])
        print(f"\nprefill of a {a.prompt}-token prompt (N=1, float32): Jacobi to tolerance ({iters['k']} passes + cache pass) "
              f"{t['jacobi']*1e3:.0f} ms ÷ one entry at a time ({2*a.prompt} cached steps) {t['sequential']*1e3:.0f} ms = {r:.2f}")
    if a.json:
        with open(a.json, 'w') as f: json.dump(res, f, indent=2)
    return res


if __name__ == '__main__': main(sys.argv[1:])

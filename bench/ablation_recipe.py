"""Ablation of the authors' recipe on the micro preset: embedding scale x initialisation, vanilla and latent thoughts.

Phase 1: {vanilla, latent (N=1, K in {2,3})} x embed_scale {none, authors} x init {hf, authors}, seed 0, same tokens.
Phase 2: learning-rate check for every setting: lr x0.5 and x2 of configs/micro.yaml's 3e-3, then further doublings
         (or halvings) while a setting's best learning rate sits at the edge of what it has tried (up to x8 / x1/8),
         so that no setting is compared at a learning rate that is simply wrong for it.
Phase 3: more seeds (1 and 2) of each method's two best settings and of its hf/none setting, each at its best
         learning rate, to see the noise.

Every run is `latent-thoughts train --config configs/micro.yaml ...` (the library's own trainer, CPU, float32,
at most `--jobs` at a time under `nice -n 10` and OMP_NUM_THREADS=1); outputs under runs/ablation/ (git-ignored).
Results: runs/ablation/results.json and the markdown table printed at the end (also bench/ablation_recipe.md).
Resumable: finished runs are read back, not rerun.

    python bench/ablation_recipe.py [--steps 400] [--jobs 2] [--phases 1 2 3]
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT/'runs'/'ablation'
BASE_LR, BASE_MIN_LR = 3e-3, 3e-4          # configs/micro.yaml
METHODS = {'vanilla': [], 'latent': ['model.method_args={n_thoughts: 1, train_iters: [2, 3]}']}
SETTINGS = [(s, i) for s in ('none', 'authors') for i in ('hf', 'authors')]

def run_name(method, scale, init, lr_mult=1.0, seed=0):
    return f"{method}-scale_{scale}-init_{init}-lr{lr_mult:g}-seed{seed}"

def result(name):
    "Final validation record of a finished run, or None."
    f = OUT/name/'metrics.jsonl'
    if not f.exists(): return None
    recs = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    ev = [r for r in recs if 'eval_ppl' in r]
    tr = [r for r in recs if 'elapsed_s' in r]
    if not ev or not tr or ev[-1]['step'] != tr[-1]['step']: return None
    return dict(eval_ppl=ev[-1]['eval_ppl'], eval_loss=ev[-1]['eval_loss'], step=ev[-1]['step'],
                train_loss=tr[-1]['loss'], elapsed_s=tr[-1]['elapsed_s'])

def command(method, scale, init, lr_mult, seed, steps):
    name = run_name(method, scale, init, lr_mult, seed)
    return name, ['nice', '-n', '10', str(ROOT/'.venv'/'bin'/'latent-thoughts'), 'train', '--config', str(ROOT/'configs'/'micro.yaml'),
                  f'model.method={method}', *METHODS[method], f'model.embed_scale={scale}', f'model.init={init}',
                  f'train.lr={BASE_LR * lr_mult:g}', f'train.min_lr={BASE_MIN_LR * lr_mult:g}', f'train.seed={seed}',
                  f'train.steps={steps}', f'train.out_dir={OUT/name}', 'train.save_every=0', 'train.eval_every=0',
                  'train.keep_last=1', 'train.progress=false']   # CPU: float32

def run_all(specs, steps, jobs):
    "Run the (method, scale, init, lr_mult, seed) specs not finished yet, `jobs` at a time."
    todo = [command(*s, steps) for s in specs if result(run_name(*s)) is None]
    running = []
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'MKL_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'HF_HUB_OFFLINE': '1'}
    while todo or running:
        while todo and len(running) < jobs:
            name, cmd = todo.pop(0)
            (OUT/name).mkdir(parents=True, exist_ok=True)
            log = open(OUT/name/'train.log', 'w')
            print(f"start {name}", flush=True)
            running.append((name, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.time()))
        time.sleep(5)
        for r in list(running):
            name, p, t0 = r
            if p.poll() is not None:
                running.remove(r)
                res = result(name)
                print(f"done  {name}: rc={p.returncode} {time.time() - t0:.0f}s ppl={res and round(res['eval_ppl'], 2)}", flush=True)

def collect():
    rows = {}
    for d in sorted(OUT.glob('*-seed*')):
        res = result(d.name)
        if res: rows[d.name] = res
    return rows

def best(rows, method, lr_mult=None):
    "This method's (scale, init) settings ordered by validation perplexity at lr_mult (None: its best lr)."
    scores = {}
    for scale, init in SETTINGS:
        ppls = [r['eval_ppl'] for n, r in rows.items() if n.startswith(run_name(method, scale, init).rsplit('-lr', 1)[0] + '-lr')
                and n.endswith('-seed0') and (lr_mult is None or f'-lr{lr_mult:g}-' in n)]
        if ppls: scores[(scale, init)] = min(ppls)
    return sorted(scores, key=scores.get)

LR_MULTS = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)

def best_lr(rows, method, scale, init):
    opts = {m: rows[run_name(method, scale, init, m)]['eval_ppl'] for m in LR_MULTS if run_name(method, scale, init, m) in rows}
    return min(opts, key=opts.get)

def table(rows) -> str:
    lines = ['| method | embed_scale | init | lr | seed | val ppl | val loss | train loss | time (s) |', '|---|---|---|---|---|---|---|---|---|']
    for n, r in sorted(rows.items(), key=lambda kv: (kv[0].split('-')[0], kv[1]['eval_ppl'])):
        method, scale, init, lr, seed = n.split('-')
        lines.append(f"| {method} | {scale[6:]} | {init[5:]} | {BASE_LR * float(lr[2:]):g} | {seed[4:]} | {r['eval_ppl']:.2f} | "
                     f"{r['eval_loss']:.4f} | {r['train_loss']:.4f} | {r['elapsed_s']:.0f} |")
    return '\n'.join(lines)

def summary(rows) -> str:
    "One line per (method, scale, init): seed-0 perplexity at each learning rate, the best, and all seeds there."
    mults = [x for x in LR_MULTS if any(f'-lr{x:g}-' in n for n in rows)]
    head = '| method | embed_scale | init | ' + ' | '.join(f'lr {BASE_LR * x:g}' for x in mults) + ' | best lr | val ppl at best lr (seeds 0, 1, 2) | mean |'
    lines = [head, '|' + '---|' * (head.count('|') - 1)]
    for m in METHODS:
        for s, i in sorted(SETTINGS, key=lambda si: min([rows[run_name(m, *si, x)]['eval_ppl'] for x in mults if run_name(m, *si, x) in rows] or [1e9])):
            cells = [f"{rows[run_name(m, s, i, x)]['eval_ppl']:.1f}" if run_name(m, s, i, x) in rows else '' for x in mults]
            if not any(cells): continue
            b = best_lr(rows, m, s, i)
            seeds = [rows[run_name(m, s, i, b, sd)]['eval_ppl'] for sd in (0, 1, 2) if run_name(m, s, i, b, sd) in rows]
            lines.append(f"| {m} | {s} | {i} | " + ' | '.join(cells) + f" | {BASE_LR * b:g} | {', '.join(f'{x:.1f}' for x in seeds)} | "
                         f"{sum(seeds) / len(seeds):.1f} |")
    return '\n'.join(lines)

if __name__ == '__main__':
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=400, help='optimizer steps per run (the issue measured 800; see the notebook)')
    p.add_argument('--jobs', type=int, default=2, help='runs at a time (the machine is shared: at most 2)')
    p.add_argument('--phases', type=int, nargs='+', default=[1, 2, 3])
    a = p.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    if 1 in a.phases: run_all([(m, s, i, 1.0, 0) for m in METHODS for s, i in SETTINGS], a.steps, a.jobs)
    rows = collect()
    if 2 in a.phases:
        run_all([(m, s, i, mult, 0) for m in METHODS for s, i in SETTINGS for mult in (0.5, 2.0)], a.steps, a.jobs)
        for _ in range(3):   # extend the grid where the best learning rate is at its edge
            rows, specs = collect(), []
            for m in METHODS:
                for s, i in SETTINGS:
                    tried = sorted(x for x in LR_MULTS if run_name(m, s, i, x) in rows)
                    b_lr = best_lr(rows, m, s, i)
                    if b_lr == tried[-1] and b_lr < 8: specs.append((m, s, i, b_lr * 2, 0))
                    if b_lr == tried[0] and b_lr > 1 / 8: specs.append((m, s, i, b_lr / 2, 0))
            if not specs: break
            run_all(specs, a.steps, a.jobs)
        rows = collect()
    if 3 in a.phases:
        specs = []
        for m in METHODS:
            for s, i in dict.fromkeys(best(rows, m)[:2] + [('none', 'hf')]):
                specs += [(m, s, i, best_lr(rows, m, s, i), seed) for seed in (1, 2)]
        run_all(specs, a.steps, a.jobs); rows = collect()
    (OUT/'results.json').write_text(json.dumps({'steps': a.steps, 'runs': rows}, indent=2))
    md = (f"Micro preset, {a.steps} steps, configs/micro.yaml (batch 8 x 128 tokens, warm-up 20, cosine to lr/10), CPU float32; "
          f"validation perplexity on 128 blocks of 128 tokens.\n\n" + summary(rows) + "\n\nEvery run:\n\n" + table(rows))
    (ROOT/'bench'/'ablation_recipe.md').write_text(md + '\n')
    print(md)

"""Why the adaptive router collapses, and which knobs make depth follow difficulty (issue 15).

A resumable sweep over the knobs of `AdaptiveLatentLM` on a small shape: the micro suite's `llama-L` (LLaMA,
d_model 64, 2 layers, 4 heads, vocabulary 4096), Shakespeare, batch 16 x 128, K_max 3 (the suite's `adaptive-K3`),
the suite's micro recipe (AdamW, lr 6e-3 -> 6e-4 cosine, 5% warm-up, authors' init and embedding scale), trained
through the project's `Trainer` for `--steps` steps. Each finished run appends one JSON line to `--out`
(`results.jsonl`); `--resume` skips the runs already there.

Per run, on the first `--eval-blocks` validation blocks, at the inference threshold tau (`halt_threshold`):
validation perplexity (and at tau = 0, every step run), the steps-per-token distribution (executed steps, and the
expected steps sum_k k p_exit), Spearman correlations of the steps with token difficulty (the per-token loss of
the fixed-depth reference `fixed` of the same seed, and the run's own per-token loss), mean steps per decile of the
reference loss, training FLOPs (the trainer's ledger at the executed steps) and inference FLOPs per token, and the
training-time trajectory of steps per token.

Usage (the CPU is shared: one thread, niced):
  OMP_NUM_THREADS=1 nice -n 5 python bench/router_study.py --resume            # the full sweep (SETTINGS)
  python bench/router_study.py --only fixed default --steps 20 --out /tmp/x.jsonl   # a tiny one
"""
import argparse, json, math, os, sys, tempfile, time, warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

K_MAX = 3
SHAPE = dict(preset='micro', arch='llama', d_model=64, n_layer=2, n_head=4)
DEFAULT_ARGS = dict(k_max=K_MAX)   # everything else: AdaptiveLatentLM's defaults (lambda 0.1, beta 0, bias 0, prune 0.1, tau 0.1)

# name -> (method_args beyond DEFAULT_ARGS, seeds). `fixed` is the fixed-depth reference (router none, all K_max steps).
# warm-up values are in training calls (= optimizer steps here) and are given as fractions of --steps: 'warmup_frac'.
# Not run for lack of time (add them here to run them): router_bias -2, router_init_std 0, beta 0.5 without pruning.
SETTINGS = {
    'fixed':            (dict(router='none'), (0, 1)),
    'k1':               (dict(k_max=1), (0,)),    # the plain model (one step per token), for orientation
    'default':          (dict(), (0, 1)),
    'w0':               (dict(adaptive_weight=0.0), (0,)),       # lambda = 0: no adaptive loss at all
    'w0.03':            (dict(adaptive_weight=0.03), (0,)),
    'w0.3':             (dict(adaptive_weight=0.3), (0, 1)),
    'beta0.2':          (dict(adaptive_beta=0.2), (0,)),
    'beta0.5':          (dict(adaptive_beta=0.5), (0,)),
    'bias+2':           (dict(router_bias=2.0), (0,)),
    'prune0':           (dict(prune_threshold=0.0), (0,)),
    'warmup50':         (dict(warmup_frac=0.5), (0,)),
    'beta0.5+bias+2':   (dict(adaptive_beta=0.5, router_bias=2.0), (0,)),
}
BEST = 'w0.3'   # the setting repeated at seed 1: the highest rho(steps, difficulty) when 4 of the 10 adaptive seed-0 runs were in


def run_name(setting, seed): return f'{setting}@s{seed}'


def method_args(setting, steps, settings=SETTINGS):
    args = {**DEFAULT_ARGS, **settings[setting][0]}
    if 'warmup_frac' in args: args['adaptive_warmup'] = max(1, int(round(args.pop('warmup_frac') * steps)))
    return args


def make_config(setting, seed, steps, out_dir, eval_blocks, batch=16, block=128, settings=SETTINGS):
    from latent_thoughts.config import Config, ModelConfig, DataConfig, TrainConfig
    args = method_args(setting, steps, settings)
    return Config(model=ModelConfig(**SHAPE, method='adaptive', method_args=args, embed_scale='authors', init='authors'),
                  data=DataConfig(source='shakespeare', block_size=block, batch_size=batch, eval_batch_size=32,
                                  eval_max_blocks=eval_blocks),
                  train=TrainConfig(steps=steps, lr=6e-3, min_lr=6e-4, warmup=max(1, int(0.05 * steps)), seed=seed,
                                    eval_every=0, save_every=0, keep_last=1, log_every=5, out_dir=str(out_dir),
                                    mixed_precision='no', progress=False))


def spearman(a, b):
    "Spearman rank correlation (average ranks for ties); nan if either side is constant."
    import pandas as pd
    ra, rb = pd.Series(np.asarray(a, float)).rank().to_numpy(), pd.Series(np.asarray(b, float)).rank().to_numpy()
    if ra.std() == 0 or rb.std() == 0: return float('nan')
    return float(np.corrcoef(ra, rb)[0, 1])


@torch.no_grad()
def token_stats(model, blocks, threshold=None, batch=16):
    "Per predicted token (positions 0..T-2 of each block): CE of the next token, executed and expected steps."
    model.eval()
    ce, steps, exp_steps, pairs, n_ent = [], [], [], 0, 0
    kk = torch.arange(1, model.k_max + 1, dtype=torch.float32)
    for i in range(0, len(blocks), batch):
        x = torch.stack([torch.as_tensor(blocks[j]) for j in range(i, min(len(blocks), i + batch))])
        tr = model.trace(x, threshold=threshold)
        lp = F.log_softmax(tr['logits'][:, :-1].float(), -1).gather(-1, x[:, 1:, None]).squeeze(-1)
        ce.append(-lp.flatten()); steps.append(tr['executed'][:, :-1].sum(-1).flatten())
        exp_steps.append((tr['exit_probs'][:, :-1].float() * kk).sum(-1).flatten())
        pairs += tr['pairs']; n_ent += int(tr['executed'].sum())
    n_tok = sum(len(b) for b in blocks)
    return dict(ce=torch.cat(ce).numpy(), steps=torch.cat(steps).numpy(), expected=torch.cat(exp_steps).numpy(),
                flops_per_token=model._flops(n_ent, pairs, n_tok) / n_tok)


def paired_model(cfg, seed):
    "The run's model with the base LM's initial weights of the fixed-depth reference of the same seed (paired runs)."
    from latent_thoughts.config import build_model
    from latent_thoughts.data import get_tokenizer
    from latent_thoughts.trainer import seed_all
    import copy
    vocab = len(get_tokenizer(cfg.data.tokenizer))
    ref_cfg = copy.deepcopy(cfg.model); ref_cfg.method_args = {**DEFAULT_ARGS, 'router': 'none'}
    seed_all(seed); ref = build_model(ref_cfg, vocab, seed=seed, device='cpu')   # exactly what the Trainer builds for `fixed`
    if cfg.model.method_args.get('router', 'learned') == 'none': return ref
    seed_all(seed); model = build_model(cfg.model, vocab, seed=seed, device='cpu')  # its router drew from the RNG: the LM differs
    model.lm.load_state_dict(ref.lm.state_dict())
    return model


def train_one(setting, seed, steps, eval_blocks, work, settings=SETTINGS, batch=16, block=128):
    "Train one run with the project's Trainer; return (model, trainer, seconds)."
    from latent_thoughts.trainer import Trainer
    out = Path(work)/run_name(setting, seed).replace('@', '_')
    if out.exists():
        import shutil; shutil.rmtree(out)
    cfg = make_config(setting, seed, steps, out, eval_blocks, batch, block, settings)
    t0 = time.perf_counter()
    tr = Trainer(cfg, model=paired_model(cfg, seed))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        tr.fit()
    return tr.model, tr, time.perf_counter() - t0


def measure(setting, seed, steps, eval_blocks, work, ref_ce=None, settings=SETTINGS, batch=16, block=128):
    "Train and measure one run; return its result row (and the per-token CE, the reference for `fixed`)."
    model, tr, secs = train_one(setting, seed, steps, eval_blocks, work, settings, batch, block)
    val = tr.val_blocks
    blocks = [val[j] for j in range(min(len(val), eval_blocks))]
    st = token_stats(model, blocks)                                  # at tau = halt_threshold (eval mode)
    st0 = token_stats(model, blocks, threshold=0.0)                  # every step run
    K = model.k_max
    hist = np.bincount(st['steps'].astype(int), minlength=K + 1)[1:]
    traj = [dict(step=r['step'], steps_executed=r.get('steps_executed'), adaptive_loss=r.get('adaptive_loss'), ce=r.get('ce'))
            for r in tr.history if r['step'] % max(1, steps // 10) == 0 or r['step'] == steps]
    row = dict(run=run_name(setting, seed), setting=setting, seed=seed, steps=steps, k_max=K, batch=batch, block=block,
               method_args=model.method_config(), eval_tokens=int(st['ce'].size),
               val_loss=float(st['ce'].mean()), val_ppl=float(math.exp(st['ce'].mean())),
               val_ppl_tau0=float(math.exp(st0['ce'].mean())),
               steps_dist=(hist / hist.sum()).tolist(), mean_steps=float(st['steps'].mean()),
               mean_expected_steps=float(st['expected'].mean()),
               spearman_own_loss=spearman(st['steps'], st['ce']), spearman_own_loss_expected=spearman(st['expected'], st['ce']),
               train_flops=float(tr.flops), train_flops_per_token=float(tr.flops / max(1, tr.tokens)),
               infer_flops_per_token=float(st['flops_per_token']), infer_flops_per_token_tau0=float(st0['flops_per_token']),
               train_s=secs, trajectory=traj)
    if ref_ce is not None:
        row['spearman_ref_loss'] = spearman(st['steps'], ref_ce)
        row['spearman_ref_loss_expected'] = spearman(st['expected'], ref_ce)
        dec = np.minimum((np.argsort(np.argsort(ref_ce, kind='stable'), kind='stable') * 10) // len(ref_ce), 9)
        row['steps_by_ref_decile'] = [float(st['steps'][dec == d].mean()) for d in range(10)]
        row['expected_by_ref_decile'] = [float(st['expected'][dec == d].mean()) for d in range(10)]
    return row, st['ce']


def load(path):
    p = Path(path)
    if not p.exists(): return []
    rows = []
    for line in p.read_text().splitlines():
        try: rows.append(json.loads(line))
        except json.JSONDecodeError: pass   # a line cut by a kill
    return rows


def sweep(out, steps=300, eval_blocks=64, only=None, seeds=None, resume=False, work=None, settings=SETTINGS, log=print,
          batch=16, block=128):
    "Run every (setting, seed) not yet in `out` (with `resume`), fixed-depth references first; return all rows."
    out = Path(out); out.parent.mkdir(parents=True, exist_ok=True)
    if not resume and out.exists(): raise FileExistsError(f"{out} exists: pass --resume to continue it, or another --out")
    work = Path(work or tempfile.mkdtemp(prefix='router-study-'))
    names = [s for s in settings if only is None or s in only]
    todo = [(s, sd) for s in names for sd in (settings[s][1] if seeds is None else seeds)]
    todo.sort(key=lambda r: (r[0] != 'fixed', r[1]))     # references first: the others correlate with them
    ref_file = lambda seed: out.with_name(f'{out.stem}.refce.s{seed}.npy')   # a reference's per-token CE (resume, parallel sweeps)
    def ref_of(seed):
        f = ref_file(seed)
        return np.load(f) if f.exists() and run_name('fixed', seed) in {r['run'] for r in load(out) if r.get('steps') == steps} else None
    for setting, seed in todo:
        name = run_name(setting, seed)
        done = {r['run'] for r in load(out) if r.get('steps') == steps}
        if name in done and (setting != 'fixed' or ref_of(seed) is not None): log(f'{name}: done, skipped'); continue
        ref = ref_of(seed)
        if setting != 'fixed' and ref is None and 'fixed' in settings:   # its reference is missing: train it first
            r, ce = measure('fixed', seed, steps, eval_blocks, work, None, settings, batch, block)
            np.save(ref_file(seed), ce); r['spearman_ref_loss'] = float('nan')
            with open(out, 'a') as f: f.write(json.dumps(r) + '\n')
            ref = ce
        row, ce = measure(setting, seed, steps, eval_blocks, work, ref if setting != 'fixed' else None, settings, batch, block)
        if setting == 'fixed':
            np.save(ref_file(seed), ce)
            row['spearman_ref_loss'] = float('nan')
        if name not in done:
            with open(out, 'a') as f: f.write(json.dumps(row) + '\n')
        log(f"{name}: ppl {row['val_ppl']:.2f}, steps {np.round(row['steps_dist'], 3).tolist()}, "
            f"rho(ref) {row.get('spearman_ref_loss', float('nan')):.3f}, {row['train_s']:.0f} s")
    return load(out)


def summarise(rows, max_ppl_cost=0.01, min_rho=0.1, max_mode=0.9):
    "One row per setting: means over seeds, ppl cost vs fixed depth (seed-matched), and whether it adapts."
    import pandas as pd
    df = pd.DataFrame(rows)
    for c in ('spearman_ref_loss', 'spearman_ref_loss_expected', 'spearman_own_loss'):
        if c not in df: df[c] = float('nan')
    df[['spearman_ref_loss', 'spearman_ref_loss_expected']] = df[['spearman_ref_loss', 'spearman_ref_loss_expected']].astype(float)
    fixed = df[df.setting == 'fixed'].groupby('seed')['val_ppl'].mean()
    if fixed.empty: raise ValueError("no fixed-depth reference ('fixed') among the rows: the ppl cost is measured against it")
    df['ppl_cost'] = [r.val_ppl / fixed.get(r.seed, fixed.mean()) - 1 for r in df.itertuples()]
    for k in range(int(df.k_max.max())): df[f'p_k{k + 1}'] = [d[k] if k < len(d) else 0.0 for d in df.steps_dist]
    agg = dict(n_seeds=('seed', 'count'), val_ppl=('val_ppl', 'mean'), val_ppl_sd=('val_ppl', 'std'),
               ppl_cost=('ppl_cost', 'mean'), val_ppl_tau0=('val_ppl_tau0', 'mean'), mean_steps=('mean_steps', 'mean'),
               **{f'p_k{k + 1}': (f'p_k{k + 1}', 'mean') for k in range(int(df.k_max.max()))},
               rho_ref=('spearman_ref_loss', 'mean'), rho_ref_expected=('spearman_ref_loss_expected', 'mean'),
               rho_own=('spearman_own_loss', 'mean'), train_flops=('train_flops', 'mean'),
               infer_flops_per_token=('infer_flops_per_token', 'mean'))
    s = df.groupby('setting', sort=False).agg(**agg).reset_index()
    pk = [c for c in s.columns if c.startswith('p_k')]
    s['spread'] = s[pk].max(axis=1) < max_mode
    s['adapts'] = ~s.setting.isin(['fixed', 'k1']) & s.spread & (s.rho_ref >= min_rho) & (s.ppl_cost <= max_ppl_cost)
    return s


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--out', default='assets/router_study/results.jsonl')
    ap.add_argument('--steps', type=int, default=300); ap.add_argument('--eval-blocks', type=int, default=64)
    ap.add_argument('--only', nargs='*', help='settings to run (default: all of SETTINGS)')
    ap.add_argument('--seeds', nargs='*', type=int, help='seeds to run for every selected setting (default: each setting\'s own)')
    ap.add_argument('--resume', action='store_true'); ap.add_argument('--work', help='training folder (default: a temp dir)')
    ap.add_argument('--threads', type=int, default=1)
    ap.add_argument('--batch', type=int, default=16); ap.add_argument('--block', type=int, default=128)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
    bad = [s for s in (a.only or []) if s not in SETTINGS]
    if bad: ap.error(f"unknown settings {bad}; known: {list(SETTINGS)}")
    rows = sweep(a.out, a.steps, a.eval_blocks, a.only, a.seeds, a.resume, a.work, batch=a.batch, block=a.block)
    s = summarise([r for r in rows if r['steps'] == a.steps])
    with __import__('pandas').option_context('display.width', 200, 'display.max_columns', 30):
        print(s.round(4).to_string(index=False))
    s.to_csv(Path(a.out).with_name('summary.csv'), index=False)


if __name__ == '__main__':
    main()

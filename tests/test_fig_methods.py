"""Fig. 5, Tables 3 and 5, Fig. 7 and Table 4 (method comparison and continual pretraining): the numbers the three
notebooks write at smoke scale, checked against independent computations — perplexity by a plain loop over the
Hugging Face model (vanilla; and for latent thoughts the sequential thoughts, the Jacobi fixed point), the FLOPs
column against `torch.utils.flop_counter.FlopCounterMode` (a forward with dense attention, and KV-cached decoding
for the causal count), accuracies against the suite's cached harness results, the continual-pretraining curves
against the raw `metrics.jsonl` lines, and the common start of both continued runs by reproducing their first
logged losses from the source run's published weights."""
import json, math
from pathlib import Path
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _suite():
    "A Suite built now: it reads $LATENT_THOUGHTS_RUNS, set by the `executed` fixture (load_suite() may predate it)."
    from latent_thoughts.suite import Suite
    return Suite()


def _close(a, b, what, rtol=1e-7, atol=1e-9):
    np.testing.assert_allclose(np.asarray(a, dtype=float), np.asarray(b, dtype=float), rtol=rtol, atol=atol, err_msg=what)


def _records(S, run, scale):
    return [json.loads(l) for l in (S.run_dir(run, scale)/'metrics.jsonl').read_text().splitlines() if l.strip()]


# -- plain references over the Hugging Face model (explicit causal mask, the wrapper's embedding scale)

def _hf(S, run, scale):
    "(HF causal LM in float32, eager attention; embedding scale; tokenizer; method config) of a run's published model."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = S.checkpoint(run, scale)
    meta = json.loads((d/'latent_config.json').read_text()) if (d/'latent_config.json').exists() else {}
    lm = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation='eager').eval()
    return lm, float(meta.get('embed_scale', 1.0)), AutoTokenizer.from_pretrained(d), meta

def _hidden(lm, x, pos):
    "Last hidden states of `lm` on input vectors x (1, S, d) at position ids `pos`, causal mask given explicitly."
    S = x.size(1)
    mask = torch.zeros(1, 1, S, S).masked_fill(~torch.ones(S, S, dtype=torch.bool).tril(), torch.finfo(torch.float32).min)
    return lm.base_model(inputs_embeds=x, position_ids=torch.tensor([pos]), attention_mask=mask).last_hidden_state

@torch.no_grad()
def _logprobs(lm, scale, ids, thoughts:bool):
    "log p(ids[i+1] | ids[:i+1]) for i < len-1: a plain pass (vanilla), or one sequential latent thought per token."
    x = torch.as_tensor(ids)[None]
    E = lm.get_input_embeddings()(x[:, :-1]) * scale
    if not thoughts: h = _hidden(lm, E, list(range(E.size(1))))
    else:   # the stream grows one entry at a time: e(x_t) gives the thought θ_t, fed back at the same position; read at θ_t
        entries, pos, reads = [], [], []
        for t in range(E.size(1)):
            entries.append(E[:, t]); pos.append(t)
            theta = _hidden(lm, torch.stack(entries, 1), pos)[:, -1]
            entries.append(theta); pos.append(t)
            reads.append(_hidden(lm, torch.stack(entries, 1), pos)[:, -1])
        h = torch.stack(reads, 1)
    lp = lm.get_output_embeddings()(h)[0].double().log_softmax(-1)
    return lp.gather(-1, x[0, 1:, None])[:, 0]

def _ref_ppl(S, run, scale, split, thoughts:bool):
    "Mean NLL of the suite's `ppl` evaluation (its settings) by the plain loop: documents joined by eos, disjoint windows."
    from latent_thoughts.data import prepare_corpus
    settings, cfg = S.scale(scale)['eval']['ppl'], S.config_for(run, scale)
    assert cfg.data.source == 'shakespeare'
    lm, scale_e, tok, _ = _hf(S, run, scale)
    mt, block = settings.get('max_tokens'), cfg.data.block_size
    stream = []
    for line in Path(prepare_corpus()[split]).read_text().splitlines():
        if not line.strip(): continue
        text = json.loads(line)['text']
        if not text.strip(): continue
        stream += [tok.eos_token_id] + tok(text, add_special_tokens=False)['input_ids']
        if mt and len(stream) > mt + 1: break
    stream = stream[:mt + 1] if mt else stream
    nll, n, end = 0.0, 0, 1
    while end < len(stream):   # every token after the first scored once, with up to `block` tokens of left context
        new = min(len(stream), end + block)
        lp = _logprobs(lm, scale_e, stream[max(0, new - block - 1):new], thoughts)
        nll -= float(lp[-(new - end):].sum()); n += new - end; end = new
    return nll / n, n


# -- Fig. 5

@pytest.fixture(scope='module')
def fig05(executed):
    out = executed('fig05_perplexity')
    return json.loads((out/'fig05_perplexity.json').read_text())


def test_fig05_perplexities_are_the_cached_evaluations(fig05):
    S, scale = _suite(), fig05['scale']
    recs = fig05['perplexities']
    assert not fig05['missing'] and {r['run'] for r in recs} == set(fig05['runs']), "at smoke scale every run trains"
    assert {d['dataset'] for d in fig05['datasets']} >= {'validation (corpus)', 'test (corpus)'}
    assert any(d['source'] for d in fig05['datasets']), "the smoke parameters name a local held-out file: it must be scored"
    sets = {d['dataset']: d for d in fig05['datasets']}
    heldout = fig05['heldout_max_tokens']
    for r in recs:
        _close(r['ppl'], math.exp(r['loss']), f"{r['run']} {r['dataset']}: ppl = exp(loss)", rtol=1e-12)
        d = sets[r['dataset']]
        extra = {} if d['source'] is None else dict(source=d['source'], max_tokens=heldout)
        ev = S.evaluate(r['run'], scale, 'ppl', d['split'], **extra)
        assert ev['cached'], f"{r['run']} {r['dataset']}: the notebook's evaluation is in the cache"
        assert (ev['loss'], ev['ppl'], ev['n_tokens'], ev['weights_sha256']) == (r['loss'], r['ppl'], r['n_tokens'], r['weights_sha256'])
    # Δppl against the reference, per dataset
    ref = {r['dataset']: r['ppl'] for r in recs if r['run'] == fig05['reference_run']}
    for r in recs: _close(r['delta_ppl'], r['ppl'] - ref[r['dataset']], 'Δppl')


def test_fig05_perplexity_recomputed_by_a_plain_loop(fig05):
    S, scale = _suite(), fig05['scale']
    got = {(r['run'], r['dataset']): r for r in fig05['perplexities']}
    for run, thoughts, split in (('vanilla-llama-L', False, 'validation'), ('vanilla2x-llama-L', False, 'test'),
                                 ('latent-llama-L', True, 'validation')):
        loss, n = _ref_ppl(S, run, scale, split, thoughts)
        r = got[run, f'{split} (corpus)']
        assert r['n_tokens'] == n
        # latent: the suite evaluates with Jacobi to tolerance, the fixed point = the sequential thoughts (App. G)
        _close(r['loss'], loss, f'{run} {split}', rtol=1e-6 if thoughts else 1e-7)


def test_fig05_verdicts_follow_from_the_numbers(fig05):
    sigma, lat = fig05['sigma_loss'], fig05['latent_run']
    loss = {(r['run'], r['dataset']): r['loss'] for r in fig05['perplexities']}
    first = fig05['datasets'][0]['dataset']
    for run in fig05['runs']:
        if run == lat: continue
        d = loss[lat, first] - loss[run, first]
        v = fig05['verdicts'][f'{lat} below {run}']
        if sigma is None: assert v == ('holds (noise not measured)' if d < 0 else 'fails (noise not measured)'), (run, d, v)
        else:
            band = 2 * sigma * math.sqrt(2)
            assert v == ('holds' if -d > band else 'fails' if d > band else 'within noise'), (run, d, v)
    for ds in {r['dataset'] for r in fig05['perplexities']}:
        best = min((l, r) for (r, s), l in loss.items() if s == ds)[1]
        if best != lat: assert fig05['verdicts'][f'lowest ppl on {ds}'].startswith(('fails', 'within noise')), ds


# -- Tables 3 and 5

@pytest.fixture(scope='module')
def tab03(executed):
    out = executed('tab03_05_methods')
    return json.loads((out/'tab03_05_methods.json').read_text())


def _counted_forward(model, T):
    "FLOPs per token torch counts for a forward of `model` over T tokens (eager attention: the full score matrix)."
    from torch.utils.flop_counter import FlopCounterMode
    ids = torch.randint(0, model.lm.config.vocab_size, (1, T), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fc, torch.no_grad(): model(ids)
    return fc.get_total_flops() / T

def _counted_decoding(model, T):
    "FLOPs torch counts for KV-cached greedy decoding of T tokens after a 1-token prompt, minus those of the prompt alone."
    from torch.utils.flop_counter import FlopCounterMode
    def run(n):
        with FlopCounterMode(display=False) as fc, torch.no_grad(): model.generate(torch.tensor([[5]]), max_new_tokens=n, do_sample=False)
        return fc.get_total_flops()
    return run(T) - run(1)   # the stream entries of tokens 2..T (the prompt's prefill, Jacobi for latent, cancels)


def test_tab03_flops_column_equals_torch_flop_counter(tab03):
    "The ledger's inference FLOPs of each built smoke model, dense and causal, against what torch counts."
    from latent_thoughts.core import load_method_lm
    S, scale = _suite(), tab03['scale']
    fl = {r['run']: r for r in tab03['flops']}
    table = {r['run']: r for r in tab03['table3']}
    checked = []
    for run, r in fl.items():
        assert r['flops_source'] == 'built model', run
        assert table[run]['inference_flops_per_token'] == r['inference_flops_per_token']
        model = load_method_lm(S.checkpoint(run, scale)).eval()
        model.lm.config._attn_implementation = 'eager'   # sdpa on CPU is not seen by the counter
        T = int(r['seq_len'])
        if model.method != 'latent':   # a latent forward runs Jacobi passes: its inference cost is decoding's
            _close(_counted_forward(model, T), r['inference_flops_per_token_dense'], f'{run}: dense forward', rtol=1e-9)
            checked.append(model.method)
    assert {'vanilla', 'pause', 'pondering'} <= set(checked), checked
    # the causal column (the paper's convention): KV-cached decoding attends over (S+1)/2 keys on average. Entry 1 (the
    # prompt) is removed from both sides; latent and vanilla exact, pause within 0.1%: a 2-entry decoding block
    # computes the score of its masked pair (one key per token per layer, 4·d_attn FLOPs)
    from latent_thoughts.flops import flops_per_token
    for run, rtol in (('vanilla-llama-L', 1e-9), ('latent-llama-L', 1e-9), ('pause1-llama-L', 1e-3)):
        model = load_method_lm(S.checkpoint(run, scale)).eval()
        model.lm.config._attn_implementation = 'eager'
        T = int(fl[run]['seq_len'])
        first = flops_per_token(model, seq_len=1)['inference_flops_per_token']   # one token alone: S entries + the head
        _close(_counted_decoding(model, T), T * fl[run]['inference_flops_per_token'] - first, f'{run}: causal (decoding)', rtol=rtol)
    # ratios: to the reference vanilla run's count; the paper's group: passes x parameter ratio
    ref = fl[tab03['reference_run']]['inference_flops_per_token']
    for run, r in fl.items():
        _close(r['inference_ratio'], r['inference_flops_per_token'] / ref, run)
    assert fl['latent-llama-L']['paper_inference_ratio'] == 2 and fl['vanilla2x-llama-L']['paper_inference_ratio'] == 2
    assert fl['pause1-llama-L']['paper_inference_ratio'] == 2 and fl['vanilla-llama-L']['paper_inference_ratio'] == 1


def test_tab03_05_accuracies_and_perplexities_are_the_cached_evaluations(tab03):
    S, scale = _suite(), tab03['scale']
    tasks, settings = tab03['tasks'], tab03['settings']
    t3 = {r['run']: r for r in tab03['table3']}
    t5 = {(r['shots'], r['run']): r for r in tab03['table5']}
    assert not tab03['missing'] and len(t3) == len(tab03['runs'])
    for run in tab03['runs']:
        for sp in ('validation', 'test'):
            ev = S.evaluate(run, scale, 'ppl', sp)
            assert ev['cached'] and (t3[run][f'{sp}_loss'], t3[run][f'{sp}_ppl']) == (ev['loss'], ev['ppl'])
            _close(ev['ppl'], math.exp(ev['loss']), 'ppl = exp(loss)', rtol=1e-12)
        for k in tab03['shots']:
            ev = S.evaluate(run, scale, 'harness', None, num_fewshot=k, **settings)
            assert ev['cached'], (run, k)
            acc = np.array([ev['results'][t][f"{tab03['metric']},none"] for t in tasks])
            n = np.array([ev['n-samples'][t]['effective'] for t in tasks])
            _close([t5[k, run][t] for t in tasks], 100 * acc, f'{run} {k}-shot per task')
            _close(t3[run][f'avg ({k}-shot)'], 100 * acc.mean(), f'{run} {k}-shot average')
            _close(t3[run][f'se ({k}-shot)'], 100 * math.sqrt((acc * (1 - acc) / n).sum()) / len(tasks), f'{run} {k}-shot se')
            ref = t3[tab03['reference_run']][f'avg ({k}-shot)']
            _close(t5[k, run]['Δacc'], t3[run][f'avg ({k}-shot)'] - ref, 'Δacc')
    # training FLOPs: the published manifests
    for run in tab03['runs']:
        man = S.manifest(run, scale)
        assert t3[run]['train_flops'] == man['train_flops'] and t3[run]['train_flops_per_token'] == man['train_flops_per_token']


def test_tab03_paper_transcription_is_consistent(tab03):
    p3 = {r['model']: r for r in tab03['paper_table3']}
    p5 = tab03['paper_table5']
    tasks = tab03['paper_tasks']
    assert len(p3) == 9 and len(p5) == 18
    for r in p5:   # each average is the mean of its nine tasks, and is Table 3's average column
        assert abs(np.mean([r[t] for t in tasks]) - r['avg']) < 0.051, r['model']
        assert r['avg'] == p3[r['model']][f"avg_acc_{r['shots']}shot"]
    ours, base = p3['Our LLaMA-1.4B'], p3['LLaMA-1.4B (train from scratch)']
    assert (round(ours['avg_acc_0shot'] - base['avg_acc_0shot'], 1), round(ours['avg_acc_5shot'] - base['avg_acc_5shot'], 1)) == (4.6, 4.4)
    # the paper's claim as transcribed: lowest perplexity everywhere, highest accuracy
    for c in ('ppl_pile', 'ppl_lambada_openai', 'ppl_wikitext', 'ppl_lambada_standard'):
        assert min(p3.values(), key=lambda r: r[c])['model'] == 'Our LLaMA-1.4B', c
    for c in ('avg_acc_0shot', 'avg_acc_5shot'):
        assert max(p3.values(), key=lambda r: r[c])['model'] == 'Our LLaMA-1.4B', c


# -- Fig. 7 and Table 4

@pytest.fixture(scope='module')
def fig07(executed):
    out = executed('fig07_tab04_continual')
    return json.loads((out/'fig07_tab04_continual.json').read_text())


def test_fig07_curves_are_the_metrics_logs(fig07):
    S, scale, w = _suite(), fig07['scale'], fig07['smooth']
    curves = {}
    for c in fig07['curves']: curves.setdefault(c['run'], []).append(c)
    assert set(curves) == {fig07['vanilla_cpt'], fig07['latent_cpt']}
    for run, c in curves.items():
        recs = [x for x in _records(S, run, scale) if 'loss' in x]
        assert [x['tokens'] for x in c] == [x['tokens'] for x in recs] and [x['step'] for x in c] == [x['step'] for x in recs]
        loss = np.array([x['loss'] for x in recs])
        assert [x['loss'] for x in c] == loss.tolist(), run
        _close([x['loss_smooth'] for x in c], [loss[max(0, i - w + 1):i + 1].mean() for i in range(len(loss))], f'{run} smoothed')
    ev = {(e['run'], e['tokens']): e['eval_loss'] for e in fig07['eval_logged']}
    for run in curves:
        for x in _records(S, run, scale):
            if 'eval_loss' in x: assert ev[run, x['tokens']] == x['eval_loss']
    # the difference curve: step by step at equal tokens
    lv = {c['tokens']: c['loss'] for c in curves[fig07['vanilla_cpt']]}
    ll = {c['tokens']: c['loss'] for c in curves[fig07['latent_cpt']]}
    toks = sorted(set(lv) & set(ll))
    assert [g['tokens'] for g in fig07['gap']] == toks
    _close([g['diff'] for g in fig07['gap']], [ll[t] - lv[t] for t in toks], 'latent − vanilla')
    # final validation losses: the cached ppl evaluation
    for run, l in fig07['final_loss'].items():
        assert S.evaluate(run, scale, 'ppl', 'validation')['loss'] == l, run


def test_fig07_both_runs_start_from_the_same_weights(fig07):
    "run.json init_from, the source's hash, and each run's first logged loss reproduced from the source's published weights."
    from latent_thoughts.suite import weights_sha256
    from latent_thoughts.core import load_method_lm
    from latent_thoughts.latent import LatentThoughtLM
    from latent_thoughts.trainer import load_data, make_loader, batch_ids
    S, scale = _suite(), fig07['scale']
    src = fig07['source']
    assert src == 'vanilla-llama-L' and fig07['same_start'] == 'yes'
    mans = {n: S.manifest(n, scale) for n in (fig07['vanilla_cpt'], fig07['latent_cpt'])}
    assert {m['init_from'] for m in mans.values()} == {src}
    h = weights_sha256(S.checkpoint(src, scale))
    assert h == S.manifest(src, scale)['weights_sha256'] == fig07['source_weights_sha256']
    assert {r['init_weights_sha256'] for r in fig07['start']} == {h}
    # step 1's loss is computed before the first update: it must be the source model's loss on the first batch
    for run, m in mans.items():
        cfg = S.config_for(run, scale)
        _, train, _ = load_data(cfg.data)
        x = batch_ids(next(make_loader(train, cfg.data.batch_size, seed=cfg.train.seed)))
        first = next(r['loss'] for r in _records(S, run, scale) if 'loss' in r)
        base = load_method_lm(S.checkpoint(src, scale)).train()
        if m['method'] == 'vanilla':
            with torch.no_grad(): got = [base(x, labels=x).loss.item()]
        else:   # the latent objective on the same weights, at each K the run samples from
            got = []
            for K in m['method_args']['train_iters']:
                lt = LatentThoughtLM(base.lm, n_thoughts=m['method_args']['n_thoughts'], train_iters=K).train()
                lt.embed_scale = base.embed_scale
                with torch.no_grad(): got.append(lt(x, labels=x).loss.item())
        assert any(abs(g - first) < 1e-5 for g in got), (run, first, got)


def test_tab04_accuracies_are_the_cached_evaluations(fig07):
    S, scale = _suite(), fig07['scale']
    tasks, settings = fig07['tasks'], fig07['settings']
    t4 = {(r['shots'], r['run']): r for r in fig07['table4']}
    assert {r for _, r in t4} == {fig07['source'], fig07['vanilla_cpt'], fig07['latent_cpt']}
    for (k, run), r in t4.items():
        ev = S.evaluate(run, scale, 'harness', None, num_fewshot=k, **settings)
        assert ev['cached'], (run, k)
        acc = np.array([ev['results'][t]['acc,none'] for t in tasks])
        _close([r[t] for t in tasks], 100 * acc, f'{run} {k}-shot')
        _close(r['avg'], 100 * acc.mean(), f'{run} {k}-shot avg')
        _close(r['Δ vs original'], r['avg'] - t4[k, fig07['source']]['avg'], 'Δ vs original')

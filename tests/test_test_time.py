"""Test-time scaling (`latent_thoughts.test_time`, Figs. 10-11, Table 7, Fig. 6): majority voting and best-of-N against
brute-force enumeration of subsets, sampling against `MethodLM.generate` for every method, the MT-Bench files against
FastChat's formats, and the numbers the paper notebooks write recomputed from the records they write."""
import itertools, json, math, random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from latent_thoughts.core import build_lm, VanillaLM
from latent_thoughts.latent import LatentThoughtLM
from latent_thoughts.baselines import PauseLM, LoopedLM, PonderingLM
from latent_thoughts.adaptive import AdaptiveLatentLM
from latent_thoughts.mor import MoRLM
from latent_thoughts.data import get_tokenizer
from latent_thoughts import test_time as tt

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope='module')
def tok():
    return get_tokenizer()


# -- brute force: every k-subset of the samples, the rule applied to it, averaged

def _vote(answers, quality, sub):
    cnt = {}
    for i in sub:
        if answers[i] is not None: cnt[answers[i]] = cnt.get(answers[i], 0) + 1
    if not cnt: return 0.0
    top = max(cnt.values())
    tied = [a for a, c in cnt.items() if c == top]
    return sum(quality[answers.index(a)] for a in tied) / len(tied)   # a tie is broken uniformly at random

def _select(quality, conf, sub):
    best = max(conf[i] for i in sub)
    sel = [i for i in sub if conf[i] == best]
    return sum(quality[i] for i in sel) / len(sel)

def _mean_over_subsets(n, k, f):
    subs = list(itertools.combinations(range(n), k))
    return sum(f(s) for s in subs) / len(subs)


@pytest.mark.parametrize('case', range(40))
def test_majority_and_best_of_n_equal_brute_force(case):
    rng = random.Random(case)
    n = rng.randint(1, 9)
    pool = ['a', 'b', 'c', 'd', None][:rng.randint(1, 5)]
    answers = [rng.choice(pool) for _ in range(n)]
    if case % 2:   # 0/1 exact match: one answer is right
        quality = [float(a == pool[0] and a is not None) for a in answers]
    else:          # ROUGE-like scores in [0, 1], equal for equal answers
        score = {a: (0.0 if a is None else round(rng.random(), 3)) for a in pool}
        quality = [score[a] for a in answers]
    conf = [rng.choice([-0.5, -1.0, -1.5, -2.0, float('-inf')]) for _ in range(n)]   # ties on purpose
    for k in range(1, n + 1):
        assert math.isclose(tt.majority_vote_at(answers, quality, k),
                            _mean_over_subsets(n, k, lambda s: _vote(answers, quality, s)), abs_tol=1e-12)
        assert math.isclose(tt.best_of_n_at(quality, k), _mean_over_subsets(n, k, lambda s: max(quality[i] for i in s)),
                            abs_tol=1e-12)
        assert math.isclose(tt.best_of_n_at(quality, k, conf),
                            _mean_over_subsets(n, k, lambda s: _select(quality, conf, s)), abs_tol=1e-12)


def test_oracle_is_pass_at_k_and_bounds_voting():
    # Chen et al. (2021): pass@k = 1 - C(n-c, k) / C(n, k)
    for n, c in [(10, 0), (10, 1), (10, 3), (10, 10), (7, 2)]:
        q = [1.0] * c + [0.0] * (n - c)
        for k in range(1, n + 1):
            assert math.isclose(tt.best_of_n_at(q, k), 1 - math.comb(n - c, k) / math.comb(n, k), abs_tol=1e-12)
    rng = random.Random(0)
    for _ in range(50):   # the oracle is never below majority voting or a scored selection
        a = [rng.choice('xyz') for _ in range(8)]
        q = [float(x == 'x') for x in a]
        c = [rng.random() for _ in a]
        for k in range(1, 9):
            o = tt.best_of_n_at(q, k)
            assert o >= tt.majority_vote_at(a, q, k) - 1e-12 and o >= tt.best_of_n_at(q, k, c) - 1e-12


def test_curves_are_means_of_per_question_values():
    rng = random.Random(1)
    recs = [dict(question_id=str(i), sample=j, voted=rng.choice(['a', 'b', None]), quality=0.0, confidence=rng.random())
            for i in range(5) for j in range(4)]
    for r in recs: r['quality'] = float(r['voted'] == 'a')
    cur = tt.test_time_curves(recs)
    for i in range(5):
        rs = [r for r in recs if r['question_id'] == str(i)]
        a, q = [r['voted'] for r in rs], [r['quality'] for r in rs]
        assert math.isclose(tt.majority_vote_at(a, q, 4), _mean_over_subsets(4, 4, lambda s: _vote(a, q, s)))
    want = np.mean([_mean_over_subsets(4, 2, lambda s: _vote([r['voted'] for r in recs if r['question_id'] == str(i)],
                                                               [r['quality'] for r in recs if r['question_id'] == str(i)], s))
                    for i in range(5)])
    got = cur[(cur.N == 2) & (cur.strategy == 'majority')].score.item()
    assert math.isclose(got, want, abs_tol=1e-12)


# -- sampling through every method's prefill/decode

def _methods():
    kw = dict(d_model=32, n_layer=3, n_head=4, max_positions=512, dtype=torch.float64)
    lm = lambda arch='gpt_neox': build_lm(arch, vocab_size=4096, **kw)
    return {'vanilla': VanillaLM(lm()), 'latent': LatentThoughtLM(lm(), n_thoughts=1), 'latent2-llama': LatentThoughtLM(lm('llama'), n_thoughts=2),
            'pause': PauseLM(lm(), n_pause=2), 'looped': LoopedLM(lm(), n_loops=2), 'pondering': PonderingLM(lm(), n_ponder=2),
            'adaptive': AdaptiveLatentLM(lm(), k_max=3), 'mor': MoRLM(lm(), n_recursions=2, sharing='cycle')}

PROMPTS = ['KING:\nWhat say you', 'QUEEN:\nI say the sun is up and', 'O']

@pytest.mark.parametrize('name', list(_methods()))
def test_sampling_equals_method_generate(name, tok):
    model = _methods()[name].eval()
    # greedy (temperature 0) is MethodLM.generate's greedy decoding, row by row, shared prefill or not
    for share in (True, False):
        got = tt.sample_answers(model, tok, PROMPTS, n=2, max_new_tokens=5, share_prefill=share)
        for p, g in zip(PROMPTS, got):
            ids = torch.tensor([tok(p).input_ids])
            ref = model.generate(ids, max_new_tokens=5, eos_token_id=tok.eos_token_id)[0, ids.size(1):].tolist()
            assert [s.tokens for s in g] == [ref, ref], (name, share)
    # sampled, one prompt: equal to MethodLM.generate on the prompt repeated n times with the same generator
    ids = torch.tensor([tok(PROMPTS[1]).input_ids] * 5)
    ref = model.generate(ids, max_new_tokens=6, do_sample=True, temperature=0.9, top_k=50,
                         generator=torch.Generator().manual_seed(7))[:, ids.size(1):].tolist()
    for share in (True, False):
        got = tt.sample_answers(model, tok, PROMPTS[1:2], n=5, max_new_tokens=6, temperature=0.9, top_k=50, seed=7,
                                share_prefill=share)[0]
        assert [s.tokens for s in got] == ref, (name, share)
    assert len({tuple(r) for r in ref}) > 1


def test_sampling_is_reproducible_and_batch_shape_free_at_temperature_0(tok):
    model = _methods()['latent'].eval()
    a = tt.sample_answers(model, tok, PROMPTS, n=3, max_new_tokens=4, temperature=0.8, seed=5)
    b = tt.sample_answers(model, tok, PROMPTS, n=3, max_new_tokens=4, temperature=0.8, seed=5)
    assert [[s.tokens for s in x] for x in a] == [[s.tokens for s in x] for x in b]
    g1 = tt.sample_answers(model, tok, PROMPTS, n=1, max_new_tokens=4, batch_size=1)
    g3 = tt.sample_answers(model, tok, PROMPTS, n=1, max_new_tokens=4, batch_size=64)
    assert [x[0].tokens for x in g1] == [x[0].tokens for x in g3]
    with pytest.raises(ValueError, match='no room'):
        tt.sample_answers(model, tok, PROMPTS, max_new_tokens=10_000)


def test_records_score_what_was_generated(tok):
    model = _methods()['vanilla'].eval()
    qs, spec = tt.load_questions('tt_complete', n=5)
    recs = tt.test_time_records(model, tok, qs, spec, n=3, temperature=1.0, seed=2)
    for r in recs:
        q = next(q for q in qs if q.id == r['question_id'])
        m = __import__('re').match(r"([A-Za-z'-]*)", r['text'])
        word = (q.prefix + m.group(1)).rstrip("'-")
        assert r['answer'] == word and r['quality'] == float(word.lower() == q.references[0].lower())


# -- MT-Bench files in FastChat's formats

def test_mt_bench_answers_round_trip_in_fastchat_format(tmp_path, tok):
    qs = tt.read_mt_questions()
    assert len(qs) == 8 and {q['category'] for q in qs} == set(tt.MT_BENCH_CATEGORIES)
    assert all(q['question_id'] > 1000 for q in qs), "our own questions must not collide with MT-Bench's ids 81-160"
    model = _methods()['vanilla'].eval()
    ans = tt.generate_mt_answers(model, tok, qs[:4], 'tiny-model', max_new_tokens=4)
    f = tt.write_model_answers(ans + ans[:1], tmp_path/'model_answer')   # a duplicate line is dropped, as reorg_answer_file does
    lines = [json.loads(l) for l in f.read_text().splitlines()]
    assert [l['question_id'] for l in lines] == sorted(q['question_id'] for q in qs[:4])
    for l in lines:   # FastChat's fields exactly
        assert set(l) == {'question_id', 'answer_id', 'model_id', 'choices', 'tstamp'}
        assert l['model_id'] == 'tiny-model' and l['choices'][0]['index'] == 0 and len(l['choices'][0]['turns']) == 2
        assert isinstance(l['tstamp'], float) and len(l['answer_id']) == 22
    assert tt.read_model_answers(tmp_path/'model_answer') == {'tiny-model': {a['question_id']: a for a in ans}}
    # FastChat's load_model_answers, written out: the file name without .jsonl names the model
    fastchat = {p.name[:-6]: {json.loads(l)['question_id']: json.loads(l) for l in open(p)} for p in (tmp_path/'model_answer').glob('*.jsonl')}
    assert fastchat == tt.read_model_answers(tmp_path/'model_answer')


def test_mt_bench_temperatures_follow_fastchat(tok, monkeypatch):
    seen = []
    real = tt.sample_answers
    def spy(model, tokenizer, prompts, **kw):
        seen.append((kw['temperature'], len(prompts))); return real(model, tokenizer, prompts, **kw)
    monkeypatch.setattr(tt, 'sample_answers', spy)
    qs = tt.read_mt_questions()
    tt.generate_mt_answers(_methods()['vanilla'].eval(), tok, qs, 'm', max_new_tokens=2)
    # fastchat/llm_judge/common.py temperature_config, typed here; gen_model_answer.py decodes greedily below 1e-4
    fastchat = {'writing': 0.7, 'roleplay': 0.7, 'extraction': 0.0, 'math': 0.0, 'coding': 0.0, 'reasoning': 0.0,
                'stem': 0.1, 'humanities': 0.1}
    per_temp = {}
    for q in qs: per_temp[fastchat[q['category']]] = per_temp.get(fastchat[q['category']], 0) + 1
    assert sorted(seen) == sorted(list(per_temp.items()) * 2)   # one batch per temperature, for each of the two turns


def test_judgments_read_and_scored_like_show_result():
    f = tt.MT_DIR/'SYNTHETIC_judgments_for_tests'/'gpt-4_single.jsonl'
    raw = pd.read_json(f, lines=True)
    assert raw.synthetic.all(), "the shipped judgment file is synthetic and must say so on every line"
    df = tt.read_judgments(f)
    # FastChat show_result.py (single mode): drop score -1, mean per model (and per model and turn)
    ref = raw[raw.score != -1]
    sc = tt.mt_bench_scores(df, tt.read_mt_questions())
    for model, g in ref.groupby('model'):
        got = sc[(sc.model == model) & (sc.category == 'average')].score.item()
        assert math.isclose(got, g.score.mean())
        for turn in (1, 2):
            assert math.isclose(sc[(sc.model == model) & (sc.category == f'turn {turn}')].score.item(), g[g.turn == turn].score.mean())
    cats = {q['question_id']: q['category'] for q in tt.read_mt_questions()}
    for (model, cat), g in ref.assign(category=ref.question_id.map(cats)).groupby(['model', 'category']):
        assert math.isclose(sc[(sc.model == model) & (sc.category == cat)].score.item(), g.score.mean())
    with pytest.raises(ValueError, match='not in the question file'):
        tt.mt_bench_scores(df.assign(question_id=df.question_id + 5000), tt.read_mt_questions())


def test_bad_inputs_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match='generate_until'): tt.load_questions('lt_nextline')
    with pytest.raises(ValueError, match='between 1'): tt.best_of_n_at([1.0], 2)
    bad = tmp_path/'j.jsonl'; bad.write_text(json.dumps({'question_id': 1, 'model_1': 'a', 'model_2': 'b'}) + '\n')
    with pytest.raises(ValueError, match='single-answer'): tt.read_judgments(bad)
    q = tmp_path/'q.jsonl'; q.write_text(json.dumps({'question_id': 1, 'turns': ['x']}) + '\n')
    with pytest.raises(ValueError, match='category'): tt.read_mt_questions(q)


# -- the paper notebooks, run at smoke scale: their numbers recomputed from the records they write

def _load(out, name): return json.loads((out/f'{name}.json').read_text())

def test_fig10_11_curves_recomputed_from_records(executed):
    out = executed('fig10_11_test_time_scaling')
    d = _load(out, 'fig10_11_test_time_scaling')
    assert d['models'] and d['tasks']
    for key, recs in d['records'].items():
        task, label = key.split('|')
        ref = {f"{r['doc']}:{r['line']}:{r['word']}": r['answer'] for r in map(json.loads, open(tt.TT_DIR/f'{task}.jsonl'))}
        for r in recs:   # each answer scored by plain case-insensitive exact match against the task file
            r['voted'] = None if r['answer'] is None else r['answer'].lower()
            assert r['quality'] == float(r['voted'] == ref[r['question_id']].lower()), r
        byq = {}
        for r in recs: byq.setdefault(r['question_id'], []).append(r)
        n = d['n_samples']
        assert all(len(v) == n for v in byq.values())
        for k in range(1, n + 1):   # brute force over subsets, from the records
            maj = np.mean([_mean_over_subsets(n, k, lambda s: _vote([r['voted'] for r in v], [r['quality'] for r in v], s)) for v in byq.values()])
            orc = np.mean([_mean_over_subsets(n, k, lambda s: max(v[i]['quality'] for i in s)) for v in byq.values()])
            sco = np.mean([_mean_over_subsets(n, k, lambda s: _select([r['quality'] for r in v], [float(r['confidence']) for r in v], s))
                           for v in byq.values()])
            c = d['curves'][key]
            assert math.isclose(c['majority'][k - 1], maj, abs_tol=1e-9)
            assert math.isclose(c['bon_oracle'][k - 1], orc, abs_tol=1e-9)
            assert math.isclose(c['bon_scored'][k - 1], sco, abs_tol=1e-9)
    table = pd.read_csv(out/'fig10_11_test_time_scaling.csv')
    assert set(table.strategy) >= {'majority', 'bon_oracle', 'bon_scored'}


def test_fig10_11_answers_are_the_models_own(executed, tok):
    "The records' answers of one model regenerated here with MethodLM.generate (greedy, N=1 reference run)."
    from latent_thoughts.analysis import load_figure_model
    d = _load(executed('fig10_11_test_time_scaling'), 'fig10_11_test_time_scaling')
    key = next(k for k in d['greedy'])
    task, label = key.split('|')
    model, tk = load_figure_model(d['models'][label]['checkpoint'])
    qs, spec = tt.load_questions(task, d['n_questions'])
    room = tt.context_length(model) - spec.max_new_tokens   # prompts are left-truncated to fit the context
    for q, r in zip(qs, d['greedy'][key]):
        ids = torch.tensor([tk(q.question).input_ids[-room:]])
        gen = model.generate(ids, max_new_tokens=spec.max_new_tokens, eos_token_id=tk.eos_token_id)[0, ids.size(1):].tolist()
        text = tk.decode([t for t in gen if t != tk.eos_token_id])
        assert r['answer'] == tt.extract_answer(text, spec.extract, q.prefix)[0], (q.id, text)


def test_tab07_accuracies_recomputed(executed):
    from latent_thoughts.analysis import load_figure_model
    out = executed('tab07_cot_prompt')
    d = _load(out, 'tab07_cot_prompt_data')
    qs, spec = tt.load_questions(d['task'], len(next(iter(d['records'].values()))))
    for label, m in d['models'].items():   # each condition's answers are the model's greedy answers to that prompt
        model, tk = load_figure_model(m['checkpoint'])
        room = tt.context_length(model) - spec.max_new_tokens
        for setting, template in d['templates'].items():
            for q, r in zip(qs, d['records'][f'{setting}|{label}']):
                ids = torch.tensor([tk(template.replace('{question}', q.question)).input_ids[-room:]])
                gen = model.generate(ids, max_new_tokens=spec.max_new_tokens, eos_token_id=tk.eos_token_id)[0, ids.size(1):].tolist()
                text = tk.decode([t for t in gen if t != tk.eos_token_id])
                assert r['answer'] == tt.extract_answer(text, spec.extract, q.prefix)[0], (setting, label, q.id, text)
    for key, recs in d['records'].items():
        acc = np.mean([r['quality'] for r in recs])
        assert math.isclose(d['accuracy'][key], acc, abs_tol=1e-12), key
    table = pd.read_csv(out/'tab07_cot_prompt.csv')
    assert list(table.columns[:3]) == ['Setting', 'Standard CPT', 'Ours CPT']
    assert list(table.Setting) == ['without CoT', 'with CoT']


def test_fig06_writes_fastchat_files_and_charts_the_judgments(executed):
    out = executed('fig06_mt_bench')
    bench = out/'fig06_mt_bench'
    qs = tt.read_jsonl(bench/'question.jsonl')
    answers = tt.read_model_answers(bench/'model_answer')
    assert set(answers) >= {'vanilla', 'latent'}
    for model, by in answers.items():
        assert sorted(by) == sorted(q['question_id'] for q in qs)
    table = pd.read_csv(out/'fig06_mt_bench.csv')
    raw = pd.read_json(tt.MT_DIR/'SYNTHETIC_judgments_for_tests'/'gpt-4_single.jsonl', lines=True)
    raw = raw[raw.score != -1]
    cats = {q['question_id']: q['category'] for q in qs}
    for (model, cat), g in raw.assign(category=raw.question_id.map(cats)).groupby(['model', 'category']):
        assert math.isclose(table[(table.model == model) & (table.category == cat)].score.item(), g.score.mean())
    assert 'SYNTHETIC' in (out/'fig06_mt_bench_paper_vs_run.md').read_text()

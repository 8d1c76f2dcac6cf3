"lm-eval model: consistency with the library's scoring, trainer loss, perplexity and generate; bad input; end to end."
import json, time
import pytest, torch
from lm_eval.api.instance import Instance
from latent_thoughts.core import build_lm, VanillaLM
from latent_thoughts.evaluation import perplexity
from latent_thoughts.harness import HarnessLM, TASKS, cli, evaluate, _cut

TEXT = ("Now, madam, summon up your dearest spirits:\nConsider who the king your father sends,\n"
        "To whom he sends, and what's his embassy:\nYourself, held precious in the world's esteem,\n"
        "To parley with the sole inheritor\nOf all perfections that a man may owe,\nMatchless Navarre.")


def req(kind, *args): return Instance(request_type=kind, doc={}, arguments=args, idx=0)


@pytest.fixture(scope='module')
def tok():
    from latent_thoughts.data import get_tokenizer
    return get_tokenizer()


def models(tok, ctx=48):
    "A vanilla and (if available) a latent micro model, float64."
    out = {'vanilla': VanillaLM(build_lm(vocab_size=len(tok), d_model=32, n_layer=2, n_head=2, max_positions=ctx, dtype=torch.float64))}
    try:
        from latent_thoughts.latent import LatentThoughtLM
        out['latent'] = LatentThoughtLM(build_lm(vocab_size=len(tok), d_model=32, n_layer=2, n_head=2, max_positions=ctx,
                                                 dtype=torch.float64, seed=1), n_thoughts=1)
    except ImportError: pass
    return {k: v.eval() for k, v in out.items()}


def kwargs_of(name): return {'jacobi_iters': 2} if name == 'latent' else {}


@pytest.mark.parametrize('name', ['vanilla', 'latent'])
def test_loglikelihood_equals_score_and_trainer_loss(tok, name):
    m = models(tok).get(name) or pytest.skip('latent_thoughts.latent missing')
    kw = kwargs_of(name)
    h = HarnessLM(m, tokenizer=tok, batch_size=3, progress=False, **kw)
    ctx, cont = TEXT[:60], TEXT[60:110]
    reqs = [req('loglikelihood', ctx, cont), req('loglikelihood', 'To whom', ' he sends'), req('loglikelihood', '', 'Now, madam')]
    ll = h.loglikelihood(reqs, disable_tqdm=True)
    ids = tok(ctx + cont)['input_ids']; n_ctx = len(tok(ctx)['input_ids']); k = len(ids) - n_ctx
    x = torch.tensor([ids])
    # the library's own scoring (float32 log-probs)
    assert ll[0][0] == pytest.approx(m.score(x, **kw)[0, n_ctx - 1:].sum().item(), rel=1e-5)
    # the trainer's loss with the context masked out (float64, exact)
    y = x.clone(); y[0, :n_ctx] = -100
    assert ll[0][0] == pytest.approx(-m(x, labels=y, **kw).loss.item() * k, rel=1e-10)
    # greedy flag: argmax of each continuation position
    greedy = (m(x, **kw).logits[0, n_ctx - 1:-1].argmax(-1) == x[0, n_ctx:]).all().item()
    assert ll[0][1] == greedy
    # empty context: conditioned on end-of-text
    e = [tok.eos_token_id] + tok('Now, madam')['input_ids']
    assert ll[2][0] == pytest.approx(m.score(torch.tensor([e]), **kw)[0].sum().item(), rel=1e-5)
    # batch size does not change anything
    h1 = HarnessLM(m, tokenizer=tok, batch_size=1, progress=False, **kw)
    for a, b in zip(ll, h1.loglikelihood(reqs, disable_tqdm=True)): assert a[0] == pytest.approx(b[0], rel=1e-9) and a[1] == b[1]


@pytest.mark.parametrize('name', ['vanilla', 'latent'])
def test_rolling_equals_perplexity(tok, name):
    m = models(tok, ctx=16).get(name) or pytest.skip('latent_thoughts.latent missing')
    kw = kwargs_of(name)
    h = HarnessLM(m, tokenizer=tok, batch_size=4, progress=False, **kw)
    r = h.loglikelihood_rolling([req('loglikelihood_rolling', TEXT), req('loglikelihood_rolling', 'Now, madam')], disable_tqdm=True)
    p = perplexity(m, tok, source=[TEXT], block_size=16, progress=False, **kw)
    assert p['n_windows'] > 2   # the text is longer than the context
    assert r[0] == pytest.approx(-p['loss'] * p['n_tokens'], rel=1e-10)
    assert r[1] == pytest.approx(-perplexity(m, tok, source=['Now, madam'], block_size=16, progress=False, **kw)['loss']
                                 * len(tok('Now, madam')['input_ids']), rel=1e-10)


@pytest.mark.parametrize('name', ['vanilla', 'latent'])
def test_generate_until_equals_generate(tok, name):
    m = models(tok, ctx=64).get(name) or pytest.skip('latent_thoughts.latent missing')
    kw = kwargs_of(name)
    h = HarnessLM(m, tokenizer=tok, batch_size=2, progress=False, **kw)
    ctxs = [TEXT[:40], TEXT[:90], 'To']
    out = h.generate_until([req('generate_until', c, {'until': ['\n\n'], 'max_gen_toks': 7}) for c in ctxs]
                           + [req('generate_until', ctxs[1], {'until': ['e'], 'max_gen_toks': 7})], disable_tqdm=True)
    for c, o in zip(ctxs, out):
        ids = torch.tensor([tok(c)['input_ids']])
        ref = m.generate(ids, max_new_tokens=7, eos_token_id=tok.eos_token_id, **kw)[0, ids.size(1):].tolist()
        ref = [t for t in ref if t != tok.eos_token_id]
        assert o == _cut(tok.decode(ref, skip_special_tokens=True), ['\n\n'])
    assert 'e' not in out[3] and out[1].startswith(out[3])


def test_bad_input(tok, tmp_path):
    lm = build_lm(vocab_size=len(tok), d_model=32, n_layer=1, n_head=2, max_positions=32)
    lm.save_pretrained(tmp_path/'hf')
    (tmp_path/'empty').mkdir()
    with pytest.raises(ValueError, match='holds no checkpoint'): HarnessLM(str(tmp_path/'empty'))
    with pytest.raises(FileNotFoundError, match='does not exist'): HarnessLM(str(tmp_path/'missing'))
    with pytest.raises(ValueError, match='unknown model args'): HarnessLM(lm, tokenizer=tok, jacobi_iters=3)  # vanilla has no K
    with pytest.raises(ValueError, match='unknown model args'): HarnessLM(str(tmp_path/'hf'), tokenizer=tok, eval_iters=3)
    VanillaLM(lm).save_pretrained(tmp_path/'ck', tokenizer=tok)
    with pytest.raises(ValueError, match='offline tasks are'): evaluate(tmp_path/'ck', ['no_such_task_xyz'], limit=1)


def test_end_to_end_cli(tok, tmp_path):
    "simple_evaluate on micro checkpoints with the offline pack, through the CLI, results JSON written."
    from latent_thoughts.latent import LatentThoughtLM
    shape = dict(vocab_size=len(tok), d_model=32, n_layer=2, n_head=2, max_positions=256)
    VanillaLM(build_lm(**shape)).save_pretrained(tmp_path/'van', tokenizer=tok)
    LatentThoughtLM(build_lm(**shape), n_thoughts=1, eval_iters=2).save_pretrained(tmp_path/'lat', tokenizer=tok)
    for ck, extra in [('van', []), ('lat', ['--model_args', 'jacobi_iters=1'])]:
        t0 = time.perf_counter()
        res = cli(['--checkpoint', str(tmp_path/ck), '--tasks', ','.join(TASKS), '--limit', '4', '--batch_size', '4',
                   '--output', str(tmp_path/f'{ck}.json')] + extra)
        js = json.loads((tmp_path/f'{ck}.json').read_text())
        assert sorted(js['results']) == sorted(TASKS)
        assert 0 <= js['results']['lt_nextline']['acc,none'] <= 1
        assert 0 <= js['results']['lt_lastword']['acc,none'] <= 1 and js['results']['lt_lastword']['perplexity,none'] > 1
        assert 0 <= js['results']['lt_lastword_gen']['exact_match,first_word'] <= 1
        assert js['latent_thoughts']['method'] == ('latent' if ck == 'lat' else 'vanilla')
        assert time.perf_counter() - t0 < 120
    assert js['latent_thoughts']['eval_mode'] == {'jacobi_iters': 1}


def test_fewshot(tok, tmp_path):
    VanillaLM(build_lm(vocab_size=len(tok), d_model=32, n_layer=1, n_head=2, max_positions=1024)).save_pretrained(tmp_path/'v', tokenizer=tok)
    res = evaluate(tmp_path/'v', ['lt_nextline'], num_fewshot=2, limit=2)
    assert res['n-shot']['lt_nextline'] == 2


def test_max_length_is_the_trained_length(tok):
    "Contexts are cut to the length the model was trained on (recorded by the trainer), not its position table."
    m = VanillaLM(build_lm(vocab_size=len(tok), d_model=32, n_layer=1, n_head=2, max_positions=256))
    assert HarnessLM(m, tokenizer=tok).max_length == 256
    m.train_block_size = 48
    assert HarnessLM(m, tokenizer=tok).max_length == 48


def test_lastword_continuation_carries_its_space(tok, tmp_path):
    "lm-eval passes a loglikelihood target as is (no target_delimiter): the scored word must start with its space."
    VanillaLM(build_lm(vocab_size=len(tok), d_model=32, n_layer=1, n_head=2, max_positions=256)).save_pretrained(tmp_path/'v', tokenizer=tok)
    res = evaluate(tmp_path/'v', ['lt_lastword'], limit=2, log_samples=True)
    for smp in res['samples']['lt_lastword']:
        ctx, cont = smp['arguments'][0]
        assert cont.startswith(' ') and not cont.startswith('  ') and not ctx.endswith(' ') and cont.strip() == smp['doc']['word']


def test_generate_until_halts_at_the_threshold(tok):
    "threshold= (tau of an adaptive model) reaches generation as it reaches scoring: prefill halts at it, decode too."
    from latent_thoughts.adaptive import AdaptiveLatentLM
    m = AdaptiveLatentLM(build_lm(vocab_size=len(tok), d_model=32, n_layer=2, n_head=2, max_positions=64, dtype=torch.float64),
                         k_max=3, halt_threshold=0.5).eval()
    prompt = tok(TEXT[:40])['input_ids']
    steps = {}
    for tau in (0.0, 1.0):   # 0: every token runs all 3 latent steps; 1: every token halts after its first
        seen, pre, dec = [], m.prefill, m.decode
        m.prefill = lambda *a, **kw: (seen.append(kw), pre(*a, **kw))[1]
        m.decode = lambda *a: (lambda r: (seen.append(r[1]['steps'][-1].tolist()), r)[1])(dec(*a))
        try:
            h = HarnessLM(m, tokenizer=tok, progress=False, threshold=tau)
            out = h.generate_until([req('generate_until', TEXT[:40], {'until': ['\n\n'], 'max_gen_toks': 4})], disable_tqdm=True)[0]
        finally: del m.prefill, m.decode
        assert seen[0] == {'threshold': tau}
        steps[tau] = seen[1:]
        ref = m.generate(torch.tensor([prompt]), max_new_tokens=4, eos_token_id=tok.eos_token_id, threshold=tau)[0, len(prompt):]
        assert out == _cut(tok.decode([t for t in ref.tolist() if t != tok.eos_token_id], skip_special_tokens=True), ['\n\n'])
        # the same tau scores: the harness's loglikelihood equals the model's own forward at tau
        ll = h.loglikelihood([req('loglikelihood', TEXT[:40], TEXT[40:60])], disable_tqdm=True)[0][0]
        c, k = h._encode_pair(TEXT[:40], TEXT[40:60])   # the harness's own split of the tokens
        x = torch.tensor([c + k]); n = len(c)
        y = x.clone(); y[0, :n] = -100
        assert ll == pytest.approx(-m(x, labels=y, threshold=tau).metrics['ce'] * (x.size(1) - n), rel=1e-9)
    assert steps[0.0] and all(s == [3] for s in steps[0.0]) and all(s == [1] for s in steps[1.0]), steps


def test_harness_json_records_jacobi_convergence(tok, tmp_path):
    "The results JSON says whether every scored window and generated prompt met the Jacobi tolerance."
    from latent_thoughts.latent import LatentThoughtLM, JacobiNotConverged
    shape = dict(vocab_size=len(tok), d_model=32, n_layer=2, n_head=2, max_positions=256)
    LatentThoughtLM(build_lm(**shape), n_thoughts=1).save_pretrained(tmp_path/'lat', tokenizer=tok)
    tasks = 'lt_lastword,lt_lastword_gen'
    res = cli(['--checkpoint', str(tmp_path/'lat'), '--tasks', tasks, '--limit', '3', '--output', str(tmp_path/'ok.json')])
    lt = json.loads((tmp_path/'ok.json').read_text())['latent_thoughts']
    assert lt['jacobi_converged'] is True and lt['jacobi_unconverged_windows'] == 0 and lt['jacobi_max_residual_rel'] < 1e-5
    with pytest.warns(JacobiNotConverged):
        cli(['--checkpoint', str(tmp_path/'lat'), '--tasks', tasks, '--limit', '3', '--output', str(tmp_path/'cap.json'),
             '--model_args', 'prefill_max_iters=1'])
    lt = json.loads((tmp_path/'cap.json').read_text())['latent_thoughts']
    # 3 scored windows (lt_lastword) and 3 generated prompts (lt_lastword_gen), none converged in one pass
    assert lt['jacobi_converged'] is False and lt['jacobi_unconverged_windows'] == 6 and lt['jacobi_max_iters'] == 1
    assert lt['jacobi_max_residual_rel'] > 1e-3 and lt['method_config']['prefill_max_iters'] == 1


def _ponderlm2_dir(tok, path, K=3):
    "A local directory in the authors' PonderLM-2 release format: stock GPT-NeoX weights, their config fields, an auto_map."
    lm = build_lm('gpt_neox', vocab_size=len(tok), d_model=32, n_layer=2, n_head=2, max_positions=64, seed=3)
    lm.save_pretrained(path); tok.save_pretrained(path)
    cfg = json.loads((path/'config.json').read_text())
    cfg.update(num_latent_thoughts=1, num_jacobi_iterations=K, random_jacobi_iterations=True, scale_embeds=True,
               interpolation=False, recurrent_model=True, auto_map={'AutoModelForCausalLM': 'modeling_gpt_neox.GPTNeoXForCausalLM'})
    (path/'config.json').write_text(json.dumps(cfg))
    return lm


def test_checkpoints_load_through_load_method_lm(tok, tmp_path):
    "Every format load_method_lm reads works in the harness (plain HF dir, the authors' release); method args override."
    from latent_thoughts.core import load_method_lm
    from latent_thoughts.core import checkpoint_class
    from latent_thoughts.latent import LatentThoughtLM
    ctx, cont = TEXT[:44], TEXT[44:80]
    lm = build_lm(vocab_size=len(tok), d_model=32, n_layer=1, n_head=2, max_positions=64)
    lm.save_pretrained(tmp_path/'hf'); tok.save_pretrained(tmp_path/'hf')
    assert checkpoint_class(tmp_path/'hf') is VanillaLM
    h = HarnessLM(str(tmp_path/'hf'), progress=False)   # tokenizer from the directory
    ll = h.loglikelihood([req('loglikelihood', ctx, cont)], disable_tqdm=True)[0][0]
    ref = HarnessLM(lm, tokenizer=tok, progress=False).loglikelihood([req('loglikelihood', ctx, cont)], disable_tqdm=True)[0][0]
    assert ll == pytest.approx(ref, rel=1e-6)
    # the authors' format: a latent model with their K and their embedding scale, as load_method_lm builds it
    _ponderlm2_dir(tok, tmp_path/'pl2')
    assert checkpoint_class(tmp_path/'pl2') is LatentThoughtLM
    h = HarnessLM(str(tmp_path/'pl2'), progress=False, dtype='float64')
    ref = load_method_lm(tmp_path/'pl2').double().eval()
    assert type(h.model) is LatentThoughtLM and h.model.eval_iters == 3 and h.model.embed_scale == pytest.approx(ref.embed_scale) != 1.0
    c, k = h._encode_pair(ctx, cont)
    x = torch.tensor([c + k]); y = x.clone(); y[0, :len(c)] = -100
    ll = h.loglikelihood([req('loglikelihood', ctx, cont)], disable_tqdm=True)[0][0]
    assert ll == pytest.approx(-ref(x, labels=y).loss.item() * len(k), rel=1e-9)
    # constructor args override (here: eval_iters, embed_scale), forward args set the mode
    h2 = HarnessLM(str(tmp_path/'pl2'), progress=False, eval_iters=5, embed_scale=1.0, jacobi_iters=2)
    assert h2.model.eval_iters == 5 and h2.model.embed_scale == 1.0 and h2.forward_kwargs == {'jacobi_iters': 2}
    assert h2.method_overrides == {'eval_iters': 5, 'embed_scale': 1.0}

"Perplexity: against the trainer's loss, the plain HF model, a brute-force strided reference; latent models; bad input."
import json, math
import pytest, torch
from latent_thoughts.core import build_lm, VanillaLM
from latent_thoughts.evaluation import perplexity, score_windows, token_stream, rolling_windows, load_documents

TEXTS = ["Now, madam, summon up your dearest spirits:\nConsider who the king your father sends,",
         "To whom he sends, and what's his embassy:\nYourself, held precious in the world's esteem,",
         "To parley with the sole inheritor\nOf all perfections that a man may owe,\nMatchless Navarre."]


@pytest.fixture(scope='module')
def tok():
    from tokenizers import Tokenizer, models, trainers, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast
    t = Tokenizer(models.BPE()); t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False); t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TEXTS * 3, trainers.BpeTrainer(vocab_size=300, special_tokens=['<|endoftext|>'],
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t, eos_token='<|endoftext|>', pad_token='<|endoftext|>')


def tiny(tok, arch='gpt_neox', ctx=256):
    return build_lm(arch, vocab_size=len(tok), d_model=32, n_layer=2, n_head=2, max_positions=ctx, dtype=torch.float64).eval()


@pytest.mark.parametrize('arch', ['gpt_neox', 'llama', 'gpt2'])
def test_whole_stream_equals_plain_hf_loss(tok, arch):
    "One window over the whole stream: the loss is the plain HF model's own loss on the stream."
    lm = tiny(tok, arch)
    r = perplexity(lm, tok, source=TEXTS, block_size=256, progress=False)
    ids = torch.tensor([token_stream(TEXTS, tok)])
    assert r['n_windows'] == 1 and r['n_tokens'] == ids.size(1) - 1
    logits = lm(input_ids=ids).logits[0, :-1]   # HF's own loss upcasts to float32 only; CE in float64 here
    ref = torch.nn.functional.cross_entropy(logits, ids[0, 1:]).item()
    assert logits.dtype == torch.float64 and r['loss'] == pytest.approx(ref, rel=1e-10)
    assert r['loss'] == pytest.approx(lm(input_ids=ids, labels=ids).loss.item(), rel=1e-6)
    assert r['ppl'] == pytest.approx(math.exp(ref), rel=1e-10)
    assert r['n_bytes'] == sum(len(t.encode()) for t in TEXTS)
    assert r['bpb'] == pytest.approx(ref * r['n_tokens'] / math.log(2) / r['n_bytes'], rel=1e-12)


@pytest.mark.parametrize('block,stride', [(8, 1), (8, 3), (8, 8), (5, 2)])
def test_strided_windows_brute_force(tok, block, stride):
    "Each token scored once with min(block, available) tokens of left context, checked token by token."
    lm = tiny(tok)
    s = token_stream(TEXTS[:1], tok)
    r = perplexity(lm, tok, source=TEXTS[:1], block_size=block, stride=stride, batch_size=3, progress=False)
    # reference: the context each token gets under the strided definition, one HF call per token
    wins = {}
    end = min(len(s), block + 1); first = set(range(1, end))
    nll = 0.0
    for t in range(1, len(s)):
        if t in first: start = 0
        else:  # t is scored by the window whose end is the first end >= t+1 on the grid end0 + k*stride
            k = -(-(t + 1 - end) // stride); w_end = min(len(s), end + k * stride); start = max(0, w_end - block - 1)
        lp = lm(input_ids=torch.tensor([s[start:t]])).logits[0, -1].log_softmax(-1)[s[t]]
        nll -= lp.item()
    assert r['n_tokens'] == len(s) - 1
    assert r['loss'] == pytest.approx(nll / (len(s) - 1), rel=1e-10)


def test_batched_equals_single_and_padding(tok):
    lm = VanillaLM(tiny(tok))
    s = token_stream(TEXTS, tok)
    items = [(s[:40], 10), (s[3:12], 8), (s[:2], 1), (s[10:], len(s) - 11)]
    b = score_windows(lm, items, batch_size=4)
    for it, x in zip(items, b):
        y = score_windows(lm, [it], batch_size=1)[0]
        assert x[0] == pytest.approx(y[0], rel=1e-10) and x[1:] == y[1:]


def test_latent_model_mode_recorded_and_exact(tok):
    latent = pytest.importorskip('latent_thoughts.latent')
    m = latent.LatentThoughtLM(tiny(tok), n_thoughts=1).eval()
    r = perplexity(m, tok, source=TEXTS, block_size=256, progress=False, jacobi_iters=2)
    assert r['method'] == 'latent' and r['eval_mode'] == {'jacobi_iters': 2}
    ids = torch.tensor([token_stream(TEXTS, tok)])
    assert r['loss'] == pytest.approx(m(ids, labels=ids, jacobi_iters=2).loss.item(), rel=1e-10)
    # another K gives another number; the default mode is recorded with its tolerance
    r3 = perplexity(m, tok, source=TEXTS, block_size=256, progress=False, jacobi_iters=0)
    assert r3['loss'] != pytest.approx(r['loss'], rel=1e-6)
    rd = perplexity(m, tok, source=TEXTS, block_size=64, batch_size=2, progress=False)
    assert rd['eval_mode']['jacobi_iters'] == 'tol' and rd['eval_mode']['tol'] > 0
    # batched windows with padding equal single windows for the latent model too
    s = ids[0].tolist()
    items = [(s[:50], 20), (s[5:20], 7), (s[:3], 2)]
    b = score_windows(m, items, batch_size=3, jacobi_iters=2)
    for it, x in zip(items, b):
        assert x[0] == pytest.approx(score_windows(m, [it], jacobi_iters=2)[0][0], rel=1e-9)


def test_adaptive_scored_as_it_generates(tok):
    "An adaptive model is scored halting at tau (the model `generate` runs), and the result says so."
    adaptive = pytest.importorskip('latent_thoughts.adaptive')
    m = adaptive.AdaptiveLatentLM(tiny(tok), k_max=3, halt_threshold=0.4).eval()
    r = perplexity(m, tok, source=TEXTS, block_size=64, progress=False)
    assert r['eval_mode'] == {'threshold': 0.4}
    ids = torch.tensor([token_stream(TEXTS, tok)[:64]])
    full = m(ids, labels=ids, threshold=0.0).metrics['ce']
    assert m(ids, labels=ids).metrics['ce'] == pytest.approx(m(ids, labels=ids, threshold=0.4).metrics['ce'], rel=1e-12)
    assert m(ids, labels=ids).metrics['ce'] != pytest.approx(full, rel=1e-9)

def test_trained_length_is_the_default_window(tok, tmp_path):
    m = VanillaLM(tiny(tok)); m.train_block_size = 32
    r = perplexity(m, tok, source=TEXTS, progress=False)
    assert r['block_size'] == 32
    m.save_pretrained(tmp_path/'ck', tokenizer=tok)
    assert perplexity(tmp_path/'ck', source=TEXTS, progress=False)['block_size'] == 32

def test_sources_and_checkpoint(tok, tmp_path):
    lm = tiny(tok)
    (tmp_path/'d.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS))
    (tmp_path/'d.txt').write_text(TEXTS[0])
    a = perplexity(lm, tok, source=str(tmp_path/'d.jsonl'), progress=False)
    b = perplexity(lm, tok, source=TEXTS, progress=False)
    assert a['loss'] == pytest.approx(b['loss'], rel=1e-12) and a['n_documents'] == 3
    c = perplexity(lm, tok, source=tmp_path/'d.txt', progress=False)
    assert c['n_documents'] == 1
    VanillaLM(lm).save_pretrained(tmp_path/'ck', tokenizer=tok)
    d = perplexity(tmp_path/'ck', source=TEXTS, progress=False)   # tokenizer from the checkpoint
    assert d['loss'] == pytest.approx(b['loss'], rel=1e-5) and d['method'] == 'vanilla'
    # a plain HF directory (load_method_lm reads every format) scores as the model object does
    lm.save_pretrained(tmp_path/'hf'); tok.save_pretrained(tmp_path/'hf')
    e = perplexity(tmp_path/'hf', source=TEXTS, progress=False)
    assert e['loss'] == pytest.approx(b['loss'], rel=1e-5) and e['method'] == 'vanilla'


def test_embedded_corpus(tmp_path):
    "The default source: the embedded corpus split with the default tokenizer, capped."
    data = pytest.importorskip('latent_thoughts.data')
    tok = data.get_tokenizer()
    lm = build_lm(vocab_size=len(tok), d_model=32, n_layer=1, n_head=2, max_positions=128)
    r = perplexity(lm, tok, split='validation', block_size=64, max_tokens=300, progress=False)
    assert r['n_tokens'] == 300 and 0 < r['bpb'] < 20 and r['n_bytes'] > 300
    # a random model is about uniform over the vocabulary
    assert abs(r['loss'] - math.log(len(tok))) < 1.0


def test_bad_input(tok, tmp_path):
    lm = tiny(tok)
    (tmp_path/'empty.jsonl').write_text('\n')
    with pytest.raises(ValueError, match='empty'): perplexity(lm, tok, source=str(tmp_path/'empty.jsonl'), progress=False)
    with pytest.raises(ValueError, match='empty'): load_documents([])
    (tmp_path/'none').mkdir()
    with pytest.raises(ValueError, match='holds no checkpoint'): perplexity(tmp_path/'none', tok, source=TEXTS)
    with pytest.raises(FileNotFoundError, match='does not exist'): perplexity(tmp_path/'nope', tok, source=TEXTS)
    with pytest.raises(ValueError, match='stride'): perplexity(lm, tok, source=TEXTS, block_size=8, stride=9, progress=False)
    with pytest.raises(TypeError, match='checkpoint directory'): perplexity(object(), tok, source=TEXTS)


def _rel_residual_one_pass(lm, ids):
    "By hand, N=1: RMS(θ after one Jacobi pass − θ of the plain pass) / RMS(θ of the plain pass), with the HF base model."
    base = lm.base_model
    E = lm.get_input_embeddings()(ids)
    h0 = base(inputs_embeds=E).last_hidden_state
    T = ids.size(1)
    stream = torch.stack([E, h0], 2).reshape(1, 2 * T, -1)
    H = base(inputs_embeds=stream, position_ids=torch.arange(T).repeat_interleave(2)[None],
             attention_mask=torch.ones(1, 2 * T, dtype=torch.long)).last_hidden_state
    return ((H[:, 0::2] - h0).pow(2).mean().sqrt() / h0.pow(2).mean().sqrt()).item()


def test_latent_convergence_recorded(tok):
    "Jacobi to tolerance: the result says whether every window converged; capped at one pass none does, and it warns."
    from latent_thoughts.latent import LatentThoughtLM, JacobiNotConverged
    lm = tiny(tok)
    with torch.no_grad():
        ok = perplexity(LatentThoughtLM(lm, n_thoughts=1).eval(), tok, source=TEXTS, block_size=12, batch_size=1, progress=False)
        assert ok['jacobi_converged'] is True and ok['jacobi_unconverged_windows'] == 0 and ok['jacobi_max_residual_rel'] < 1e-9
        with pytest.warns(JacobiNotConverged, match='prefill_max_iters'):
            bad = perplexity(LatentThoughtLM(lm, n_thoughts=1, prefill_max_iters=1).eval(), tok, source=TEXTS, block_size=12,
                             batch_size=1, progress=False)
        assert bad['jacobi_converged'] is False and bad['jacobi_unconverged_windows'] == bad['n_windows'] > 2
        assert bad['jacobi_max_iters'] == 1
        s = token_stream(TEXTS, tok)
        ref = max(_rel_residual_one_pass(lm, torch.tensor([s[a:b - 1]])) for a, b, _ in rolling_windows(len(s), 12))
        assert bad['jacobi_max_residual_rel'] == pytest.approx(ref, rel=1e-9)
        # a fixed K has no tolerance: the residual is recorded, convergence is not claimed
        k2 = perplexity(LatentThoughtLM(lm, n_thoughts=1).eval(), tok, source=TEXTS, block_size=12, progress=False, jacobi_iters=2)
        assert 'jacobi_converged' not in k2 and k2['jacobi_max_iters'] == 2 and k2['jacobi_max_residual_rel'] > 0
        assert not any(k.startswith('jacobi') for k in perplexity(lm, tok, source=TEXTS, block_size=12, progress=False))


def _local_hf_dataset(path, texts):
    "A directory of data files that `datasets` reads as a local Hugging Face dataset (split by file name)."
    path.mkdir()
    for sp in ('train', 'validation'): (path/f'{sp}.jsonl').write_text(''.join(json.dumps({'text': t}) + '\n' for t in texts))
    return path


def test_caps_bound_what_is_read(tok, tmp_path, monkeypatch):
    "max_documents/max_tokens read a prefix of a local HF dataset and no further, however large the split; the score is the prefix's."
    import latent_thoughts.data as data
    texts = [f'{TEXTS[i % 3]} ({i})' for i in range(3000)]
    read, doc_stream = [], data.doc_stream
    def counting(*a, **kw):   # every document the data layer hands out
        for x in doc_stream(*a, **kw): read.append(x[0]); yield x
    monkeypatch.setattr(data, 'doc_stream', counting)
    n = [1 + len(tok(t, add_special_tokens=False)['input_ids']) for t in texts]   # token_stream's count, by hand
    need = next(i + 1 for i in range(len(n)) if sum(n[:i + 1]) > 100)             # documents that hold 100 scored tokens
    lm = tiny(tok)
    for size in (30, 3000):
        src = _local_hf_dataset(tmp_path/f'ds{size}', texts[:size])
        read.clear()
        assert load_documents(src, max_documents=7) == texts[:7] and read == texts[:7]
        read.clear()
        assert load_documents(src, max_tokens=100, tokenizer=tok) == texts[:need] and read == texts[:need]
        read.clear()
        r = perplexity(lm, tok, source=src, block_size=256, max_tokens=100, progress=False)
        assert read == texts[:need] and r['n_documents'] == need and r['n_tokens'] == 100
        ids = torch.tensor([token_stream(texts, tok)[:101]])   # the reference: one window over the first 101 stream tokens
        ref = torch.nn.functional.cross_entropy(lm(input_ids=ids).logits[0, :-1], ids[0, 1:]).item()
        assert r['loss'] == pytest.approx(ref, rel=1e-10)
        read.clear()
        assert perplexity(lm, tok, source=src, block_size=256, max_documents=2, progress=False)['n_tokens'] == sum(n[:2]) - 1
        assert read == texts[:2]
    read.clear()
    assert len(load_documents(tmp_path/'ds30')) == 30 == len(read)   # uncapped: the whole split
    with pytest.raises(ValueError, match='tokenizer='): load_documents(tmp_path/'ds30', max_tokens=10)
    with pytest.raises(ValueError, match='positive'): load_documents(tmp_path/'ds30', max_documents=0)

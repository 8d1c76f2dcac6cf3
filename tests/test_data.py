"Data pipeline: split, packing round trip, resumable and distributed loader, bad input, the real corpus."
import json, os, subprocess, sys, time
from pathlib import Path

import numpy as np
import pytest
import torch

from latent_thoughts.data import (EOT, SPLITS, BlockLoader, make_loader, batch_ids, PackedBlocks, StreamLoader, TokenStream, corpus_manifest,
                                  data_dir, doc_stream, eval_batches, get_blocks, get_tokenizer, iter_documents,
                                  prepare_corpus, split_documents, train_tokenizer)

TEXTS = ['Once upon a time there was a cat. ' * 7, 'Der Bär läuft über die Brücke — 🐻!\n' * 3,
         'Short one.', 'Line one\nline two\n\n  indented line\n' * 5, 'The end, my friend. ' * 9]


@pytest.fixture
def tmpdata(tmp_path, monkeypatch):
    "A private data_dir with a few text documents and a tiny tokenizer trained on them."
    monkeypatch.setenv('LATENT_THOUGHTS_DATA', str(tmp_path/'data'))
    src = tmp_path/'docs'; src.mkdir()
    for i, t in enumerate(TEXTS): (src/f'{i:02d}.txt').write_text(t, encoding='utf-8')
    tok = train_tokenizer(src, vocab_size=320, out_dir=tmp_path/'tok')
    return tmp_path, src, tok


def test_data_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv('LATENT_THOUGHTS_DATA', str(tmp_path/'x'))
    assert data_dir() == tmp_path/'x' and data_dir().is_dir()


def test_split_deterministic_and_disjoint():
    ids = [f'play{i // 10}/{i % 10:03d}' for i in range(200)]
    s = split_documents(ids, seed=0, val_frac=0.1, test_frac=0.05)
    assert s == split_documents(ids[::-1], seed=0, val_frac=0.1, test_frac=0.05)
    assert s != split_documents(ids, seed=1, val_frac=0.1, test_frac=0.05)
    assert [len(s[k]) for k in SPLITS] == [170, 20, 10]
    parts = [set(s[k]) for k in SPLITS]
    assert sum(map(len, parts)) == len(set.union(*parts)) == len(ids)


def test_prepare_corpus_deterministic(tmp_path):
    "Two independent preparations with the same seed write the same bytes; another seed another split."
    a, b = prepare_corpus(tmp_path/'a', seed=0), prepare_corpus(tmp_path/'b', seed=0)
    for s in SPLITS: assert a[s].read_bytes() == b[s].read_bytes()
    c = corpus_manifest(prepare_corpus(tmp_path/'c', seed=1)['train'].parent)
    ma = corpus_manifest(tmp_path/'a')
    assert ma['splits']['validation']['docs'] != c['splits']['validation']['docs']
    parts = [set(ma['splits'][s]['docs']) for s in SPLITS]
    assert sum(map(len, parts)) == len(set.union(*parts))
    # each split file holds exactly its manifest's documents
    for s in SPLITS:
        ids = [json.loads(l)['id'] for l in a[s].read_text().splitlines()]
        assert ids == ma['splits'][s]['docs']
    # a corrupted file is detected and rebuilt
    a['test'].write_text('tampered')
    assert prepare_corpus(tmp_path/'a', seed=0)['test'].read_bytes() == b['test'].read_bytes()


def test_packing_round_trip(tmpdata):
    _, src, tok = tmpdata
    blocks = get_blocks(src, tokenizer=tok, block_size=8)
    # independent reference: each document encoded on its own, followed by eos
    ref = [t for d in TEXTS for t in tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]]
    assert blocks.tokens.tolist() == ref and blocks.n_tokens == len(ref)
    assert tok.decode(blocks.tokens.tolist()) == ''.join(t + EOT for t in TEXTS)
    served = torch.cat([blocks[i] for i in range(len(blocks))])
    assert len(blocks) == len(ref) // 8 and served.tolist() == ref[:len(blocks)*8]
    assert served.dtype == torch.int64 and blocks.tokens.dtype == np.uint16
    assert blocks.n_bytes == sum(len(t.encode()) for t in TEXTS)
    # a fresh PackedBlocks reads the same cache; another block size is another cache
    assert PackedBlocks(blocks.path).tokens.tolist() == ref
    assert get_blocks(src, tokenizer=tok, block_size=8).path == blocks.path
    assert get_blocks(src, tokenizer=tok, block_size=16).path != blocks.path


def test_packing_jsonl_and_cache_invalidation(tmpdata):
    tmp, _, tok = tmpdata
    f = tmp/'c.jsonl'
    f.write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS[:2]))
    b1 = get_blocks(f, tokenizer=tok, block_size=4)
    assert tok.decode(b1.tokens.tolist()) == TEXTS[0] + EOT + TEXTS[1] + EOT
    f.write_text(''.join(json.dumps({'text': t}) + '\n' for t in TEXTS[2:]))   # the file changed: rebuilt
    os.utime(f, ns=(time.time_ns(), time.time_ns() + 10**9))
    b2 = get_blocks(f, tokenizer=tok, block_size=4)
    assert b2.path != b1.path and tok.decode(b2.tokens.tolist()) == ''.join(t + EOT for t in TEXTS[2:])


def _ids(batch): return batch['input_ids']


@pytest.mark.parametrize('k', [0, 1, 3, 4, 5, 9])
def test_loader_resumes_at_next_batch(tmpdata, k):
    "After k batches (epochs have 4 steps here, so k=4,5,9 cross epoch boundaries) a restored loader continues."
    _, src, tok = tmpdata
    blocks = get_blocks(src, tokenizer=tok, block_size=4)
    bs = len(blocks) // 4
    a = BlockLoader(blocks, bs, seed=7)
    assert len(a) == 4
    for _ in range(k): next(a)
    state = json.loads(json.dumps(a.state_dict()))          # survives a JSON checkpoint
    b = BlockLoader(blocks, bs, seed=7); b.load_state_dict(state)
    for _ in range(6): assert torch.equal(_ids(next(a)), _ids(next(b)))


def test_loader_epochs_are_permutations(tmpdata):
    _, src, tok = tmpdata
    blocks = get_blocks(src, tokenizer=tok, block_size=4)
    ld = BlockLoader(blocks, 1, seed=0)
    rows = lambda: [tuple(_ids(next(ld))[0].tolist()) for _ in range(len(blocks))]
    e0, e1 = rows(), rows()
    every = sorted(tuple(blocks[i].tolist()) for i in range(len(blocks)))
    assert sorted(e0) == every and sorted(e1) == every and e0 != e1


def test_loader_world_size_2_equals_double_batch(tmpdata):
    _, src, tok = tmpdata
    blocks = get_blocks(src, tokenizer=tok, block_size=4)
    one = BlockLoader(blocks, 6, seed=1)
    ranks = [BlockLoader(blocks, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(3*len(one) + 1):
        assert torch.equal(torch.cat([_ids(next(r)) for r in ranks]), _ids(next(one)))
    # the state of a 2-rank run resumes a 1-process run with the same global batch
    single = BlockLoader(blocks, 6, seed=1); single.load_state_dict(ranks[0].state_dict())
    assert torch.equal(_ids(next(single)), _ids(next(one)))


def test_one_loader_for_blocks_in_memory_and_on_disk(tmpdata):
    "The trainer's loader of a tensor of blocks is `BlockLoader`: the same batches, ranks and resume as over `PackedBlocks`."
    _, src, tok = tmpdata
    blocks = get_blocks(src, tokenizer=tok, block_size=4)
    mem = torch.stack([blocks[i] for i in range(len(blocks))])
    disk, ram = make_loader(blocks, 3, seed=2), make_loader(mem, 3, seed=2)
    assert type(disk) is type(ram) is BlockLoader
    for _ in range(2*len(disk) + 1): assert torch.equal(batch_ids(next(disk)), batch_ids(next(ram)))
    ranks = [make_loader(list(mem), 3, seed=2, rank=r, world_size=2) for r in range(2)]
    one = make_loader(mem, 6, seed=2)
    for _ in range(5): assert torch.equal(torch.cat([batch_ids(next(r)) for r in ranks]), batch_ids(next(one)))
    again = make_loader(mem, 6, seed=2); again.load_state_dict(json.loads(json.dumps(one.state_dict())))
    assert torch.equal(batch_ids(next(again)), batch_ids(next(one)))


def test_eval_batches_cover_all_in_order(tmpdata):
    _, src, tok = tmpdata
    blocks = get_blocks(src, tokenizer=tok, block_size=4)
    batches = [_ids(b) for b in eval_batches(blocks, 5)]
    assert all(len(b) == 5 for b in batches[:-1]) and 1 <= len(batches[-1]) <= 5
    assert torch.equal(torch.cat(batches), torch.stack([blocks[i] for i in range(len(blocks))]))


# ---- bad input: each raises an error that names the fix ----

def test_missing_file(tmpdata):
    tmp, _, tok = tmpdata
    with pytest.raises(FileNotFoundError, match='not found: pass an existing'):
        get_blocks(tmp/'nope.txt', tokenizer=tok)
    with pytest.raises(FileNotFoundError, match='not found'):
        list(iter_documents(str(tmp/'{split}.jsonl'), 'validation'))
    with pytest.raises(FileNotFoundError, match='save_pretrained'):
        get_tokenizer(str(tmp/'no_tokenizer_here/'))


def test_empty_corpus(tmpdata):
    tmp, _, tok = tmpdata
    (tmp/'empty.txt').write_text('\n  \n')
    with pytest.raises(ValueError, match='empty corpus'): get_blocks(tmp/'empty.txt', tokenizer=tok)
    (tmp/'empty.jsonl').write_text('{"text": ""}\n\n')
    with pytest.raises(ValueError, match='empty corpus'): list(iter_documents(tmp/'empty.jsonl'))
    (tmp/'emptydir').mkdir()
    with pytest.raises(ValueError, match='no .txt files'): list(iter_documents(tmp/'emptydir'))
    (tmp/'nofield.jsonl').write_text('{"content": "x"}\n')
    with pytest.raises(ValueError, match="no field 'text'"): list(iter_documents(tmp/'nofield.jsonl'))


def test_text_too_short_for_one_block(tmpdata):
    tmp, _, tok = tmpdata
    (tmp/'short.txt').write_text('Hi.')
    with pytest.raises(ValueError, match='fewer than one block of 256: use a smaller block_size'):
        get_blocks(tmp/'short.txt', tokenizer=tok, block_size=256)


@pytest.mark.parametrize('bs', [1, 0, -3])
def test_block_size_below_2(tmpdata, bs):
    _, src, tok = tmpdata
    with pytest.raises(ValueError, match='at least 2 tokens'): get_blocks(src, tokenizer=tok, block_size=bs)


def test_loader_too_few_blocks(tmpdata):
    _, src, tok = tmpdata
    blocks = get_blocks(src, tokenizer=tok, block_size=4)
    with pytest.raises(ValueError, match='fewer than one global batch'): BlockLoader(blocks, len(blocks), world_size=2)


def test_unknown_dataset():
    "A HF dataset name that cannot be loaded (here: offline) is wrapped in an error that names the alternatives."
    code = ("from latent_thoughts.data import iter_documents\n"
            "try: next(iter_documents('no-such-user/no-such-dataset', 'train'))\n"
            "except ValueError as e: print('ERR', e)\n")
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_DATASETS_OFFLINE': '1'}
    out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=120).stdout
    assert "ERR cannot load Hugging Face dataset 'no-such-user/no-such-dataset'" in out
    assert "'shakespeare' or a local .txt/.jsonl" in out


# ---- the real embedded corpus ----

def test_real_embedded_corpus():
    "The Shakespeare corpus: > 3 MB, split by scene, files match the manifest, a second call reuses the cache."
    paths = prepare_corpus()
    t = time.perf_counter(); assert prepare_corpus() == paths; dt = time.perf_counter() - t
    assert dt < 5, f'second prepare_corpus took {dt:.1f} s'
    man = corpus_manifest()
    assert man['total_bytes'] > 3_000_000
    assert [man['splits'][s]['n_docs'] for s in SPLITS] == [705, 39, 39]
    parts = [set(man['splits'][s]['docs']) for s in SPLITS]
    assert sum(map(len, parts)) == len(set.union(*parts)) == 783
    docs = list(iter_documents('shakespeare', 'validation'))
    assert len(docs) == 39 and sum(len(d.encode()) for d in docs) == man['splits']['validation']['bytes']
    assert not any(c in d for d in docs for c in '*_\\#')


def test_max_tokens_caps_a_long_source(tmpdata):
    tmp, _, tok = tmpdata
    f = tmp/'many.jsonl'
    f.write_text(''.join(json.dumps({'text': f'document number {i}.'}) + '\n' for i in range(300)))
    full, capped = get_blocks(f, tokenizer=tok, block_size=4), get_blocks(f, tokenizer=tok, block_size=4, max_tokens=500)
    assert full.meta['n_docs'] == 300 and capped.meta['n_docs'] < 300 and capped.n_tokens >= 500
    assert capped.tokens.tolist() == full.tokens[:capped.n_tokens].tolist()     # a prefix of whole documents
    last = len(tok.encode(f'document number {capped.meta["n_docs"] - 1}.')) + 1
    assert capped.n_tokens - last < 500                                          # ... ending with the one that reaches the cap
    assert capped.n_bytes == sum(len(f'document number {i}.') for i in range(capped.meta['n_docs']))


def test_real_prepare_tokenizer_and_blocks():
    "The default tokenizer (vocab 4096) compresses Shakespeare to ~3 bytes/token; the blocks decode to the split's text."
    from latent_thoughts.data import prepare
    p = prepare(verbose=False)
    tok, val = p['tokenizer'], p['blocks']['validation']
    assert len(tok) == 4096 and tok.eos_token == EOT
    assert p['stats']['train']['tokens'] > 1_000_000 and 2.5 < p['stats']['train']['bytes_per_token'] < 4
    docs = list(iter_documents('shakespeare', 'validation'))
    assert tok.decode(val.tokens.tolist()) == ''.join(d + EOT for d in docs)
    assert next(BlockLoader(p['blocks']['train'], 4))['input_ids'].shape == (4, 256)


# ---- streaming: a large source starts at once, reads only what batches need, resumes exactly ----

def _doc(i): return f'Document {i}: ' + 'some more words. ' * (i % 9)

def _write_jsonl(path, n):
    path.write_text(''.join(json.dumps({'text': _doc(i)}) + '\n' for i in range(n)))

def _source(tmp, kind, n, name='src'):
    "A local source of n documents: a .jsonl file, or a directory of data files read by `datasets` (a local HF dataset)."
    d = tmp/f'{name}{n}'
    if not d.exists(): d.mkdir(); _write_jsonl(d/'train.jsonl', n)   # written once: a rewritten file is another source
    return d if kind == 'hf' else d/'train.jsonl'


@pytest.mark.parametrize('kind', ['jsonl', 'hf'])
def test_stream_first_batch_reads_the_same_whatever_the_source_size(tmpdata, kind):
    "Time to the first batch does not grow with the source: a 100x larger one is read exactly as far; a cap bounds every pass."
    tmp, _, tok = tmpdata
    reads = {}
    for n in (400, 40_000):
        ts = TokenStream(_source(tmp, kind, n), tokenizer=tok, block_size=16, max_tokens=3000, read_docs=8)
        ld = StreamLoader(ts, 4)
        next(ld)
        first = (ts.docs_read, ts.tokens_read)
        for _ in range(300): next(ld)                      # ~ 10 passes over the capped stream
        reads[n] = first, (ts.docs_read, ts.tokens_read, ld.epoch)
    assert reads[400] == reads[40_000]
    (docs, tokens), (docs_all, tokens_all, epoch) = reads[400]
    assert docs == 8 and tokens >= 4 * 16                  # one read of 8 documents filled the first batch of 4 x 16 tokens
    assert epoch >= 5                                      # several passes over the capped prefix...
    longest = max(len(tok.encode(_doc(i))) + 1 for i in range(9))
    assert tokens_all <= (epoch + 1) * (3000 + 8 * longest)   # ...none read past the cap (plus the rest of one read)
    assert docs_all < 40_000 / 20


@pytest.mark.parametrize('kind', ['jsonl', 'hf'])
def test_stream_packs_what_the_cache_packs(tmpdata, kind):
    "A pass over a capped stream serves the blocks of the capped cache, i.e. the documents tokenized one by one + eos, cut in blocks."
    tmp, _, tok = tmpdata
    src = _source(tmp, kind, 200)
    cap, bs = 1500, 8
    ld = StreamLoader(TokenStream(src, tokenizer=tok, block_size=bs, max_tokens=cap), 2)
    ref, i = [], 0
    while len(ref) < cap: ref += tok.encode(_doc(i), add_special_tokens=False) + [tok.eos_token_id]; i += 1
    n = len(ref) // bs // 2 * 2                            # whole global batches
    rows = torch.cat([_ids(next(ld)) for _ in range(n // 2)])
    assert rows.tolist() == torch.tensor(ref[:n * bs]).view(n, bs).tolist()
    cached = get_blocks(src, tokenizer=tok, block_size=bs, max_tokens=cap)
    assert cached.n_tokens == len(ref) and torch.equal(rows, cached.batch(np.arange(n)))
    assert torch.equal(_ids(next(ld)), rows[:2])           # the next pass starts over


@pytest.mark.parametrize('kind,shuffle', [('jsonl', 0), ('jsonl', 10), ('hf', 0), ('hf', 10)])
def test_stream_resume_equals_uninterrupted(tmpdata, kind, shuffle):
    "A loader rebuilt from a JSON round trip of the state continues exactly: mid-window, across windows and across passes."
    tmp, _, tok = tmpdata
    ts = TokenStream(_source(tmp, kind, 300), tokenizer=tok, block_size=8, max_tokens=1200)
    ref = StreamLoader(ts, 2, seed=5, shuffle_window=shuffle)
    want = [_ids(next(ref)) for _ in range(80)]            # > 1 pass (about 37 batches per pass)
    for k in (1, 7, 36, 45):
        a = StreamLoader(ts, 2, seed=5, shuffle_window=shuffle)
        for _ in range(k): next(a)
        state = json.loads(json.dumps(a.state_dict()))
        fresh = TokenStream(_source(tmp, kind, 300), tokenizer=tok, block_size=8, max_tokens=1200)  # a new process
        b = StreamLoader(fresh, 2, seed=5, shuffle_window=shuffle); b.load_state_dict(state)
        got = [_ids(next(b)) for _ in range(80 - k)]
        assert all(torch.equal(x, y) for x, y in zip(got, want[k:]))
        assert fresh.docs_read <= 3 * 16                   # resuming re-read about one window, not the stream before it
    if shuffle:
        plain = StreamLoader(ts, 2, seed=5)
        assert not torch.equal(torch.cat(want[:5]), torch.cat([_ids(next(plain)) for _ in range(5)]))


def test_stream_world_size_2_equals_double_batch_and_state_checks(tmpdata):
    tmp, _, tok = tmpdata
    ts = TokenStream(_source(tmp, 'jsonl', 300), tokenizer=tok, block_size=8, max_tokens=1200)
    one = StreamLoader(ts, 6, seed=1, shuffle_window=12)
    ranks = [StreamLoader(ts, 3, seed=1, shuffle_window=12, rank=r, world_size=2) for r in range(2)]
    for _ in range(40): assert torch.equal(torch.cat([_ids(next(r)) for r in ranks]), _ids(next(one)))
    other = TokenStream(_source(tmp, 'jsonl', 300), tokenizer=tok, block_size=8, max_tokens=1000)
    with pytest.raises(ValueError, match=r'stream=.*resume with the same data'): StreamLoader(other, 6, seed=1, shuffle_window=12).load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match='fewer than one global batch'): next(StreamLoader(ts, 500))
    with pytest.raises(ValueError, match='less than one block'): TokenStream(_source(tmp, 'jsonl', 300), tokenizer=tok, block_size=8, max_tokens=7)
    with pytest.raises(FileNotFoundError, match='not found'): TokenStream(tmp/'nope.jsonl', tokenizer=tok)


def test_doc_stream_positions_resume_every_kind(tmpdata):
    tmp, src, _ = tmpdata
    f = tmp/'gaps.jsonl'
    f.write_text(''.join(json.dumps({'text': t}) + '\n\n' for t in TEXTS))
    hf = _source(tmp, 'hf', 12)
    for s in (src, f, hf):
        whole = list(doc_stream(s))
        assert [t for t, _ in whole] == list(iter_documents(s))
        for k in range(len(whole)):
            rest = [t for t, _ in doc_stream(s, start=json.loads(json.dumps(whole[k][1])))]
            assert rest == [t for t, _ in whole[k + 1:]]

"""The `latent-thoughts` command: help for every subcommand, errors, and a train -> eval -> generate round trip."""
import contextlib, io, json, os, subprocess, sys
from pathlib import Path
import pytest
from latent_thoughts.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**{k: v for k, v in os.environ.items() if k != 'LATENT_THOUGHTS_RUNS'}, 'OMP_NUM_THREADS': '1', 'TOKENIZERS_PARALLELISM': 'false', 'HF_HUB_OFFLINE': '1'}


@pytest.fixture(autouse=True)
def _default_runs_folder(monkeypatch):
    "These tests name their folders: a runs folder set for the figure tests ($LATENT_THOUGHTS_RUNS) must not leak in."
    monkeypatch.delenv('LATENT_THOUGHTS_RUNS', raising=False)

def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: rc = main(argv)
        except SystemExit as e: rc = e.code
    return rc, out.getvalue() + err.getvalue()

@pytest.mark.parametrize('cmd', ['prepare', 'train', 'eval', 'generate', 'demo', 'suite'])
def test_help(cmd):
    rc, txt = run([cmd, '--help'])
    assert rc == 0 and f'usage: latent-thoughts {cmd}' in txt and len(txt) > 300, txt

def test_console_script_help():
    exe = Path(sys.executable).parent/'latent-thoughts'
    r = subprocess.run([str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ['-m', 'latent_thoughts.cli']), '--help'],
                       capture_output=True, text=True, env=ENV)
    assert r.returncode == 0
    for cmd in ('prepare', 'train', 'eval', 'generate', 'demo', 'harness', 'flops', 'suite'): assert cmd in r.stdout

def test_errors_are_one_clear_line(tmp_path):
    rc, txt = run(['train', '--config', 'micro', 'train.nope=1']); assert rc == 1 and 'valid keys of train' in txt
    rc, txt = run(['train', '--config', str(tmp_path/'none.yaml')]); assert rc == 1 and 'no config' in txt
    rc, txt = run(['eval', '--checkpoint', str(tmp_path)]); assert rc == 1 and 'not a run, checkpoint or model directory' in txt
    rc, txt = run([]); assert rc == 2 and 'examples:' in txt
    rc, txt = run(['suite', 'train', 'no-such-run', '--scale', 'smoke'])
    assert rc == 1 and txt.startswith("latent-thoughts suite: error: unknown run 'no-such-run'") and txt.count('\n') == 1, txt
    rc, txt = run(['suite', 'status', '--scale', 'huge']); assert rc == 1 and "unknown scale 'huge'" in txt and txt.count('\n') == 1
    rc, txt = run(['suite', 'list', '--figure', 'fig99']); assert rc == 1 and "unknown figure 'fig99'" in txt
    rc, txt = run(['suite', 'train', '--shard', '2/2', '--scale', 'smoke']); assert rc == 1 and 'I/N with 0 <= I < N' in txt

def test_flops_passthrough():
    rc, txt = run(['flops', '--help'])
    assert rc == 0 and 'usage' in txt.lower()

def test_harness_passthrough_exit_status(tmp_path):
    "The harness through the console entry point: exit status 0 on success, a one-line error (status 1) on bad input."
    out = tmp_path/'res.json'
    rc, txt = run(['harness', '--checkpoint', str(ROOT/'assets'/'micro-vanilla'), '--tasks', 'lt_nextline', '--limit', '3',
                   '--output', str(out)])
    assert rc == 0 and out.exists() and "'results'" not in txt, txt[-500:]
    rc, txt = run(['harness', '--checkpoint', str(tmp_path), '--tasks', 'lt_nextline'])
    assert rc == 1 and 'latent-thoughts harness: error:' in txt, txt[-500:]

def test_train_eval_generate_round_trip(tmp_path):
    "Train a micro latent model for 3 steps, evaluate it on validation and generate from it, each by the CLI."
    cli = [sys.executable, '-m', 'latent_thoughts.cli']
    out = tmp_path/'run'
    r = subprocess.run(cli + ['train', '--config', 'micro', 'model.method=latent', 'model.method_args={n_thoughts: 1, train_iters: [2, 3]}',
                              'train.steps=3', 'data.batch_size=4', 'data.eval_max_blocks=4', 'train.progress=false',
                              f'train.out_dir={out}'], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout[r.stdout.index('{'):])
    assert summary['step'] == 3 and Path(summary['checkpoint']).name == 'step_00000003'
    recs = [json.loads(l) for l in (out/'metrics.jsonl').read_text().splitlines()]
    assert {'step', 'loss', 'lr', 'tokens', 'tokens_per_s', 'grad_norm', 'residual_1', 'residual_2'} <= set(recs[0])
    assert any('eval_ppl' in r for r in recs)
    r = subprocess.run(cli + ['eval', '--checkpoint', str(out), '--max-tokens', '300', '--jacobi-iters', '2'],
                       cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads(r.stdout[r.stdout.index('{'):])
    assert ev['split'] == 'validation' and ev['method'] == 'latent' and 1 < ev['ppl'] < 10_000 and ev['n_tokens'] == 300
    r = subprocess.run(cli + ['generate', '--checkpoint', str(out/'checkpoints'/'step_00000003'), '--prompt', 'ROMEO:',
                              '--max-new-tokens', '8', '--temperature', '1'], cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith('ROMEO:') and len(r.stdout.strip()) > len('ROMEO:')


def test_checkpoint_arguments_load_through_one_loader(tmp_path, monkeypatch):
    "--checkpoint takes a plain HF directory (as the vanilla method) and a suite run (suite:SCALE/RUN); both go through load_method_lm."
    import torch
    from latent_thoughts.cli import resolve_checkpoint, load_checkpoint
    from latent_thoughts.core import build_lm
    from latent_thoughts.suite import Suite
    lm = build_lm(vocab_size=4096, d_model=16, n_layer=1, n_head=2, max_positions=64, seed=2).eval()
    lm.save_pretrained(tmp_path/'hf')
    model, tok, cfg = load_checkpoint(tmp_path/'hf')
    x = torch.randint(0, 4096, (1, 7))
    assert model.method == 'vanilla' and cfg is None and torch.allclose(model(x).logits, lm(x).logits, atol=1e-6)
    p = tmp_path/'suite.yaml'; p.write_text((ROOT/'suite.yaml').read_text())
    S = Suite(p); S.train(['vanilla-neox-S'], 'smoke', progress=False)
    monkeypatch.setenv('LATENT_THOUGHTS_SUITE', str(p))
    d, cfg = resolve_checkpoint('suite:smoke/vanilla-neox-S')
    assert d == S.checkpoint('vanilla-neox-S', 'smoke') and cfg.model.d_model == 16
    rc, txt = run(['generate', '--checkpoint', 'suite:smoke/vanilla-neox-S', '--prompt', 'ROMEO:', '--max-new-tokens', '4'])
    assert rc == 0 and txt.startswith('ROMEO:'), txt[-500:]
    rc, txt = run(['generate', '--checkpoint', 'suite:smoke/latent-neox-S', '--prompt', 'x'])
    assert rc == 1 and 'has no final model' in txt and 'suite train latent-neox-S --scale smoke' in txt


def test_suite_train_jobs_runs_shards_in_parallel(tmp_path, capsys):
    "`suite train --jobs 2`: two single-threaded workers, one per shard, train the selection once between them."
    from latent_thoughts.suite import Suite
    p = tmp_path/'suite.yaml'; p.write_text((ROOT/'suite.yaml').read_text())
    rc = main(['suite', 'train', 'vanilla-gpt2-S', 'vanilla-llama-S', '--scale', 'smoke', '--suite', str(p), '--jobs', '2'])
    out = capsys.readouterr().out
    assert rc == 0 and out.count('1 run(s) trained and published') == 2 and '[0/2]' in out and '[1/2]' in out, out[-2000:]
    assert Suite(p).status('smoke', names=['vanilla-gpt2-S', 'vanilla-llama-S']).state.tolist() == ['done', 'done']

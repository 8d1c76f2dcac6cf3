"""The companion site and the README (tools/docs.py): README.md is what nbs/index.ipynb generates; a small site
(index + one chapter + one paper notebook at smoke + explore) builds, documents every public function and method,
and renders in headless Chromium with every image loaded and every internal link resolved. `make docs` builds all."""
import importlib, inspect, json, os, re, subprocess, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/'tools'))
import docs  # noqa: E402  (tools/docs.py)

CHAPTER, MODULE = '07_config', 'latent_thoughts.config'   # a cheap chapter with classes, methods and functions
PAPER = 'fig12_convergence'
SUBSET = ('index', CHAPTER, PAPER, 'explore')


def _tool(*args, timeout=900, **env):
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'docs.py'), *args], cwd=ROOT, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, 'OMP_NUM_THREADS': '1', 'HF_HUB_OFFLINE': '1', **env})
    return r.returncode, r.stdout + r.stderr


def _title(nb: Path) -> str:
    "The notebook's first `# heading`, read independently of tools/docs.py."
    for c in json.loads(nb.read_text())['cells']:
        s = ''.join(c['source']).strip()
        if c['cell_type'] == 'markdown' and s.startswith('# '): return s.splitlines()[0][2:].strip()


# ---------------------------------------------------------------- README <- index.ipynb
def test_readme_in_sync():
    rc, out = _tool('readme', '--check', timeout=300)
    assert rc == 0, f"README.md is not what nbs/index.ipynb generates: run `.venv/bin/python tools/docs.py readme`\n{out[-3000:]}"


def test_readme_content():
    "The generated parts say what is true today: every chapter in order, one line per paper notebook, the two commands."
    from latent_thoughts.analysis import paper_notebooks
    readme = (ROOT/'README.md').read_text()
    assert readme.splitlines()[2] == '# latent_thoughts'
    assert 'make demo' in readme and 'make test' in readme and 'make docs' in readme
    chapters = sorted((ROOT/'nbs').glob('[0-9]*_*.ipynb'))
    pos = [readme.find(f'(nbs/{p.name})') for p in chapters]
    assert all(i > 0 for i in pos) and pos == sorted(pos), 'reading path: every chapter, in number order'
    for nb in paper_notebooks(ROOT/'nbs'):
        line = f"| [`{nb.name}`](nbs/{nb.name}) | {_title(nb).replace('|', chr(92) + '|')} |"
        assert readme.count(line) == 1, f'figure list misses {nb.name}: {line}'
    assert readme.count('](nbs/') >= len(chapters) + len(paper_notebooks(ROOT/'nbs'))
    assert '## What holds at micro scale' in readme
    claims = ROOT/'assets/suite/micro/claims.md'
    if claims.exists(): assert claims.read_text().strip().splitlines()[0] in readme


def test_readme_links_resolve():
    "Every relative link of the README points at a file of the repository."
    for url in re.findall(r'\]\(([^)\s]+)\)', (ROOT/'README.md').read_text()):
        if re.match(r'^[a-z]+:|^#', url): continue
        assert (ROOT/url.split('#')[0]).exists(), f'README links to a missing file: {url}'


# ---------------------------------------------------------------- a small site
@pytest.fixture(scope='module')
def site(tmp_path_factory):
    out = tmp_path_factory.mktemp('site')
    runs = tmp_path_factory.mktemp('docs-runs')      # smoke runs train here, never into runs/suite
    rc, log = _tool('build', '--out', str(out), '--engine', 'offline', '--jobs', '2', '--only', *SUBSET,
                    LT_DOCS_RUNS=str(runs), LATENT_THOUGHTS_RUNS=str(runs))
    assert rc == 0, f'the docs build failed:\n{log[-6000:]}'
    return out


def test_site_pages(site):
    names = {'index.html', 'config.html', f'{PAPER}.html', 'explore.html'}
    assert names <= {p.name for p in site.glob('*.html')}
    for n in names:
        page = (site/n).read_text()
        assert '<nav id="lt-nav">' in page and page.count('href="index.html"') >= 1
        assert 'Traceback (most recent call last)' not in page, f'{n} shows an error'
    # the paper page: executed at smoke, its figure shown and every file it wrote linked
    page = (site/f'{PAPER}.html').read_text()
    figs = sorted(p.relative_to(site).as_posix() for p in (site/'figures'/PAPER).iterdir())
    assert any(f.endswith('.png') for f in figs) and any(f.endswith('.json') for f in figs)
    for f in figs: assert f'href="{f}"' in page, f
    assert re.search(rf'<img [^>]*src="figures/{PAPER}/{PAPER}.png"', page), 'the figure is shown'
    # the landing page links the built pages, and the unbuilt chapters out to the repository
    index = (site/'index.html').read_text()
    assert 'href="config.html"' in index and f'href="{PAPER}.html"' in index and 'href="explore.html"' in index
    assert 'blob/main/nbs/04_latent.ipynb' in index


def test_every_public_function_and_method_documented(site):
    "A doc entry (an anchor of nbdev's form, `name` / `class.method` in lower case) for each public name of the module."
    mod = importlib.import_module(MODULE)
    ids = set(re.findall(r'\bid="([^"]+)"', (site/'config.html').read_text()))
    want = []
    for n in mod.__all__:
        o = getattr(mod, n)
        if not (inspect.isfunction(o) or inspect.isclass(o)) or getattr(o, '__module__', None) != MODULE: continue
        want.append(n)
        if inspect.isclass(o):
            want += [f'{n}.{k}' for k, v in vars(o).items()
                     if inspect.isfunction(v) and not k.startswith('_') and v.__module__ == MODULE]
    assert any('.' in w for w in want), 'the chapter should have a method to document'
    missing = [w for w in want if w.lower() not in ids]
    assert not missing, f'no doc entry for {missing}'


def test_explore_notebook(site):
    "explore.ipynb: not exported, not a paper notebook, skipped by nbdev_test; executed in the site with its checks."
    from latent_thoughts.analysis import paper_notebooks
    nb = json.loads((ROOT/'nbs'/'explore.ipynb').read_text())
    src = [''.join(c['source']) for c in nb['cells']]
    assert nb['cells'][0]['cell_type'] == 'raw' and 'skip_exec: true' in src[0]
    assert not any(re.search(r'^\s*#\|\s*(default_exp|export)', s, re.M) for s in src)
    assert ROOT/'nbs'/'explore.ipynb' not in paper_notebooks(ROOT/'nbs')
    page = (site/'explore.html').read_text()
    assert 'steps per token' in page and 'p(next) thinking' in page
    assert re.search(r'<img [^>]*src="explore_files/[^"]+\.png"', page), 'the picture is on the page'


def test_site_in_browser(site, tmp_path):
    "Headless Chromium opens the index and the paper page: every image loads, every internal link and anchor resolves."
    pytest.importorskip('websocket', reason='websocket-client drives the browser (pip install websocket-client)')
    if docs.find_browser() is None:
        pytest.skip('no Chromium-family browser on PATH (Debian: apt-get install chromium; .ci/run installs it)')
    with docs.Chromium() as b:
        for name, min_images in (('index.html', 0), (f'{PAPER}.html', 1), ('config.html', 0), ('explore.html', 1)):
            info, problems = docs.check_page(b, site/name, site)
            assert not problems, f'{name}: {problems}'
            assert info['nav'] and info['text'] > 500, name
            assert len(info['images']) >= min_images and all(i['ok'] for i in info['images']), (name, info['images'])
            internal = [h for h in info['links'] if h.startswith('file:')]
            assert len(internal) >= 4, (name, internal)
        b.screenshot(tmp_path/'paper.png')
        assert (tmp_path/'paper.png').stat().st_size > 10_000


def test_broken_link_is_caught(site, tmp_path):
    "The checker is not vacuous: a page with a missing image, page and anchor is reported three times."
    if docs.find_browser() is None: pytest.skip('no Chromium-family browser on PATH (Debian: apt-get install chromium)')
    pytest.importorskip('websocket')
    bad = site/'_broken.html'
    bad.write_text('<html><body><nav id="lt-nav"></nav><img src="nope.png"><a href="missing.html">x</a>'
                   '<a href="index.html#no-such-anchor">y</a><a href="index.html">ok</a></body></html>')
    try:
        with docs.Chromium() as b: _, problems = docs.check_page(b, bad, site)
    finally: bad.unlink()
    assert len(problems) == 3, problems


def test_progress_bars_are_widgets(tmp_path):
    "In a Jupyter kernel tqdm.auto draws a widget (ipywidgets installed), not the 'IProgress not found' warning."
    nbformat = pytest.importorskip('nbformat'); nbclient = pytest.importorskip('nbclient')
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell('from tqdm.auto import tqdm\nfor _ in tqdm(range(3)): pass')])
    nbclient.NotebookClient(nb, kernel_name='python3', timeout=120, resources={'metadata': {'path': str(tmp_path)}}).execute()
    outs = nb.cells[0].outputs
    assert not any('IProgress not found' in ''.join(o.get('text', '')) for o in outs), outs
    assert any('application/vnd.jupyter.widget-view+json' in o.get('data', {}) for o in outs), \
        f'no progress widget (is ipywidgets installed? it is a dev requirement: pip install -e ".[dev]"): {outs}'

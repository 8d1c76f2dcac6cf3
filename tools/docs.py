#!/usr/bin/env python
"""The companion site (`make docs`) and the README (generated from `nbs/index.ipynb`).

  python tools/docs.py build [--out _docs] [--scale smoke|micro] [--only STEM ...] [--jobs 2] [--engine auto|offline|nbdev]
  python tools/docs.py readme [--check]     write README.md from nbs/index.ipynb (--check: fail if it differs)
  python tools/docs.py check [--out _docs] [PAGE ...]   open the site in headless Chromium: images load, links resolve
  python tools/docs.py proc-check           which notebooks nbdev's own processing (nbdev_proc_nbs) fails on, and where

`build` renders every page of the site into `--out` (default `_docs/`, git-ignored):
- `index.ipynb` (the landing chapter), every library chapter (`nbs/NN_*.ipynb`) and `explore.ipynb`, executed as
  `nbdev_test` runs them (execnb's CaptureShell in `nbs/`, cells flagged `slow`/`cuda` skipped and marked), with nbdev's
  own doc processors: a `show_doc` entry after every exported function and class (nbdev's `add_show_docs`) and, added
  here, after every public method of an exported class (defined in its body, or attached by `@patch` or a decorator
  of the chapter's own: found on the exported module); `#| hide` cells dropped; exported source folded; doc links
  (`LatentThoughtLM`) pointing inside the site (links to private names, which have no entry, left as plain code);
- every paper notebook (`latent_thoughts.analysis.paper_notebooks()`) executed by papermill at `--scale` (smoke by
  default: its `(smoke: …)` parameters, runs trained into a temporary `$LATENT_THOUGHTS_RUNS`, or `$LT_DOCS_RUNS` to
  reuse them; `micro`: its defaults, reading the suite where it is), its figures and tables written into the site
  (`figures/<stem>/`), shown and linked under its title;
- HTML by nbconvert (images extracted as files), with a navigation bar on every page.
With `--engine nbdev` (the default `auto` picks it where `quarto` is installed) it runs nbdev's own `nbdev_docs`
instead, then rewrites README.md with this tool (nbdev's quarto README differs in form).
A notebook that fails to execute fails the build (exit 1) and names the notebook and cell.
"""
from __future__ import annotations
import argparse, ast, html, json, os, re, shutil, subprocess, sys, tempfile, time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
import multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
NBS = ROOT/'nbs'
GIT_URL = 'https://github.com/latent-thoughts/latent_thoughts'
SKIP_FLAGS = ('slow', 'cuda')    # settings.ini tst_flags: what `nbdev_test` skips by default

# ---------------------------------------------------------------- pages
@dataclass
class Page:
    kind: str          # 'index', 'chapter', 'explore' or 'paper'
    src: Path          # the notebook
    name: str          # the HTML file in the site
    title: str = ''
    description: str = ''
    seconds: float = 0.0
    files: list = field(default_factory=list)   # paper pages: what the notebook wrote (relative to the site)

def _src(cell) -> str: return ''.join(cell['source']) if isinstance(cell['source'], list) else cell['source']

def nb_title(path) -> tuple[str, str]:
    "(title, description) of a notebook: its first markdown `# heading` and the `> …` lines under it."
    for c in json.loads(Path(path).read_text(encoding='utf-8'))['cells']:
        if c['cell_type'] != 'markdown': continue
        s = _src(c).strip()
        m = re.match(r'#\s+(.+)', s)
        if not m: continue
        desc = ' '.join(l[1:].strip() for l in s.splitlines()[1:] if l.startswith('>'))
        return m.group(1).strip(), desc
    return Path(path).stem, ''

def page_name(path) -> str:
    "nbdev's page name: the notebook's stem without its `NN_` number (`04_latent` -> `latent.html`)."
    stem = Path(path).stem
    return re.sub(r'^\d+[a-z]?_', '', stem) + '.html'

def chapters(nbs:Path=NBS) -> list[Path]:
    "The library chapters in reading order (their numbers)."
    return sorted(p for p in nbs.glob('[0-9]*_*.ipynb'))

def paper_nbs(nbs:Path=NBS) -> list[Path]:
    from latent_thoughts.analysis import paper_notebooks
    return paper_notebooks(nbs)

def site_pages(nbs:Path=NBS) -> list[Page]:
    "Every page of the site, in navigation order."
    pages = []
    if (nbs/'index.ipynb').exists(): pages.append(Page('index', nbs/'index.ipynb', 'index.html'))
    pages += [Page('chapter', p, page_name(p)) for p in chapters(nbs)]
    if (nbs/'explore.ipynb').exists(): pages.append(Page('explore', nbs/'explore.ipynb', 'explore.html'))
    pages += [Page('paper', p, p.stem + '.html') for p in paper_nbs(nbs)]
    for p in pages: p.title, p.description = nb_title(p.src)
    names = [p.name for p in pages]
    dup = {n for n in names if names.count(n) > 1}
    if dup: raise SystemExit(f"two notebooks render to the same page {sorted(dup)}: rename one of them")
    return pages

# ---------------------------------------------------------------- executing a chapter as nbdev_test does
def _directives(src:str) -> dict:
    d = {}
    for l in src.splitlines():
        m = re.match(r'\s*#\|\s*([\w-]+:?)\s*(.*)', l)
        if m: d[m.group(1)] = m.group(2).split()
        elif l.strip(): break
    return d

def _top_defs(cell_source:str) -> list:
    "The top-level function and class definitions of a cell, in source order (IPython magics blanked)."
    try: tree = ast.parse(re.sub(r'^\s*[%!].*$', '', cell_source, flags=re.M))
    except SyntaxError: return []
    return [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]

def _public_methods(node) -> list[str]:
    "Public methods defined in a class body (properties are attributes, not entries)."
    out = []
    for f in node.body:
        if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) or f.name.startswith('_'): continue
        decos = {getattr(d, 'id', getattr(d, 'attr', '')) for d in f.decorator_list}
        if decos & {'property', 'setter', 'getter', 'deleter', 'cached_property', 'overload'}: continue
        out.append(f'{node.name}.{f.name}')
    return out

_SD = re.compile(r'^show_doc\(([\w.]+)\)', re.M)

def _add_method_docs(nb):
    """After nbdev's `add_show_docs`: the show_doc cells after each exported cell put in source order (nbdev inserts
    them reversed), each class followed by a `show_doc(Class.method)` for every public method of its body."""
    from execnb.nbio import mk_cell
    shown = set(_SD.findall('\n'.join(c.source for c in nb.cells if c.cell_type == 'code')))
    i = 0
    while i < len(nb.cells):
        c = nb.cells[i]
        d = getattr(c, 'directives_', None) or {}
        if not (c.cell_type == 'code' and ({'export', 'exports'} & set(d)) and 'hide' not in d): i += 1; continue
        j = i + 1
        while j < len(nb.cells) and getattr(nb.cells[j], 'has_sd', False): j += 1
        sd = {(_SD.findall(x.source) or [''])[0]: x for x in nb.cells[i + 1:j]}
        order = []
        for node in _top_defs(c.source):
            order += [k for k in sd if k == node.name or k.endswith('.' + node.name)]
            if isinstance(node, ast.ClassDef) and not node.name.startswith('_'):
                for m in _public_methods(node):
                    if m in shown: continue
                    cell = mk_cell(f'show_doc({m})'); cell.has_sd = True; cell.method_doc = True
                    sd[m] = cell; order.append(m); shown.add(m)
        order += [k for k in sd if k not in order]
        nb.cells[i + 1:j] = [sd[k] for k in dict.fromkeys(order)]
        i += 1 + len(sd)

def module_methods(nb_path) -> dict:
    """{'Class.method': defining function's name} for public methods of a chapter's exported classes, read from the
    exported module (in the calling process: the chapter's own run must not import its module first)."""
    import importlib, inspect
    src = '\n'.join(_src(c) for c in json.loads(Path(nb_path).read_text(encoding='utf-8'))['cells'] if c['cell_type'] == 'code')
    m = re.search(r'^\s*#\|\s*default_exp\s+(\S+)', src, re.M)
    if not m: return {}
    modname = f"latent_thoughts.{m.group(1)}"
    try: mod = importlib.import_module(modname)
    except Exception: return {}                  # the chapter's own execution will say what is wrong
    out = {}
    for n in getattr(mod, '__all__', []):
        o = getattr(mod, n, None)
        if not (inspect.isclass(o) and o.__module__ == modname): continue
        for k, v in vars(o).items():
            f = getattr(v, '__func__', v)
            if not k.startswith('_') and inspect.isfunction(f) and f.__module__ == modname: out[f'{n}.{k}'] = f.__name__
    return out

def _add_module_method_docs(nb, methods:dict) -> list[str]:
    """Public methods attached to a chapter's classes some other way (fastcore's `@patch` of a private name, a
    decorator of the chapter's own) still get an entry, placed after the cell that defines them."""
    from execnb.nbio import mk_cell
    shown = set(_SD.findall('\n'.join(c.source for c in nb.cells if c.cell_type == 'code')))
    added = []
    for nm, fname in methods.items():
        if nm in shown or nm.split('.')[0] not in shown: continue
        pat = re.compile(rf'^\s*(async\s+)?def\s+{re.escape(fname)}\s*\(', re.M)
        idx = next((i for i, c in enumerate(nb.cells) if c.cell_type == 'code' and pat.search(c.source)), None)
        if idx is None: continue
        while idx + 1 < len(nb.cells) and getattr(nb.cells[idx + 1], 'has_sd', False): idx += 1
        cell = mk_cell(f'show_doc({nm})'); cell.has_sd = True; cell.method_doc = True
        nb.cells.insert(idx + 1, cell); shown.add(nm); added.append(nm)
    return added

def _quiet(log:str|None):
    "Send this worker's own output (library logs, kernel chatter) to `log`: the build's output stays one line a page."
    if not log: return
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush(); sys.stderr.flush(); os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)

def execute_chapter(src:str, dst:str, runs_dir:str, force:bool=False, methods:dict|None=None, log:str|None=None) -> dict:
    "Run a chapter as `nbdev_test` would (`force`: even with `skip_exec`), nbdev's show_doc cells added; write it to `dst`."
    _quiet(log)
    os.environ.update(IN_TEST='1', LATENT_THOUGHTS_RUNS=runs_dir, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'),
                      HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    from execnb.nbio import read_nb, write_nb
    from execnb.shell import CaptureShell
    from nbdev.process import NBProcessor
    from nbdev.frontmatter import FrontmatterProc
    from nbdev.processors import populate_language, add_show_docs
    from fastcore.xtras import working_directory
    src = Path(src)
    nb = read_nb(src)
    NBProcessor(nb=nb, procs=[FrontmatterProc, populate_language, add_show_docs], rm_directives=False).process()
    _add_method_docs(nb)
    _add_module_method_docs(nb, methods or {})
    fm = getattr(nb, 'frontmatter_', {}) or {}
    skip_all = not force and str(fm.get('skip_exec', '')).lower() in ('true', '1', 'yes')
    start, err, skipped = time.time(), None, 0
    if not skip_all:
        k = CaptureShell(src)
        k.run('from nbdev.showdoc import show_doc')
        with working_directory(src.parent):
            for i, cell in enumerate(nb.cells):
                if cell.cell_type != 'code': continue
                d = getattr(cell, 'directives_', None) or {}
                if 'nbdev_export(' in cell.source or d.get('eval:', [''])[0].lower() == 'false': continue
                flags = set(SKIP_FLAGS) & set(d)
                if flags:
                    cell.metadata['docs_skipped'] = sorted(flags); skipped += 1; continue
                k.cell(cell)
                if k.exc is not None:
                    err = f"{src.name}, cell {i} ({cell.get('id', '?')}):\n{cell.source}\n\n{type(k.exc).__name__}: {k.exc}"
                    break
    for c in nb.cells:   # keep what the renderer needs to know as plain metadata
        if getattr(c, 'has_sd', False): c.metadata['docs_show_doc'] = True
        if getattr(c, 'method_doc', False): c.metadata['docs_method_doc'] = True
    nb.metadata['docs_executed'] = not skip_all
    write_nb(nb, dst)
    return dict(seconds=time.time() - start, error=err, skipped=skipped, executed=not skip_all)

def execute_paper(src:str, dst:str, figs:str, scale:str, runs_dir:str|None, log:str|None=None) -> dict:
    "Run a paper notebook with papermill at `scale` (smoke: its `(smoke: …)` parameters), its outputs into `figs`."
    _quiet(log)
    os.environ.update(OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'), HF_HUB_OFFLINE='1', TOKENIZERS_PARALLELISM='false')
    if runs_dir: os.environ['LATENT_THOUGHTS_RUNS'] = runs_dir
    import papermill
    from latent_thoughts.analysis import smoke_parameters
    params = dict(smoke_parameters(src)) if scale == 'smoke' else {}
    params['output_dir'] = str(figs)
    start, err = time.time(), None
    try:
        papermill.execute_notebook(str(src), str(dst), cwd=str(ROOT), kernel_name='python3', progress_bar=False,
                                   parameters=params)
    except Exception as e:   # papermill writes the notebook up to the failing cell
        err = f"{Path(src).name}: {type(e).__name__}: {str(e)[-2000:]}"
    return dict(seconds=time.time() - start, error=err, params=params)

# ---------------------------------------------------------------- rendering
_ATTR = re.compile(r'(\]\([^)\s]*\))\{[^}\n]*\}')          # quarto link attributes: [source](url){target=…}
_WIDGET = 'application/vnd.jupyter.widget-view+json'

def _clean_outputs(cell):
    "Static-site outputs: quarto link attributes removed, widget views replaced by their text (no widget JS offline)."
    for o in cell.get('outputs', []):
        data = o.get('data')
        if not data: continue
        if _WIDGET in data:
            data.pop(_WIDGET)
            if not data: data['text/plain'] = ''
        if 'text/markdown' in data:
            md = data['text/markdown']
            md = ''.join(md) if isinstance(md, list) else md
            data['text/markdown'] = _ATTR.sub(r'\1', md).replace('#LNone)', ')')   # no line number known

def _strip_directives(src:str) -> str:
    lines = src.splitlines()
    while lines and re.match(r'\s*#\|', lines[0]): lines.pop(0)
    return '\n'.join(lines).strip('\n')

def _fm_heading(raw:str) -> str:
    "The `# title` and `> description` markdown of a raw front-matter cell ('' when it has no title)."
    import yaml
    m = re.match(r'\s*---\s*\n(.*?)\n---', raw, re.S)
    try: fm = yaml.safe_load(m.group(1)) if m else None
    except yaml.YAMLError: fm = None
    if not isinstance(fm, dict) or not fm.get('title'): return ''
    return f"# {fm['title']}" + (f"\n\n> {fm['description']}" if fm.get('description') else '')

def _heading(nb_path) -> str:
    "The notebook's title cell as written (nbdev's front matter keeps one line of the description)."
    t, d = nb_title(nb_path)
    return f"# {t}" + (f"\n\n> {d}" if d else '')

def _md_cell(src):
    import nbformat
    return nbformat.v4.new_markdown_cell(src)

def prepare_for_html(nb_path:Path, page:Page, banner:str=''):
    "The executed notebook as a reader sees it: nbdev's directives applied (hide, echo, exports folded), doc links added."
    import nbformat
    from nbdev.doclinks import NbdevLookup
    nb = nbformat.read(str(nb_path), as_version=4)
    nl = NbdevLookup()
    out = []
    for c in nb.cells:
        src = c.source
        if c.cell_type == 'raw':                                        # front matter: nbdev made it of the title cell
            if _fm_heading(src): out.append(_md_cell(_heading(page.src)))
            continue
        if c.cell_type == 'markdown':
            s = src.strip()
            if s.startswith('#') and s.endswith(' -'): continue           # nbdev's rm_header_dash
            c.source = nl.linkify(src)
            out.append(c)
            if banner and s.startswith('# '): out.append(_md_cell(banner)); banner = ''   # under the title
            continue
        d = _directives(src)
        if {'hide', 'default_exp'} & set(d) or d.get('include:') == ['false']: continue
        if 'nbdev_export(' in src: continue
        _clean_outputs(c)
        for o in c.get('outputs', []):
            if o.get('data', {}).get('text/markdown'): o['data']['text/markdown'] = nl.linkify(o['data']['text/markdown'])
        body = _strip_directives(src)
        if c.metadata.get('docs_show_doc'):
            c.source = ''; c.metadata['docs_no_input'] = True
            out.append(c); continue
        if {'export', 'exporti'} & set(d):                                # nbdev hides exported source: fold it here
            if body:
                out.append(_md_cell('<details class="lt-exported"><summary>Exported source</summary>\n\n```python\n'
                                    + body + '\n```\n\n</details>'))
            if c.get('outputs'): c.source = ''; c.metadata['docs_no_input'] = True; out.append(c)
            continue
        if d.get('echo:') == ['false'] or 'hide_input' in d: c.metadata['docs_no_input'] = True
        if d.get('output:') == ['false']: c.outputs = []
        c.source = body
        if c.metadata.get('docs_skipped'):
            out.append(c)
            out.append(_md_cell(f"<p class='lt-skipped'>(not executed in the docs build: flagged "
                                f"<code>{', '.join(c.metadata['docs_skipped'])}</code>, like <code>nbdev_test</code> skips it)</p>"))
            continue
        out.append(c)
    if banner: out.insert(0, _md_cell(banner))
    nb.cells = out
    nb.metadata.pop('widgets', None)
    return nb

NAV_CSS = """
<style>
body { margin-left: 290px !important; }
#lt-nav { position: fixed; top: 0; left: 0; bottom: 0; width: 270px; overflow-y: auto; padding: 14px 12px;
  background: #f7f7f9; border-right: 1px solid #ddd; font: 14px/1.35 system-ui, sans-serif; z-index: 1000; }
#lt-nav h2 { font-size: 16px; margin: 0 0 10px; } #lt-nav h3 { font-size: 12px; text-transform: uppercase;
  color: #666; margin: 14px 0 4px; } #lt-nav ol, #lt-nav ul { margin: 0; padding-left: 20px; }
#lt-nav li { margin: 2px 0; } #lt-nav a { color: #1a4f8b; text-decoration: none; } #lt-nav a.current { font-weight: bold; color: #000; }
.lt-banner { background: #eef4fb; border: 1px solid #c9dbf0; border-radius: 6px; padding: 8px 14px; margin: 10px 0 18px;
  font: 14px/1.4 system-ui, sans-serif; } .lt-banner ul { margin: 4px 0; }
details.lt-exported { margin: 6px 0 10px; } details.lt-exported summary { cursor: pointer; color: #555; font-size: 13px; }
p.lt-skipped { color: #a60; font-size: 13px; } a code { color: #1a4f8b !important; }
</style>
"""

def nav_html(pages:list[Page], current:Page) -> str:
    def a(p, label=None):
        cls = ' class="current"' if p.name == current.name else ''
        return f'<a href="{p.name}"{cls} title="{html.escape(p.description or p.title)}">{html.escape(label or p.title)}</a>'
    idx = [p for p in pages if p.kind == 'index']
    ch = [p for p in pages if p.kind == 'chapter']
    ex = [p for p in pages if p.kind == 'explore']
    pa = [p for p in pages if p.kind == 'paper']
    s = ['<nav id="lt-nav">', f'<h2>{a(idx[0], "latent_thoughts") if idx else "latent_thoughts"}</h2>']
    if ch: s += ['<h3>Chapters (reading order)</h3><ol>'] + [f'<li>{a(p, Path(p.src).stem)}</li>' for p in ch] + ['</ol>']
    if ex: s += ['<h3>Explore</h3><ul>'] + [f'<li>{a(p, "Explore a prompt")}</li>' for p in ex] + ['</ul>']
    short = [p.title.split(' — ')[0] for p in pa]
    if pa: s += ['<h3>Paper figures and tables</h3><ul>'] + [
        f'<li>{a(p, l if short.count(l) == 1 else p.title if len(p.title) < 48 else p.title[:46] + "…")}</li>'
        for p, l in zip(pa, short)] + ['</ul>']
    return '\n'.join(s + ['</nav>'])

def _banner(page:Page, scale:str) -> str:
    "Paper pages: how the notebook was run here, its figures (the PNGs it saved) and links to every file it wrote."
    if page.kind != 'paper': return ''
    items = ''.join(f'<li><a href="{html.escape(f)}">{html.escape(Path(f).name)}</a></li>' for f in page.files)
    how = ('its <code>(smoke: …)</code> parameters (smoke scale: tiny runs trained in seconds, the numbers mean nothing)'
           if scale == 'smoke' else f'its default parameters ({scale} scale)')
    figs = ''.join(f'<figure><img src="{html.escape(f)}" alt="{html.escape(Path(f).stem)}" style="max-width:100%">'
                   f'<figcaption><code>{html.escape(Path(f).name)}</code></figcaption></figure>'
                   for f in page.files if f.endswith('.png'))
    return (f'<div class="lt-banner">Executed for this site with {how} in {page.seconds:.0f} s '
            f'(<code>papermill nbs/{page.src.name} out.ipynb</code> reruns it). Files it wrote:'
            f'<ul>{items or "<li>none</li>"}</ul>{figs}</div>')

def _rewrite_links(text:str, pages:list[Page], out:Path, doc_prefix:str) -> str:
    "Links that point at notebooks or at the published site become pages of this site; other repo files go to git."
    by_nb = {p.src.name: p.name for p in pages}
    names = {p.name for p in pages}
    def fix(m):
        attr, q, url = m.group(1), m.group(2), html.unescape(m.group(3))
        if url.startswith(doc_prefix):
            rel = url[len(doc_prefix):]
            if rel.split('#')[0] in names: url = rel
        elif not re.match(r'^[a-z][a-z0-9+.-]*:|^#|^/', url):
            path, _, frag = url.partition('#')
            base = Path(path).name
            if path.endswith('.ipynb') and base in by_nb: url = by_nb[base] + (f'#{frag}' if frag else '')
            elif path and not (out/path).exists():
                target = (NBS/path).resolve()
                if target.exists() and ROOT in target.parents:
                    kind = 'tree' if target.is_dir() else 'blob'
                    url = f'{GIT_URL}/{kind}/main/{target.relative_to(ROOT).as_posix()}' + (f'#{frag}' if frag else '')
        return f'{attr}={q}{html.escape(url, quote=True)}{q}'
    return re.sub(r'\b(href|src)=(["\'])(.*?)\2', fix, text)

def _anchor_aliases(text:str) -> str:
    "nbdev's doc links use lower-case anchors (`latent.html#latentthoughtlm`): add them beside nbconvert's heading ids."
    have = set(re.findall(r'\bid="([^"]+)"', text))
    def add(m):
        i = html.unescape(m.group(2)); lo = i.lower()
        if lo in have: return m.group(0)
        have.add(lo)
        return f'<span id="{html.escape(lo, quote=True)}"></span>{m.group(0)}'
    return re.sub(r'(<h[1-6][^>]*\bid=")([^"]+)"', add, text)

def render_page(nb_path:Path, page:Page, pages:list[Page], out:Path, scale:str='smoke'):
    "Executed notebook -> `out/page.name` (+ `out/<stem>_files/` with its images)."
    from nbconvert import HTMLExporter
    from traitlets.config import Config
    nb = prepare_for_html(nb_path, page, _banner(page, scale))
    for c in nb.cells:
        if c.metadata.get('docs_no_input'): c.metadata.setdefault('tags', []).append('docs-no-input')
    cfg = Config()
    cfg.TagRemovePreprocessor.remove_input_tags = {'docs-no-input'}
    cfg.TagRemovePreprocessor.enabled = True
    cfg.ExtractOutputPreprocessor.enabled = True
    cfg.HTMLExporter.exclude_input_prompt = True
    cfg.HTMLExporter.exclude_output_prompt = True
    ex = HTMLExporter(config=cfg, template_name='lab')   # its default preprocessors include both, enabled by `cfg`
    stem = Path(page.name).stem
    body, res = ex.from_notebook_node(nb, resources={'output_files_dir': f'{stem}_files',
                                                    'metadata': {'name': page.title}})
    fdir = out/f'{stem}_files'
    if fdir.exists(): shutil.rmtree(fdir)
    for fn, data in (res.get('outputs') or {}).items():
        (out/fn).parent.mkdir(parents=True, exist_ok=True); (out/fn).write_bytes(data)
    from nbdev.config import get_config
    cfg_nb = get_config()
    doc_prefix = f"{cfg_nb.doc_host.rstrip('/')}{cfg_nb.doc_baseurl.rstrip('/')}/"
    body = re.sub(r'<script src="https://[^"]*require(?:\.min)?\.js"></script>\s*', '', body)   # widget JS only: none offline
    body = _rewrite_links(body, pages, out, doc_prefix)
    body = _anchor_aliases(body)
    body = re.sub(r'<title>.*?</title>', f'<title>{html.escape(page.title)} · latent_thoughts</title>', body, count=1, flags=re.S)
    body = body.replace('</head>', NAV_CSS + '</head>', 1)
    body = re.sub(r'(<body[^>]*>)', lambda m: m.group(1) + nav_html(pages, page), body, count=1)
    (out/page.name).write_text(body, encoding='utf-8')

def unlink_missing_doc_anchors(out:Path) -> int:
    "Doc links to names without a doc entry (nbdev links private names too: `_coerce`) become plain code; how many."
    from urllib.parse import unquote
    ids, n = {}, 0
    def idset(name):
        if name not in ids: ids[name] = _ids(out/name) if (out/name).exists() else None
        return ids[name]
    def fix(m):
        nonlocal n
        page, frag, inner = m.group(2), html.unescape(m.group(3)), m.group(4)
        have = idset(page)
        if have is None or {frag, unquote(frag)} & have: return m.group(0)
        n += 1; return inner
    pat = re.compile(r'<a href="(([\w.-]+\.html)#([^"]+))"[^>]*>(<code>.*?</code>)</a>')
    for f in out.glob('*.html'):
        t = f.read_text(encoding='utf-8'); new = pat.sub(fix, t)
        if new != t: f.write_text(new, encoding='utf-8')
    return n

# ---------------------------------------------------------------- build
def _ctx(): return mp.get_context('spawn')

def build(out:Path=ROOT/'_docs', scale:str='smoke', only:list[str]|None=None, jobs:int=2, nbs:Path=NBS, log=print) -> dict:
    "Execute and render the site into `out`; return {page name: seconds}. Raises SystemExit(1) naming failed notebooks."
    t0 = time.time()
    out = Path(out).resolve(); out.mkdir(parents=True, exist_ok=True)
    pages = site_pages(nbs)
    todo = [p for p in pages if not only or p.src.stem in only or p.name in only or p.kind in only]
    if only and not todo: raise SystemExit(f"--only {only} matches no notebook; pages: {[p.src.stem for p in pages]}")
    work = Path(tempfile.mkdtemp(prefix='lt-docs-'))
    runs = os.environ.get('LT_DOCS_RUNS') or str(work/'runs')   # smoke runs train here, never into runs/suite
    paper_runs = runs if scale == 'smoke' else None          # micro: the suite where it is (published, or runs/suite)
    (work/'nbs').mkdir()
    site = [p for p in pages if p in todo or (out/p.name).exists()]   # what the navigation and links may point at
    logs = {p.name: str(work/f'{p.src.stem}.log') for p in todo}     # each notebook's own output
    errors = []
    with ProcessPoolExecutor(max_workers=jobs, mp_context=_ctx(), max_tasks_per_child=1) as pool:
        futs = {}
        for p in todo:
            dst = work/'nbs'/p.src.name
            if p.kind == 'paper':
                figs = out/'figures'/p.src.stem
                if figs.exists(): shutil.rmtree(figs)
                futs[pool.submit(execute_paper, str(p.src), str(dst), str(figs), scale, paper_runs, logs[p.name])] = (p, dst)
            else: futs[pool.submit(execute_chapter, str(p.src), str(dst), runs, p.kind == 'explore',
                                   module_methods(p.src), logs[p.name])] = (p, dst)
        for f in as_completed(futs):
            p, dst = futs[f]
            try: r = f.result()
            except Exception as e: r = dict(seconds=0, error=f"{p.src.name}: {type(e).__name__}: {e}")
            p.seconds = r['seconds']
            if r.get('error'):
                tail = Path(logs[p.name]).read_text(errors='replace')[-1500:] if Path(logs[p.name]).exists() else ''
                errors.append(r['error'] + (f"\n--- its output (last lines):\n{tail}" if tail.strip() else ''))
                log(f"FAILED {p.src.name} ({p.seconds:.0f} s)"); continue
            if p.kind == 'paper':
                figs = out/'figures'/p.src.stem
                p.files = sorted(f.relative_to(out).as_posix() for f in figs.rglob('*') if f.is_file()) if figs.exists() else []
            try: render_page(dst, p, site, out, scale)
            except Exception as e: errors.append(f"{p.src.name}: rendering failed: {type(e).__name__}: {e}"); continue
            extra = f", {r['skipped']} cells flagged {'/'.join(SKIP_FLAGS)} not run" if r.get('skipped') else ''
            log(f"{p.name:32s} {p.seconds:6.1f} s{extra}")
    shutil.rmtree(work, ignore_errors=True)
    unlinked = unlink_missing_doc_anchors(out)
    if unlinked: log(f"{unlinked} doc links to names without a doc entry (private names) left as plain code")
    if not (out/'.nojekyll').exists(): (out/'.nojekyll').write_text('')
    total = time.time() - t0
    log(f"site: {out} ({len(todo) - len(errors)} of {len(todo)} pages) in {total:.0f} s")
    if errors:
        log('\n\n'.join(['the docs build failed (fix the notebook; the cell is named):'] + errors))
        raise SystemExit(1)
    return {p.name: p.seconds for p in todo}

def build_nbdev(log=print):
    "nbdev's own path (needs quarto): `nbdev_docs`, then README.md rewritten by this tool."
    bin_dir = Path(sys.executable).parent
    subprocess.run([str(bin_dir/'nbdev_docs')], cwd=ROOT, check=True)
    write_readme()
    log(f"site: {ROOT/'_docs'} (nbdev_docs)")

# ---------------------------------------------------------------- README from index.ipynb
README_HEADER = ('<!-- generated from nbs/index.ipynb by `python tools/docs.py readme`: edit the notebook, '
                 'not this file -->\n\n')

def _output_markdown(c) -> str:
    parts = []
    for o in c.get('outputs', []):
        if o.get('output_type') == 'stream' and o.get('name') == 'stdout': parts.append('```\n' + ''.join(o['text']).rstrip() + '\n```')
        elif o.get('output_type') in ('display_data', 'execute_result'):
            d = o.get('data', {})
            if 'text/markdown' in d: parts.append(''.join(d['text/markdown']).strip())
            elif 'text/plain' in d: parts.append('```\n' + ''.join(d['text/plain']).rstrip() + '\n```')
        elif o.get('output_type') == 'error': raise RuntimeError(f"nbs/index.ipynb fails: {o.get('ename')}: {o.get('evalue')}")
    return '\n\n'.join(p for p in parts if p)

def _readme_links(md:str) -> str:
    "Links written relative to nbs/ (`04_latent.ipynb`, `../Makefile`) made relative to the repository root."
    def fix(m):
        text, url = m.group(1), m.group(2)
        if re.match(r'^[a-z][a-z0-9+.-]*:|^#|^/', url): return m.group(0)
        return f'[{text}]({os.path.normpath("nbs/" + url)})'
    return re.sub(r'(?<!!)\[([^\]]*)\]\(([^)\s]+)\)', fix, md)

def render_readme(index:Path=NBS/'index.ipynb') -> str:
    "README.md text of the executed landing chapter: markdown cells as written, code cells by their outputs."
    with tempfile.TemporaryDirectory() as d:
        r = execute_chapter(str(index), str(Path(d)/'index.ipynb'), os.environ.get('LATENT_THOUGHTS_RUNS', str(Path(d)/'runs')))
        if r['error']: raise RuntimeError(f"nbs/index.ipynb fails to execute: {r['error']}")
        nb = json.loads((Path(d)/'index.ipynb').read_text(encoding='utf-8'))
    parts = []
    for c in nb['cells']:
        s = _src(c)
        if c['cell_type'] == 'raw': parts.append(_heading(index) if _fm_heading(s) else '')
        elif c['cell_type'] == 'markdown': parts.append(s.strip())
        elif c['cell_type'] == 'code':
            dv = _directives(s)
            if {'hide', 'default_exp'} & set(dv) and not c.get('outputs'): continue
            if dv.get('echo:') != ['false'] and 'hide' not in dv: parts.append('```python\n' + _strip_directives(s) + '\n```')
            m = _output_markdown(c)
            if m: parts.append(m)
    return README_HEADER + _readme_links('\n\n'.join(p for p in parts if p)) + '\n'

def write_readme(check:bool=False) -> bool:
    "Write README.md from nbs/index.ipynb; with `check`, only compare (True when in sync)."
    text, path = render_readme(), ROOT/'README.md'
    if check: return path.exists() and path.read_text(encoding='utf-8') == text
    path.write_text(text, encoding='utf-8'); return True

# ---------------------------------------------------------------- a real browser on the built site
BROWSERS = ('chromium', 'chromium-browser', 'google-chrome', 'google-chrome-stable', 'chrome', 'headless_shell')

def find_browser() -> str|None:
    "A Chromium-family browser on PATH (Debian's `chromium` package in CI), else None."
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)

_PAGE_JS = r"""(async () => {
  const imgs = Array.from(document.images);
  await Promise.all(imgs.map(i => i.complete ? null : new Promise(r => { i.onload = i.onerror = r; setTimeout(r, 10000); })));
  return JSON.stringify({
    title: document.title, nav: !!document.getElementById('lt-nav'), text: document.body.innerText.length,
    images: imgs.map(i => ({src: i.currentSrc || i.src, ok: i.complete && i.naturalWidth > 0, w: i.naturalWidth})),
    links: Array.from(document.querySelectorAll('a[href]')).map(a => a.href),
    errors: window.__lt_errors || []});
})()"""

class Chromium:
    "Headless Chromium driven over the DevTools protocol (websocket-client): open pages, evaluate, screenshot."
    def __init__(self, exe:str|None=None, timeout:float=60):
        import websocket, urllib.request
        exe = exe or find_browser()
        if exe is None: raise FileNotFoundError('no Chromium-family browser on PATH (Debian: apt-get install chromium)')
        self.dir, self.timeout, self.id = tempfile.mkdtemp(prefix='lt-chromium-'), timeout, 0
        # no network: external hosts (CDN scripts) fail at once instead of waiting on DNS
        self.proc = subprocess.Popen([exe, '--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
            '--no-first-run', '--no-default-browser-check', '--remote-debugging-port=0', '--remote-allow-origins=*',
            f'--user-data-dir={self.dir}', '--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1',
            '--window-size=1280,900', 'about:blank'], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file, t0 = Path(self.dir)/'DevToolsActivePort', time.time()
        while not (port_file.exists() and port_file.read_text().strip()):
            if self.proc.poll() is not None or time.time() - t0 > timeout:
                self.close(); raise RuntimeError(f'{exe} did not start (exit code {self.proc.returncode})')
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        for _ in range(50):
            try:
                targets = json.loads(urllib.request.urlopen(f'http://127.0.0.1:{port}/json', timeout=5).read())
                page = next(t for t in targets if t.get('type') == 'page'); break
            except Exception: time.sleep(0.1)
        else: self.close(); raise RuntimeError('Chromium started but offers no page to drive')
        self.ws = websocket.create_connection(page['webSocketDebuggerUrl'], timeout=timeout, suppress_origin=True)
        self.send('Page.enable'); self.send('Runtime.enable')

    def send(self, method:str, **params):
        self.id += 1; mid = self.id
        self.ws.send(json.dumps({'id': mid, 'method': method, 'params': params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get('method'): self._events.append(msg)
            if msg.get('id') == mid:
                if 'error' in msg: raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get('result', {})
    _events: list = []

    def open(self, url:str) -> dict:
        "Navigate, wait for the load event, wait for every image; the page's title, images and resolved links."
        self._events = []
        self.send('Page.navigate', url=url)
        t0 = time.time()
        while not any(e['method'] == 'Page.loadEventFired' for e in self._events):
            if time.time() - t0 > self.timeout: raise TimeoutError(f'{url} did not finish loading in {self.timeout} s')
            msg = json.loads(self.ws.recv())
            if msg.get('method'): self._events.append(msg)
        r = self.send('Runtime.evaluate', expression=_PAGE_JS, awaitPromise=True, returnByValue=True)
        info = json.loads(r['result']['value'])
        info['exceptions'] = [e['params']['exceptionDetails'].get('text', '') for e in self._events
                              if e['method'] == 'Runtime.exceptionThrown']
        return info

    def screenshot(self, path):
        import base64
        Path(path).write_bytes(base64.b64decode(self.send('Page.captureScreenshot', format='png')['data']))

    def close(self):
        try: self.ws.close()
        except Exception: pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try: self.proc.wait(10)
            except subprocess.TimeoutExpired: self.proc.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
    def __enter__(self): return self
    def __exit__(self, *a): self.close()

def _ids(path:Path) -> set:
    "The element ids of an HTML file, as the browser reads them."
    return {html.unescape(i) for i in re.findall(r'\bid="([^"]+)"', path.read_text(encoding='utf-8', errors='replace'))}

def check_page(browser:Chromium, page:Path, site:Path) -> tuple[dict, list[str]]:
    "Open `page` in the browser: (what it saw, problems: images not loaded, internal links to nothing)."
    from urllib.parse import urlsplit, unquote
    info, problems = browser.open(page.resolve().as_uri()), []
    if not info['nav']: problems.append('no navigation bar')
    for im in info['images']:
        if not im['ok']: problems.append(f"image not loaded: {im['src'][:120]}")
    for href in info['links']:
        u = urlsplit(href)
        if u.scheme != 'file': continue                       # external links are not this site's to check
        target = Path(unquote(u.path))
        if not target.exists(): problems.append(f'broken link: {href}'); continue
        if site.resolve() not in target.resolve().parents and target.resolve() != site.resolve():
            problems.append(f'link leaves the site: {href}')
        frag = u.fragment   # a browser tries the fragment as written, then percent-decoded
        if frag and target.suffix == '.html' and not {frag, unquote(frag)} & _ids(target):
            problems.append(f'missing anchor: {href}')
    return info, problems

def check_site(site:Path=ROOT/'_docs', pages:list[str]|None=None, log=print) -> dict:
    "Open pages of a built site (default: all) in headless Chromium; {page: problems}."
    site = Path(site)
    names = pages or sorted(p.name for p in site.glob('*.html'))
    res = {}
    with Chromium() as b:
        for n in names:
            info, probs = check_page(b, site/n, site)
            res[n] = probs
            log(f"{n:32s} {len(info['images']):3d} images, {len(info['links']):4d} links: "
                + ('ok' if not probs else f'{len(probs)} problems: ' + '; '.join(probs[:5])))
    return res

# ---------------------------------------------------------------- nbdev's own processing, notebook by notebook
def _proc_one(src:str) -> str|None:
    os.environ['IN_TEST'] = '1'
    from execnb.nbio import read_nb
    from nbdev.processors import FilterDefaults
    try: FilterDefaults()(read_nb(src)); return None
    except Exception as e: return f"{Path(src).name}: {e}"

def proc_check(jobs:int=2, log=print) -> list[str]:
    "Run nbdev's doc processors (what `nbdev_proc_nbs` runs, exec_show_docs included) on each notebook; list failures."
    srcs = [str(p) for p in [NBS/'index.ipynb', *chapters()] if p.exists()]
    with ProcessPoolExecutor(max_workers=jobs, mp_context=_ctx(), max_tasks_per_child=1) as pool:
        res = list(pool.map(_proc_one, srcs))
    bad = [r for r in res if r]
    for r in bad: log(r + '\n')
    log(f"nbdev processing: {len(srcs) - len(bad)} of {len(srcs)} notebooks pass")
    return bad

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest='cmd', required=True)
    b = sub.add_parser('build', help='execute and render the site')
    b.add_argument('--out', default=str(ROOT/'_docs'))
    b.add_argument('--scale', default='smoke', choices=('smoke', 'micro'), help='paper notebooks: smoke parameters or their micro defaults')
    b.add_argument('--only', nargs='*', help="notebook stems (or 'chapter', 'paper', 'index', 'explore') to render")
    b.add_argument('--jobs', type=int, default=2)
    b.add_argument('--engine', default='auto', choices=('auto', 'offline', 'nbdev'),
                   help="nbdev: nbdev_docs (needs quarto); offline: this renderer; auto: nbdev where quarto is installed")
    r = sub.add_parser('readme', help='README.md from nbs/index.ipynb')
    r.add_argument('--check', action='store_true')
    sub.add_parser('proc-check', help="which notebooks nbdev's own doc processing fails on")
    c = sub.add_parser('check', help='open the built site in headless Chromium: images load, internal links resolve')
    c.add_argument('--out', default=str(ROOT/'_docs'))
    c.add_argument('pages', nargs='*')
    a = ap.parse_args(argv)
    os.chdir(ROOT)   # nbdev reads settings.ini from here
    if a.cmd == 'build':
        engine = a.engine
        if engine == 'auto': engine = 'nbdev' if shutil.which('quarto') and not a.only else 'offline'
        if engine == 'nbdev': return build_nbdev()
        build(Path(a.out), a.scale, a.only, a.jobs)
    elif a.cmd == 'readme':
        if a.check:
            ok = write_readme(check=True)
            print('README.md is in sync with nbs/index.ipynb' if ok else
                  'README.md differs from nbs/index.ipynb: run `.venv/bin/python tools/docs.py readme`')
            return 0 if ok else 1
        write_readme(); print('wrote README.md from nbs/index.ipynb')
    elif a.cmd == 'check':
        if find_browser() is None:
            print('no Chromium-family browser on PATH: the site was not checked in a browser (Debian: apt-get install chromium)')
            return 0
        bad = {k: v for k, v in check_site(Path(a.out), a.pages or None).items() if v}
        return 1 if bad else 0
    elif a.cmd == 'proc-check':
        return 1 if proc_check() else 0

if __name__ == '__main__': sys.exit(main())

"""Docs site: the sidebar, course structure, nbdev's docs processing, the offline preview (tools/build_docs.py) and the
rendered pages in headless Chromium.

The build runs in a subprocess (nbdev executes every notebook's import/export/show_doc cells; that state must not leak
into this pytest process). Rendering needs pandoc (`pip install pypandoc-binary`); the browser checks need Playwright's
Python package and Debian's `chromium-headless-shell` (or `chromium`). Without them those tests skip and say why;
the sidebar, course, processing and API checks always run. A screenshot of the home page is saved to
`_site/screenshot-index.png`.
"""
import importlib.util, json, os, shutil, subprocess, sys, time
from pathlib import Path
from urllib.parse import unquote, urlparse
import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location('build_docs', ROOT/'tools'/'build_docs.py')
bd = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(bd)

def _fmt(items): return '\n  ' + '\n  '.join(map(str, items))

# ------------------------------------------------------------------ no build needed

def test_sidebar_lists_every_notebook_in_teaching_order():
    probs = bd.sidebar_problems()
    assert not probs, 'nbs/sidebar.yml:' + _fmt(probs)
    listed = [f for _, f in bd.read_sidebar()]
    assert listed[0] == 'index.ipynb'
    secs = [s for s, _ in bd.read_sidebar() if s]
    order = [s for _, s in bd.SECTIONS]
    assert [s for s in order if s in secs] == list(dict.fromkeys(secs)), 'sections out of teaching order'

def test_sidebar_check_catches_a_missing_notebook(tmp_path, monkeypatch):
    "The check must fail when a notebook exists that nbs/sidebar.yml does not list."
    nbs = tmp_path/'nbs'; nbs.mkdir()
    for f in ['index.ipynb', '00_core.ipynb', '05_stylegan2.ipynb']: (nbs/f).write_text('{}')
    monkeypatch.setattr(bd, 'NBS', nbs); monkeypatch.setattr(bd, 'SIDEBAR', nbs/'sidebar.yml')
    (nbs/'sidebar.yml').write_text(bd.sidebar_yaml())
    assert bd.sidebar_problems() == []
    assert [s for s, f in bd.read_sidebar() if f == '05_stylegan2.ipynb'] == ['Generator']
    (nbs/'12_new_topic.ipynb').write_text('{}')
    assert any('12_new_topic.ipynb is not listed' in p for p in bd.sidebar_problems())
    (nbs/'05_stylegan2.ipynb').unlink()
    assert any('lists 05_stylegan2.ipynb, which does not exist' in p for p in bd.sidebar_problems())

def test_course_notebooks_open_with_objectives_and_end_with_exercises():
    probs = bd.course_problems()
    assert not probs, 'lesson notebooks missing course structure:' + _fmt(f'{nb}: {", ".join(m)}' for nb, m in probs.items())

def test_course_page_covers_every_lesson():
    text = (bd.NBS/'course.md').read_text()
    lessons = [nb for nb in bd.notebooks() if bd.section_of(nb) in bd.LESSON_SECTIONS]
    missing = [nb for nb in lessons if nb not in text]
    assert not missing, (f'nbs/course.md does not mention {missing}: add them to SESSIONS in tools/course_timings.py '
                         'and run `OMP_NUM_THREADS=1 python tools/course_timings.py NB.ipynb`')
    todo_but_exists = [nb for nb in lessons if f'TODO {nb}' in text]
    assert not todo_but_exists, f'nbs/course.md still marks existing notebooks as TODO: {todo_but_exists} (add their measured time)'

# ------------------------------------------------------------------ build (subprocess)

@pytest.fixture(scope='module')
def build(tmp_path_factory):
    js = tmp_path_factory.mktemp('docs')/'build.json'
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'build_docs.py'), '--json', str(js)], cwd=ROOT,
                       capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert js.exists(), f'build_docs.py crashed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}'
    res = json.loads(js.read_text())
    print(f"docs build: {time.time()-t0:.1f} s wall (process {res['process_s']} s, render {res['render_s']} s, "
          f"{len(res['processed'])} file(s) re-processed), per notebook: {res['seconds']}")
    return res

@pytest.fixture(scope='module')
def site(build):
    if not build['outs']: pytest.skip('pandoc not found: pip install pypandoc-binary (static pandoc 3.x in a wheel) to render the site')
    return build['outs']

def test_docs_processing_runs_clean(build):
    "What `nbdev_proc_nbs` (and so `nbdev_docs` in the deploy workflow) would do must not fail on any notebook."
    errs = build['errors']
    hint = ('\nnbdev executes, in the docs build, every cell with an import, #| export and show_doc cells, and skips '
            'the rest: a cell that mixes imports with code using names from a skipped cell fails. '
            'Put imports in their own cells.')
    assert not errs, 'docs processing failed for:' + _fmt(f'nbs/{nb}: {e.strip().splitlines()[0]} | {e.strip().splitlines()[-1]}'
                                                         for nb, e in errs.items()) + hint

def test_every_public_symbol_in_api_reference(build):
    "Every function/class in a module's __all__ has its show_doc entry on its notebook's page; other names are mentioned."
    probs = build['api_problems']
    assert not probs, 'API reference gaps:' + _fmt(probs)

def test_api_check_is_not_vacuous():
    api = bd.public_api()
    assert 'core' in api and 'to_unit' in api['core']['defs'] and 'load_checkpoint' in api['core']['defs']
    assert sum(len(a['defs']) for a in api.values()) > 50

def test_site_static_checks(build, site):
    "Every sidebar page rendered with a title, no error cells, no raw #| or $$, images and relative links resolve."
    assert set(site) == {f for _, f in bd.read_sidebar() if (bd.NBS/f).exists()}
    assert site['index.ipynb'] == 'index.html'
    assert not build['problems'], 'rendered site problems:' + _fmt(build['problems'])

def test_renderer_honours_cell_options(tmp_path):
    "Unit check of the notebook->markdown step: #| include/echo/output/code-fold, errors, images, show_doc markdown."
    png = ('iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==')
    cells = [
        {'cell_type': 'raw', 'source': '---\ntitle: Toy\ndescription: a toy\noutput-file: toy.html\n---'},
        {'cell_type': 'code', 'source': '#| include: false\nsecret = 1', 'outputs': []},
        {'cell_type': 'code', 'source': '#| echo: false\nhidden_source()', 'outputs': [{'output_type': 'stream', 'name': 'stdout', 'text': 'shown output\n'}]},
        {'cell_type': 'code', 'source': '#| output: false\nvisible_source()', 'outputs': [{'output_type': 'stream', 'name': 'stdout', 'text': 'dropped output\n'}]},
        {'cell_type': 'code', 'source': '#| code-fold: true\nfolded()', 'outputs': []},
        {'cell_type': 'code', 'source': 'plot()', 'outputs': [{'output_type': 'display_data', 'data': {'image/png': png, 'text/plain': '<Figure>'}}]},
        {'cell_type': 'code', 'source': '#| echo: false\n#| output: asis\nshow_doc(f)', 'outputs': [{'output_type': 'execute_result', 'data': {'text/markdown': '### f\n\n> f(x)'}}]},
        {'cell_type': 'code', 'source': '1/0', 'outputs': [{'output_type': 'error', 'ename': 'ZeroDivisionError', 'evalue': '', 'traceback': ['\x1b[31mTraceback (most recent call last)', 'ZeroDivisionError']}]},
    ]
    (tmp_path/'toy.ipynb').write_text(json.dumps({'cells': cells}))
    page = bd.load_page('toy.ipynb', proc_dir=tmp_path)
    assert (page.title, page.out, page.fm['description']) == ('Toy', 'toy.html', 'a toy')
    md = bd.page_markdown(page, tmp_path/'figs')
    assert 'secret' not in md and 'hidden_source' not in md and 'shown output' in md
    assert 'visible_source' in md and 'dropped output' not in md
    assert '<details><summary>Code</summary>' in md and 'folded()' in md
    assert '### f' in md and '#|' not in md
    assert (tmp_path/'figs'/'toy-1.png').read_bytes()[:4] == b'\x89PNG'
    assert '.cell-output-error' in md and '\x1b' not in md

# ------------------------------------------------------------------ headless Chromium

def _chromium():
    for p in [os.environ.get('CHROMIUM'), '/usr/lib/chromium/chromium-headless-shell', '/usr/lib/chromium/chromium',
              shutil.which('chromium-headless-shell'), shutil.which('chromium')]:
        if p and Path(p).is_file() and os.access(p, os.X_OK): return p

_VISIBLE_TEXT_JS = '''() => { const c = document.querySelector('#content').cloneNode(true);
  c.querySelectorAll('pre, code, script, style, math').forEach(e => e.remove()); return c.innerText; }'''

def test_site_in_headless_chromium(build, site):
    try: from playwright.sync_api import sync_playwright
    except ImportError: pytest.skip('playwright not installed: pip install playwright (no browser download needed)')
    exe = _chromium()
    if not exe: pytest.skip('no Chromium: apt-get install -y chromium-headless-shell')
    out, problems, n_imgs, n_math = bd.SITE, [], 0, 0
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, args=['--no-sandbox', '--disable-gpu'])
        page = browser.new_page(viewport={'width': 1280, 'height': 900})
        console = []
        page.on('console', lambda m: console.append(m.text) if m.type == 'error' else None)
        page.on('pageerror', lambda e: console.append(str(e)))
        for nb, o in site.items():
            console.clear()
            resp = page.goto((out/o).resolve().as_uri(), wait_until='load')
            if resp is not None and not resp.ok: problems.append(f'{o}: did not load'); continue
            if not page.title().strip() or not page.inner_text('h1.title').strip(): problems.append(f'{o}: no title')
            imgs = page.eval_on_selector_all('img', 'els => els.map(e => [e.getAttribute("src"), e.complete && e.naturalWidth > 0])')
            n_imgs += len(imgs)
            problems += [f'{o}: image {src} did not load' for src, ok in imgs if not ok]
            if page.locator('.cell-output-error:not(.docs-error)').count(): problems.append(f'{o}: error output in a cell')
            text = page.evaluate(_VISIBLE_TEXT_JS)
            if 'Traceback (most recent call last)' in text: problems.append(f'{o}: traceback in page text')
            if '$$' in text: problems.append(f'{o}: unrendered $$ maths')
            codes = page.eval_on_selector_all('.cell-code code', 'els => els.map(e => e.innerText)')
            raw = [l for c in codes for l in c.split('\n') if l.lstrip().startswith('#|')]
            if raw: problems.append(f'{o}: raw directives {raw[:2]}')
            maths = page.eval_on_selector_all('math', 'els => els.map(e => e.closest("details") ? 1 : e.getBoundingClientRect().width)')
            n_math += len(maths)
            if any(w == 0 for w in maths): problems.append(f'{o}: {sum(w == 0 for w in maths)} MathML element(s) not drawn')
            for href in page.eval_on_selector_all('a[href]', 'els => els.map(e => e.href)'):
                u = urlparse(href)
                if u.scheme == 'file' and not Path(unquote(u.path)).is_file(): problems.append(f'{o}: link {href} -> missing file')
            problems += [f'{o}: console error: {c}' for c in console]
        page.goto((out/'index.html').resolve().as_uri(), wait_until='load')
        page.screenshot(path=str(out/'screenshot-index.png'))
        browser.close()
    print(f'chromium: {len(site)} pages, {n_imgs} images, {n_math} MathML elements checked; screenshot: {out/"screenshot-index.png"}')
    assert n_imgs > 0 and n_math > 0, 'no figures or no maths anywhere: the checks above would be vacuous'
    assert not problems, 'in headless Chromium:' + _fmt(problems)

#!/usr/bin/env python
"""Screenshot the interactive explorer (spruce_nb.explorer) running live in JupyterLab, for the docs.

    OMP_NUM_THREADS=1 python tools/screenshot_explorer.py                      # -> nbs/images/explorer_jupyterlab.png
    python tools/screenshot_explorer.py --out /tmp/x.png --steps 30 --chromium /usr/bin/chromium

What it does: writes a two-cell notebook (build the explorer on the model zoo, explain one held-out phantom, move the
step slider to the crossing step, display it) into a temporary directory; starts `jupyter lab --no-browser` there on
a free port (default 8899) with no token and with its own settings/workspace directories (no news pop-up, no state
from other sessions); opens the notebook in headless Chromium via Playwright's Python package pointed at an installed
browser (no browser download, no internet); runs all cells through the Run menu; waits until the widget shows the
trajectory; screenshots the output area; shrinks the PNG (palette) to stay small; stops the server.
Needs: jupyterlab, ipywidgets (+ jupyterlab_widgets), playwright, a Chromium (Debian's chromium-headless-shell).
"""
from __future__ import annotations
import argparse, io, json, os, shutil, signal, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUMS = ['/usr/bin/chromium-headless-shell', '/usr/bin/chromium', '/usr/bin/chromium-browser']

CELLS = [
    "# SPRUCE interactive explorer: a held-out chest phantom with cardiomegaly, explained towards 'normal'",
    "import os, warnings; os.environ.setdefault('SPRUCE_PROGRESS', '0')\n"
    "warnings.filterwarnings('ignore', message='LPIPS')   # the offline random-trunk LPIPS notice (see 04a_perceptual)\n"
    "from spruce_nb.explorer import explore\n"
    "xp = explore(n_images=4, steps={steps}, use_pti={pti}, pti_steps={pti_steps})\n"
    "xp.image_select.value = 1\n"
    "xp.run()\n"
    "c = xp.state['crossing_step']\n"
    "xp.trajectory.value = c if c > 0 else xp.state['steps']   # the first counterfactual step\n"
    "xp",
]

def _notebook(steps: int, pti_steps: int) -> dict:
    cells = [{'cell_type': 'markdown', 'metadata': {}, 'source': CELLS[0]},
             {'cell_type': 'code', 'metadata': {}, 'source': CELLS[1].format(steps=steps, pti=pti_steps > 0, pti_steps=pti_steps or None), 'outputs': [], 'execution_count': None}]
    return {'cells': cells, 'metadata': {'kernelspec': {'display_name': 'Python 3 (ipykernel)', 'language': 'python', 'name': 'python3'}},
            'nbformat': 4, 'nbformat_minor': 5}

def _free(port: int) -> bool:
    with socket.socket() as s: return s.connect_ex(('127.0.0.1', port)) != 0

def _wait_http(url: str, timeout: float, proc) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None: raise RuntimeError(f'jupyter lab exited with code {proc.returncode}')
        try:
            urllib.request.urlopen(url, timeout=2); return
        except Exception: time.sleep(0.5)
    raise TimeoutError(f'jupyter lab did not answer at {url} within {timeout} s')

def _clip(page, widget) -> dict:
    "The JupyterLab window from its top down to just below the widget (menu, tabs, toolbar, the code cell and the widget)."
    b = widget.bounding_box(); vp = page.viewport_size
    return {'x': 0, 'y': 0, 'width': vp['width'], 'height': min(vp['height'], b['y'] + b['height'] + 16)}

def _shrink_png(data: bytes, colors: int = 128) -> bytes:
    from PIL import Image
    im = Image.open(io.BytesIO(data)).convert('RGB')
    buf = io.BytesIO(); im.quantize(colors=colors, method=Image.Quantize.MEDIANCUT).save(buf, format='PNG', optimize=True)
    return buf.getvalue()

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--out', default=str(ROOT/'nbs'/'images'/'explorer_jupyterlab.png'))
    ap.add_argument('--port', type=int, default=8899)
    ap.add_argument('--steps', type=int, default=20, help='optimisation steps T of the explained trajectory')
    ap.add_argument('--pti-steps', type=int, default=100, help='PTI steps of the inversion (0: no PTI, faster but blurrier)')
    ap.add_argument('--chromium', default=None, help='browser executable (default: the first of %s that exists)' % CHROMIUMS)
    ap.add_argument('--timeout', type=float, default=240, help='seconds to wait for the kernel to run the explanation')
    ap.add_argument('--widget-only', dest='full', action='store_false', help='screenshot only the widget, not the JupyterLab window around it')
    ap.add_argument('--keep', action='store_true', help='keep the temporary directory (notebook, server log)')
    a = ap.parse_args(argv)
    exe = a.chromium or next((c for c in CHROMIUMS if Path(c).exists()), None)
    if not exe: raise FileNotFoundError(f'no Chromium found ({CHROMIUMS}); install chromium-headless-shell or pass --chromium PATH')
    from playwright.sync_api import sync_playwright
    if not _free(a.port): raise RuntimeError(f'port {a.port} is in use; pass --port')
    tmp = Path(tempfile.mkdtemp(prefix='spruce_shot_'))
    (tmp/'explorer.ipynb').write_text(json.dumps(_notebook(a.steps, a.pti_steps), indent=1))
    settings = tmp/'settings'/'@jupyterlab'/'apputils-extension'; settings.mkdir(parents=True)
    (settings/'notification.jupyterlab-settings').write_text(json.dumps({'fetchNews': 'false', 'checkForUpdates': False}))
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1'), 'MKL_NUM_THREADS': '1', 'SPRUCE_PROGRESS': '0',
           'JUPYTERLAB_SETTINGS_DIR': str(tmp/'settings'), 'JUPYTERLAB_WORKSPACES_DIR': str(tmp/'workspaces'),
           'PYTHONPATH': os.pathsep.join([str(ROOT), os.environ.get('PYTHONPATH', '')]).rstrip(os.pathsep)}
    log = open(tmp/'lab.log', 'w')
    cmd = [sys.executable, '-m', 'jupyter', 'lab', '--no-browser', f'--port={a.port}', '--IdentityProvider.token=', '--ServerApp.password=',
           '--ServerApp.ip=127.0.0.1', f'--ServerApp.root_dir={tmp}', '--LabApp.news_url=', '--ServerApp.disable_check_xsrf=True']
    if hasattr(os, 'geteuid') and os.geteuid() == 0: cmd.append('--allow-root')   # containers often run as root
    print('$', ' '.join(cmd), flush=True)
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    t0 = time.time()
    try:
        base = f'http://127.0.0.1:{a.port}'
        _wait_http(base + '/api/status', 90, proc)
        print(f'server up after {time.time() - t0:.1f} s', flush=True)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=exe, args=['--no-sandbox'])
            page = browser.new_page(viewport={'width': 1100, 'height': 1000})
            page.goto(base + '/lab/tree/explorer.ipynb', wait_until='domcontentloaded', timeout=60_000)
            page.wait_for_selector('.jp-Notebook .jp-Cell', timeout=90_000)
            page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"], .jp-KernelStatus', timeout=90_000)
            time.sleep(2)                                  # let the kernel finish starting
            page.click('.lm-MenuBar-itemLabel:text-is("Run")')
            page.click('.lm-Menu-itemLabel:text-is("Run All Cells")')
            print('running all cells…', flush=True)
            # the widget is up when its status shows a step and the step image is drawn
            page.wait_for_function("""() => { const s = [...document.querySelectorAll('.widget-html-content')].map(e => e.textContent).join(' ');
                                             return /step \\d+\\/\\d+/.test(s) && document.querySelectorAll('.jupyter-widgets img').length >= 4; }""",
                                   timeout=a.timeout * 1000)
            time.sleep(1.5)                                # images decode / layout settles
            page.keyboard.press('Control+b')              # collapse the file browser: more room for the notebook
            time.sleep(1)
            out = page.locator('.jp-OutputArea-output .jupyter-widgets').first
            out.scroll_into_view_if_needed()
            status = page.locator('.widget-html-content').filter(has_text='step').first.text_content()
            print('status:', status, flush=True)
            png = page.screenshot(clip=_clip(page, out)) if a.full else out.screenshot()
            browser.close()
        data = _shrink_png(png)
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_bytes(data)
        print(f'wrote {a.out} ({len(data) / 1024:.0f} KB; raw {len(png) / 1024:.0f} KB) in {time.time() - t0:.0f} s')
        return 0
    except Exception:
        log.flush(); print('--- jupyter lab log (tail) ---\n' + (tmp/'lab.log').read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        try: os.killpg(proc.pid, signal.SIGTERM); proc.wait(15)
        except Exception:
            try: os.killpg(proc.pid, signal.SIGKILL)
            except Exception: pass
        log.close()
        if not a.keep: shutil.rmtree(tmp, ignore_errors=True)
        else: print('kept', tmp)

if __name__ == '__main__':
    sys.exit(main())

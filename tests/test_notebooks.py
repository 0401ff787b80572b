"""Every notebook is a test: run each through nbdev's own test runner (same flags and skips as `nbdev_test`),
one pytest case per notebook, so failures are reported by name and bounded by pytest-timeout.
Cells flagged `#| slow`, `#| gpu` or `#| notest` are skipped unless NB_FLAGS names them (e.g. NB_FLAGS=slow)."""
import os, importlib.util, pytest
from nbdev.config import get_config
from nbdev.doclinks import nbglob
import nbdev.test as nbt  # not `from nbdev.test import test_nb`: pytest would collect it as a test

cfg = get_config()
NBS = sorted(nbglob(cfg.nbs_path, as_path=True))
FLAGS = os.environ.get('NB_FLAGS', '').split()
# notebooks that need an optional package (an extra in settings.ini, and a dev requirement): skipped, with the reason, without it
NEEDS = {'01a_anatomy.ipynb': ('nilearn', "the MNI ICBM152 template ships inside nilearn: pip install nilearn (or spruce_nb[anatomy])")}

@pytest.mark.parametrize('nb', NBS, ids=[p.name for p in NBS])
def test_notebook(nb, monkeypatch):
    pkg, why = NEEDS.get(nb.name, (None, ''))
    if pkg and importlib.util.find_spec(pkg) is None: pytest.skip(why)
    monkeypatch.chdir(nb.parent)
    monkeypatch.setenv('IN_TEST', '1')
    ok, secs = nbt.test_nb(nb, skip_flags=cfg.tst_flags.split(), force_flags=FLAGS, basepath=cfg.config_path)
    assert ok, f'{nb.name} failed (traceback above)'

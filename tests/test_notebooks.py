"""Every notebook is a test: run each through nbdev's own test runner (same flags and skips as `nbdev_test`),
one pytest case per notebook, so failures are reported by name and bounded by pytest-timeout.
Cells flagged `#| slow`, `#| gpu` or `#| notest` are skipped unless NB_FLAGS names them (e.g. NB_FLAGS=slow)."""
import os, pytest
from nbdev.config import get_config
from nbdev.doclinks import nbglob
import nbdev.test as nbt  # not `from nbdev.test import test_nb`: pytest would collect it as a test

cfg = get_config()
NBS = sorted(nbglob(cfg.nbs_path, as_path=True))
FLAGS = os.environ.get('NB_FLAGS', '').split()

@pytest.mark.parametrize('nb', NBS, ids=[p.name for p in NBS])
def test_notebook(nb, monkeypatch):
    monkeypatch.chdir(nb.parent)
    monkeypatch.setenv('IN_TEST', '1')
    ok, secs = nbt.test_nb(nb, skip_flags=cfg.tst_flags.split(), force_flags=FLAGS, basepath=cfg.config_path)
    assert ok, f'{nb.name} failed (traceback above)'

"`spruce doctor` checks for real: a broken device, a corrupt or missing weights file, an altered zoo file, an unwritable cache."
import os, shutil
import pytest
from spruce_nb.cli import main, doctor_report
from spruce_nb.weights import weights_dir, WEIGHTS_ENV

def _levels(rows, prefix): return {r['check']: r['level'] for r in rows if r['check'].startswith(prefix)}

def test_doctor_passes_here(capsys):
    rows = doctor_report()
    assert _levels(rows, 'device') == {'device': 'ok'}
    assert main(['doctor']) == (1 if any(r['level'] == 'error' for r in rows) else 0)
    assert 'device' in capsys.readouterr().out

def test_doctor_fails_on_a_device_that_is_not_there(monkeypatch):
    monkeypatch.setenv('SPRUCE_DEVICE', 'cuda:31')
    assert _levels(doctor_report(), 'device') == {'device': 'error'}
    assert main(['doctor']) == 1

def test_doctor_tells_missing_from_corrupt_weights(tmp_path, monkeypatch):
    monkeypatch.setattr('torch.hub.get_dir', lambda: str(tmp_path / 'hub'))       # no hub files in the way
    empty = tmp_path / 'empty'; empty.mkdir()
    monkeypatch.setenv(WEIGHTS_ENV, str(empty))
    rows = doctor_report()
    assert set(_levels(rows, 'network').values()) == {'warning'}                  # missing: LPIPS falls back, not an error
    real = tmp_path / 'real'; real.mkdir()
    (real / 'alexnet.safetensors').write_bytes(b'\0' * 1000)                       # corrupt
    monkeypatch.setenv(WEIGHTS_ENV, str(real))
    lv = _levels(doctor_report(), 'network')
    assert lv['network alexnet'] == 'error' and main(['doctor']) == 1

@pytest.mark.skipif(os.geteuid() == 0, reason='root can write to a read-only folder')
def test_doctor_fails_on_an_unwritable_cache(tmp_path, monkeypatch):
    ro = tmp_path / 'ro'; ro.mkdir(); ro.chmod(0o500)
    monkeypatch.setenv(WEIGHTS_ENV, str(ro))
    try: assert _levels(doctor_report(), 'weights cache') == {'weights cache': 'error'}
    finally: ro.chmod(0o700)

def test_doctor_warns_on_an_altered_zoo_file(tmp_path, monkeypatch):
    import spruce_nb.demo as demo
    zoo = tmp_path / 'zoo'; shutil.copytree(demo.ZOO_DIR, zoo)
    f = next((zoo / 'cxr64').glob('gmms.pt')); f.write_bytes(f.read_bytes() + b'x')
    orig = demo.check_zoo_file
    monkeypatch.setattr(demo, 'check_zoo_file', lambda e, n, m=None, zoo_dir=None: orig(e, n, m, zoo_dir=zoo))
    rows = doctor_report()
    lv = _levels(rows, 'zoo')
    assert lv.pop('zoo cxr64') == 'warning'                                        # the altered file is named, in its entry only
    assert 'gmms.pt' in next(r for r in rows if r['check'] == 'zoo cxr64')['message']
    assert set(lv.values()) <= {'ok', 'info'}                                      # the other entries are untouched

def test_doctor_names_what_an_incomplete_zoo_entry_lacks(monkeypatch):
    import spruce_nb.demo as demo
    man = demo.zoo_manifest()
    man['cxr64'] = {**man['cxr64'], 'files': {k: v for k, v in man['cxr64']['files'].items() if k != 'encoder.pt'}}
    monkeypatch.setattr(demo, 'zoo_manifest', lambda *a, **k: man)
    row = next(r for r in doctor_report() if r['check'] == 'zoo cxr64')
    assert row['level'] == 'info' and 'encoder.pt' in row['message']

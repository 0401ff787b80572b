"""`spruce fit` end to end in tiny mode: a phantom folder becomes a model directory that `spruce explain` uses; a run killed
inside the GAN stage is continued without redoing the classifier; a finished directory is reported done and never rewritten."""
import json
from pathlib import Path
import pytest
from spruce_nb.cli import main
from spruce_nb.training import Callback
from spruce_nb.fit import fit_model_dir, fit_config_from_args, read_fit_manifest, FitConfig, FIT_FILES, _fit_args

TINY = ['--tiny', '--image-size', '32', '--no-estimate', '--device', 'cpu']

class Crash(Callback):
    def after_step(self, trainer):
        if trainer.step == 3: raise KeyboardInterrupt('killed')

@pytest.fixture(scope='module')
def phantoms(tmp_path_factory):
    d = tmp_path_factory.mktemp('fit') / 'ph'
    assert main(['phantoms', '--out', str(d), '--n', '64', '--size', '32']) == 0
    return d

def _tiny_cfg():
    import argparse
    p = argparse.ArgumentParser(); _fit_args(p)
    return fit_config_from_args(p.parse_args(['--data', 'x', '--out', 'y', *TINY]))

def test_fit_builds_a_model_dir_that_explain_uses(phantoms, tmp_path, capsys):
    out = tmp_path / 'model'
    assert main(['fit', '--data', f'folder:{phantoms}', '--out', str(out), *TINY]) == 0
    assert all((out / f).exists() for f in FIT_FILES.values())
    man = json.loads((out / 'fit.json').read_text())
    assert set(man['stages']) == set(FIT_FILES) and man['stages']['generator']['ada_p'] is not None
    img = sorted((phantoms / 'cardiomegaly').glob('*.png'))[0]
    assert main(['explain', str(img), '--model-dir', str(out), '--out', str(tmp_path / 'ex'), '--steps', '2', '--no-pti', '--device', 'cpu']) == 0
    assert (tmp_path / 'ex' / f'{img.stem}_counterfactual.png').exists()
    assert main(['evaluate', '--model-dir', str(out), '--out', str(tmp_path / 'ev'), '--data', f'folder:{phantoms}', '--n', '2', '--steps', '2',
                 '--no-pti', '--extractor', 'classifier', '--device', 'cpu']) == 0
    assert (tmp_path / 'ev' / 'summary.md').exists()
    capsys.readouterr()
    before = {f: (out / f).stat().st_mtime_ns for f in FIT_FILES.values()}
    assert main(['fit', '--data', f'folder:{phantoms}', '--out', str(out), *TINY]) == 0       # finished: reported, nothing rewritten
    assert 'nothing to do' in capsys.readouterr().out
    assert before == {f: (out / f).stat().st_mtime_ns for f in FIT_FILES.values()}
    assert main(['fit', '--data', 'phantoms:oct', '--out', str(out), *TINY]) == 2             # another data set: refused
    assert 'never mixes data sets' in capsys.readouterr().err

def _resume_continues(phantoms, out, capsys):
    "After a run stopped inside the GAN stage: the next `spruce fit` keeps the classifier, continues the generator and finishes every stage."
    m1 = read_fit_manifest(out)
    assert list(m1['stages']) == ['classifier'] and (out / 'runs/generator/last.pt').exists()
    capsys.readouterr()
    assert main(['fit', '--data', f'folder:{phantoms}', '--out', str(out), *TINY]) == 0
    log = capsys.readouterr().out
    assert '[1/4] classifier: finished before' in log and '[2/4] generator: continuing the stopped run' in log
    m2 = read_fit_manifest(out)
    assert m2['stages']['classifier'] == m1['stages']['classifier'] and set(m2['stages']) == set(FIT_FILES)
    return m2

def test_fit_killed_in_the_gan_stage_resumes(phantoms, tmp_path, capsys):
    out, cfg = tmp_path / 'model', _tiny_cfg()
    with pytest.raises(KeyboardInterrupt):
        fit_model_dir(f'folder:{phantoms}', out, cfg, device='cpu', estimate=False, callbacks={'generator': [Crash()]})
    assert not (out / 'generator.pt').exists()
    m2 = _resume_continues(phantoms, out, capsys)
    assert m2['stages']['generator']['kimg'] == pytest.approx(cfg.gan_kimg)

def test_fit_refuses_foreign_files_and_bad_flags(phantoms, tmp_path, capsys):
    (tmp_path / 'classifier.pt').write_bytes(b'not spruce')
    assert main(['fit', '--data', f'folder:{phantoms}', '--out', str(tmp_path), *TINY]) == 2
    assert 'were not made by spruce' in capsys.readouterr().err
    assert (tmp_path / 'classifier.pt').read_bytes() == b'not spruce'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['classifier.pt']   # nothing written, not even the record or a lock
    assert main(['fit', '--data', f'folder:{phantoms}', '--out', str(tmp_path / 'm'), '--tiny', '--image-size', '48']) == 2
    assert 'power of two' in capsys.readouterr().err

def test_fit_on_an_rsna_layout_dicom_csv(tmp_path):
    "A CSV-labelled DICOM folder (pydicom's sample files under fake patient ids) becomes a model directory; explain reads a .dcm."
    import csv, shutil
    data = pytest.importorskip('pydicom.data', reason='pip install pydicom')
    src, rows, imgs = [data.get_testdata_file('CT_small.dcm'), data.get_testdata_file('MR_small.dcm')], [], tmp_path / 'imgs'
    imgs.mkdir()
    for i in range(40):
        pid, t = f'p{i:03d}', i % 2                      # the label is the modality (CT / MR): learnable in a few steps
        shutil.copy(src[t], imgs / f'{pid}.dcm')
        rows += [[pid, 1, 2, 3, 4, 1]] * 2 if t else [[pid, '', '', '', '', 0]]
    with open(tmp_path / 'labels.csv', 'w', newline='') as f:
        w = csv.writer(f); w.writerow(['patientId', 'x', 'y', 'width', 'height', 'Target']); w.writerows(rows)
    out = tmp_path / 'model'
    assert main(['fit', '--data', f'csv:{tmp_path}/labels.csv@layout=rsna,images={imgs}', '--out', str(out), *TINY]) == 0
    man = read_fit_manifest(out)
    assert man['classes'] == ['normal', 'pneumonia'] and set(man['stages']) == set(FIT_FILES)
    with pytest.warns(UserWarning, match='resized to 32x32'):         # the 64-px MR slice, at the models' 32 px
        assert main(['explain', str(imgs / 'p001.dcm'), '--model-dir', str(out), '--out', str(tmp_path / 'ex'), '--steps', '2', '--no-pti',
                     '--device', 'cpu']) == 0
    assert main(['evaluate', '--model-dir', str(out), '--out', str(tmp_path / 'ev'), '--data', f'csv:{tmp_path}/labels.csv@layout=rsna,images={imgs}',
                 '--classes', 'pneumonia:normal', '--n', '1', '--steps', '2', '--no-pti', '--extractor', 'classifier', '--device', 'cpu']) == 0
    assert (tmp_path / 'ev' / 'summary.md').exists()                   # held-out patients: the test split of the same patient-level split

def test_fit_sigkilled_in_the_gan_stage_resumes(phantoms, tmp_path, capsys):
    "A hard kill (SIGKILL: no cleanup, the lock file stays) inside the GAN stage; the next `spruce fit` takes the dead run's lock over and continues."
    import os, signal, subprocess, sys
    if not hasattr(signal, 'SIGKILL'): pytest.skip('no SIGKILL on this platform')
    out = tmp_path / 'model'
    code = f"""
import os, signal
from spruce_nb.training import Callback
from spruce_nb.fit import fit_model_dir, FitConfig
class Kill(Callback):
    def after_step(self, trainer):
        if trainer.step == 3: os.kill(os.getpid(), signal.SIGKILL)
fit_model_dir('folder:{phantoms}', '{out}', FitConfig.tiny(image_size=32), device='cpu', estimate=False, callbacks={{'generator': [Kill()]}})
"""
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    from spruce_nb.core import OUTPUT_LOCK
    assert (out / OUTPUT_LOCK).exists()                                # the dead run's lock
    _resume_continues(phantoms, out, capsys)

def test_thesis_preset_builds_consistent_networks():
    "--preset thesis (GPU-sized; nothing is trained here): ConvNeXt-Base, StyleGAN2 paper256 and an IR-SE50-sized e4e at 256 px fit together."
    import torch
    from spruce_nb.fit import FIT_PRESETS, _classifier_config, _gan_config, _encoder_config
    from spruce_nb.e4e import build_encoder
    c = FIT_PRESETS['thesis']
    clf = _classifier_config(c, ('normal', 'cardiomegaly'), 10000).build(pretrained=False)
    g = _gan_config(c); G = g.make_generator()
    E = build_encoder(G, _encoder_config(c, g.resolution))
    assert (clf.arch, clf.image_size, g.name, g.resolution, g.batch) == ('convnext_base', 256, 'paper256', 256, 64)
    with torch.no_grad():
        x = torch.zeros(1, 3, 256, 256)
        assert clf(x).shape == (1, 2) and E(x).shape == (1, G.num_ws, G.w_dim)

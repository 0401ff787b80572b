"""One output policy for every command (core.OutputDir): a command never replaces a file another command or the user made,
--overwrite replaces only the command's own files, two runs into one directory never mix, and an unusable --out fails at once."""
import json, os, subprocess, sys, time
from pathlib import Path
import pytest, torch

from spruce_nb.cli import main
from spruce_nb.core import OutputDir, OUTPUT_LOCK, OUTPUT_MARKER, save_image

@pytest.fixture(scope='module')
def md(tmp_path_factory):
    from spruce_nb.evaluate import tiny_model_dir
    return tiny_model_dir(tmp_path_factory.mktemp('models') / 'models')

@pytest.fixture(scope='module')
def image(tmp_path_factory, md):
    from spruce_nb.data import PhantomDataset
    ds = PhantomDataset('cxr', n=8, size=32, classes=('normal', 'cardiomegaly'))
    f = tmp_path_factory.mktemp('img') / 'q.png'
    save_image(ds[0][0], f)
    return f

def _evaluate(md, out, *extra):
    return main(['evaluate', '--model-dir', str(md), '--n', '2', '--out', str(out), '--no-pti', '--steps', '1', '--data-n', '48', '--n-real', '8',
                 '--batch-size', '2', '--extractor', 'classifier', *extra])

def test_evaluate_never_replaces_another_commands_or_a_users_report(md, tmp_path, capsys):
    out = tmp_path / 'run'; out.mkdir()
    (out / 'report.json').write_text('{"mine": 1}')                  # e.g. evaluate-classifier's report, or the user's
    for extra in ([], ['--overwrite']):
        assert _evaluate(md, out, *extra) == 2
        assert 'not made by spruce' in capsys.readouterr().err and (out / 'report.json').read_text() == '{"mine": 1}'
    assert not (out / 'batches').exists()                              # refused before any work

def test_overwrite_replaces_only_the_commands_own_files(md, tmp_path, capsys):
    out = tmp_path / 'run'
    assert _evaluate(md, out) == 0
    (out / 'notes.txt').write_text('my notes')
    with OutputDir(out, 'explain') as od: od.claim(['q_original.png']); (out / 'q_original.png').write_bytes(b'x')   # another command's file
    assert _evaluate(md, out, '--overwrite') == 0
    assert (out / 'notes.txt').read_text() == 'my notes' and (out / 'q_original.png').read_bytes() == b'x'
    assert OutputDir(out, 'x').owner('report.json') == 'evaluate' and OutputDir(out, 'x').owner('q_original.png') == 'explain'

def test_evaluate_classifier_refuses_evaluates_report(md, tmp_path, capsys):
    out = tmp_path / 'run'
    assert _evaluate(md, out) == 0
    before = (out / 'report.json').read_bytes()
    assert main(['evaluate-classifier', '--ckpt', str(md / 'classifier.pt'), '--data', 'phantoms:cxr', '--n', '16', '--out', str(out), '--overwrite']) == 2
    assert 'written by `spruce evaluate`' in capsys.readouterr().err and (out / 'report.json').read_bytes() == before

def test_a_second_run_into_the_same_directory_is_refused(md, image, tmp_path, capsys):
    out = tmp_path / 'busy'
    holder = subprocess.Popen([sys.executable, '-c', f"import time; from spruce_nb.core import OutputDir\n"
                               f"with OutputDir({str(out)!r}, 'explain'):\n    print('held', flush=True); time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        assert main(['explain', str(image), '--model-dir', str(md), '--out', str(out), '--no-pti', '--steps', '1']) == 2
        assert 'in use by another run' in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [OUTPUT_LOCK]   # nothing of the second run
    finally:
        holder.kill(); holder.wait()
    assert main(['explain', str(image), '--model-dir', str(md), '--out', str(out), '--no-pti', '--steps', '1']) == 0   # a killed run's lock is taken over
    assert not (out / OUTPUT_LOCK).exists() and OutputDir(out, 'x').owner('q.json') == 'explain'

def test_unusable_out_fails_at_once(md, image, tmp_path, capsys, monkeypatch):
    f = tmp_path / 'afile'; f.write_text('x')
    assert main(['explain', str(image), '--model-dir', str(md), '--out', str(f), '--no-pti']) == 2
    assert 'is a file' in capsys.readouterr().err
    link = tmp_path / 'dangling'; link.symlink_to(tmp_path / 'nowhere')
    assert main(['demo', '--out', str(link)]) == 2
    assert 'dangling' in capsys.readouterr().err
    real_open = os.open
    def full(path, *a, **k):
        if str(path).endswith(OUTPUT_LOCK): raise OSError(28, 'No space left on device')
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, 'open', full)
    assert _evaluate(md, tmp_path / 'full') == 2
    assert 'No space left on device' in capsys.readouterr().err and not (tmp_path / 'full' / 'batches').exists()

def test_demo_refuses_a_users_report_even_with_overwrite(tmp_path, capsys):
    (tmp_path / 'report.json').write_text('{"mine": 1}')
    assert main(['demo', '--out', str(tmp_path), '--overwrite']) == 2
    assert 'not made by spruce' in capsys.readouterr().err and (tmp_path / 'report.json').read_text() == '{"mine": 1}'

@pytest.mark.parametrize('argv, flag', [
    (['train-classifier', '--n-train', '0'], '--n-train'),
    (['train-classifier', '--batch-size', '-1'], '--batch-size'),
    (['fit-gmms', '--model', 'classifier.pt', '--n', '0'], '--n'),
    (['train-gan', '--data', 'phantoms:cxr', '--kimg', 'nan'], '--kimg'),
    (['train-encoder', '--generator', 'g.pt', '--batch-size', '0'], '--batch-size'),
    (['train-ddpm', '--steps', '0'], '--steps'),
    (['evaluate', '--model-dir', '.', '--batch-size', '0'], '--batch-size'),
    (['explain', 'x.png', '--model-dir', '.', '--batch-size', '0'], '--batch-size'),
    (['phantoms', '--n', '-3'], '--n')])
def test_numbers_are_refused_before_any_work(argv, flag, tmp_path, capsys):
    out = tmp_path / 'out'
    assert main([*argv, '--out', str(out / 'gmms.pt' if argv[0] == 'fit-gmms' else out)]) == 2
    err = capsys.readouterr().err
    assert f'argument {flag}' in err and not out.exists(), err

def test_a_damaged_batch_file_is_named_with_the_fix(md, tmp_path, capsys):
    out = tmp_path / 'run'
    assert _evaluate(md, out) == 0
    bf = sorted((out / 'batches').glob('batch_*.pt'))[0]
    bf.write_bytes(b'not a torch file')
    assert _evaluate(md, out) == 2
    err = capsys.readouterr().err
    assert bf.name in err and 'delete it' in err
    bf.unlink()
    assert _evaluate(md, out) == 0                                     # that batch alone is recomputed
    assert json.loads((out / 'report.json').read_text())['n_evaluated'] == 2

# --- every other writing command follows the same policy ------------------------------------------------------------------

def _writers(md, d):
    "(argv, the file or folder it writes in d) for every writing command; each is refused before loading a model or making data."
    gen, clf = str(md / 'generator.pt'), str(md / 'classifier.pt')
    return {'fit-gmms': (['fit-gmms', '--model', clf, '--n', '8', '--out', str(d / 'gmms.pt'), '--overwrite'], 'gmms.pt'),
            'import-nvlabs': (['import-nvlabs', str(md / 'encoder.pt'), '--out', str(d / 'G.pt'), '--overwrite'], 'G.pt'),
            'train-consistency': (['train-consistency', '--model', clf, '--out', str(d / 'duq.pt'), '--overwrite'], 'duq.pt'),
            'pti': (['pti', '--generator', gen, '--n', '1', '--out', str(d), '--overwrite'], 'metrics.json'),
            'train-ddpm': (['train-ddpm', '--out', str(d)], 'ddpm.pt'),
            'train-gan': (['train-gan', '--data', 'phantoms:cxr', '--out', str(d)], 'config.json'),
            'train-encoder': (['train-encoder', '--generator', gen, '--out', str(d)], 'encoder.pt'),
            'ablations': (['ablations', '--model-dir', str(md), '--sweeps', 'lambda', '--lambda-classifier', 'classifier.pt', '--out', str(d)], 'lambda'),
            'phantoms': (['phantoms', '--n', '4', '--size', '32', '--out', str(d), '--overwrite'], 'labels.csv'),
            'weights': (['weights', 'install', '--dir', str(d), '--from', str(d)], 'manifest.json')}

@pytest.mark.parametrize('command', ['fit-gmms', 'import-nvlabs', 'train-consistency', 'pti', 'train-ddpm', 'train-gan', 'train-encoder',
                                     'ablations', 'phantoms', 'weights'])
def test_every_writing_command_refuses_a_users_file_before_any_work(command, md, tmp_path, capsys):
    d = tmp_path / 'out'; d.mkdir()
    argv, name = _writers(md, d)[command]
    if name == 'lambda': (d / name).mkdir(); (d / name / 'mine.txt').write_text('mine')
    else: (d / name).write_text('mine')
    t0 = time.time()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert 'not made by spruce' in err and name in err, err
    assert sorted(p.name for p in d.iterdir()) == [name]              # nothing written, not even the record or a lock
    assert (d / name / 'mine.txt' if name == 'lambda' else d / name).read_text() == 'mine'
    assert time.time() - t0 < 5                                        # refused before any training or model loading

def test_a_file_out_is_claimed_and_replaced_only_with_overwrite(md, tmp_path, capsys):
    out = tmp_path / 'g' / 'gmms.pt'
    fit = ['fit-gmms', '--model', str(md / 'classifier.pt'), '--data', 'phantoms:cxr:cardiomegaly-vs-normal', '--n', '16', '--k', '2', '--n-init', '1',
           '--out', str(out)]
    assert main(fit) == 0 and OutputDir(out.parent, 'x').owner('gmms.pt') == 'fit-gmms'
    before = out.read_bytes()
    assert main(fit) == 2 and 'earlier `spruce fit-gmms`' in capsys.readouterr().err and out.read_bytes() == before
    assert main(fit + ['--overwrite']) == 0
    assert main(['fit-gmms', '--model', str(md / 'classifier.pt'), '--out', str(tmp_path / 'g')]) == 2      # a directory given as the file
    assert 'is a directory' in capsys.readouterr().err

def test_an_input_is_never_a_target(md, tmp_path, capsys):
    import shutil
    (tmp_path / 'a').mkdir(); (tmp_path / 'b').mkdir()
    c = tmp_path / 'a' / 'classifier.pt'; shutil.copy(md / 'classifier.pt', c); raw = c.read_bytes()
    with OutputDir(c.parent, 'fit-gmms') as od: od.claim([c.name], resume=True, adopt=True)   # even a file fit-gmms itself recorded
    assert main(['fit-gmms', '--model', str(c), '--out', str(c), '--overwrite']) == 2
    assert 'is an input' in capsys.readouterr().err and c.read_bytes() == raw
    p = tmp_path / 'b' / 'snap.pkl'; p.write_bytes(b'x')
    with OutputDir(p.parent, 'import-nvlabs') as od: od.claim([p.name], resume=True, adopt=True)
    assert main(['import-nvlabs', str(p), '--out', str(p), '--overwrite']) == 2
    assert 'is an input' in capsys.readouterr().err and p.read_bytes() == b'x'

def test_a_read_only_out_fails_at_once_for_a_file_command(md, tmp_path, capsys, monkeypatch):
    real_open = os.open
    def read_only(path, *a, **k):
        if str(path).endswith(OUTPUT_LOCK): raise OSError(30, 'Read-only file system')
        return real_open(path, *a, **k)
    monkeypatch.setattr(os, 'open', read_only)
    assert main(['fit-gmms', '--model', str(md / 'classifier.pt'), '--out', str(tmp_path / 'ro' / 'gmms.pt')]) == 2
    err = capsys.readouterr().err
    assert 'Read-only file system' in err and 'Choose another --out' in err and 'Traceback' not in err

def test_a_killed_phantoms_run_leaves_nothing_forever(tmp_path):
    import socket
    out = tmp_path / 'ph'
    assert main(['phantoms', '--n', '4', '--size', '32', '--out', str(out)]) == 0
    stale = out / '.spruce-phantoms-killed'; stale.mkdir(); (stale / 'normal').mkdir()        # what a kill -9 mid-run leaves
    (out / OUTPUT_LOCK).write_text(f'999999999@{socket.gethostname()} spruce phantoms')
    assert main(['phantoms', '--n', '6', '--size', '32', '--out', str(out), '--overwrite']) == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith('.')) == ['.spruce-outputs.json', '.spruce_phantoms']
    assert len(list((out / 'normal').glob('*.png'))) + len(list((out / 'cardiomegaly').glob('*.png'))) == 6

def test_explain_writes_an_image_set_whole_or_not_at_all(md, image, tmp_path, capsys, monkeypatch):
    import spruce_nb.core as core
    out = tmp_path / 'x'
    run = ['explain', str(image), '--model-dir', str(md), '--out', str(out), '--no-pti', '--steps', '1']
    assert main(run) == 0
    old = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith('.')}
    real_replace, calls = os.replace, []
    def killed(a, b):                                                  # the run dies after its first file of the set is in place
        calls.append(b)
        if len(calls) > 1 and str(b).endswith('.png'): raise KeyboardInterrupt
        return real_replace(a, b)
    monkeypatch.setattr(core.os, 'replace', killed)
    with pytest.raises(KeyboardInterrupt): main(run + ['--steps', '3', '--overwrite'])
    monkeypatch.setattr(core.os, 'replace', real_replace)
    assert not (out / 'q.json').exists()                               # the record went first: the mixed set reads as incomplete ...
    assert not [p for p in out.iterdir() if p.name.endswith('.tmp')]   # ... and no temporary file is left
    (out / OUTPUT_LOCK).unlink(missing_ok=True)
    assert main(run) == 0                                              # ... so the next run redoes it instead of keeping a mix
    assert '1 already done' not in capsys.readouterr().out and json.loads((out / 'q.json').read_text())['input'] == str(image)
    assert sorted(old) == sorted(p.name for p in out.iterdir() if not p.name.startswith('.'))

def test_outputs_follow_the_umask(md, image, tmp_path):
    old = os.umask(0o027)
    try: assert main(['explain', str(image), '--model-dir', str(md), '--out', str(tmp_path / 'x'), '--no-pti', '--steps', '1']) == 0
    finally: os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / 'x').iterdir()}
    assert (tmp_path / 'x').stat().st_mode & 0o777 == 0o750
    assert modes == {n: 0o640 for n in ('q_original.png', 'q_counterfactual.png', 'q_diff.png', 'q.json', OUTPUT_MARKER)}, modes

@pytest.mark.parametrize('argv, flag', [
    (['explain', 'x.png', '--model-dir', '.', '--lambda-latent', 'inf'], '--lambda-latent'),
    (['evaluate', '--model-dir', '.', '--lambda-perc', '-0.5'], '--lambda-perc'),
    (['evaluate', '--model-dir', '.', '--steps', '0'], '--steps'),                # before its fingerprint is written
    (['train-encoder', '--generator', 'g.pt', '--lambda-sim', 'nan'], '--lambda-sim'),
    (['train-classifier', '--lr', 'inf'], '--lr'),
    (['train-classifier', '--trades-steps', '0'], '--trades-steps'),
    (['demo', '--lambda-image', '-1'], '--lambda-image'),
    (['demo', '--n', '0'], '--n'),
    (['pti', '--generator', 'g.pt', '--n', '0'], '--n'),
    (['ablations', '--model-dir', '.', '--steps', '0'], '--steps'),
    (['train-consistency', '--model', 'c.pt', '--steps', '0'], '--steps'),
    (['train-gan', '--data', 'phantoms:cxr', '--gamma', 'nan'], '--gamma'),
    (['train-ddpm', '--lr', '-1'], '--lr'),
    (['fit-gmms', '--model', 'c.pt', '--n-init', '0'], '--n-init')])
def test_lambdas_and_rates_are_refused_before_any_work(argv, flag, tmp_path, capsys):
    test_numbers_are_refused_before_any_work(argv, flag, tmp_path, capsys)

def test_doctor_lists_optional_packages_with_their_use():
    from spruce_nb.cli import doctor_report
    rows = {r['check']: r for r in doctor_report()}
    for mod, use in (('pydicom', 'DICOM'), ('nilearn', 'mri-anatomy'), ('diffusers', 'ACE')):
        r = rows[f'optional {mod}']
        assert use in r['message'] and ('installed' in r['message'] or 'not installed' in r['message'])

def test_api_targets_and_image_ranges(md):
    import warnings
    from spruce_nb.counterfactual import Spruce
    sp = Spruce.from_dir(md, use_pti=False)
    x = torch.rand(1, 3, 32, 32)                                        # [0, 1] instead of [-1, 1]
    with pytest.raises(ValueError, match='whole class index'): sp.explain(x * 2 - 1, target=0.7)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        try: sp.explain(x, target=None, show_progress=False)
        except ValueError: pass
    assert any('[0, 1]' in str(m.message) for m in w)
    with pytest.raises(ValueError): sp.explain(torch.zeros(1, 3, 1, 1))                  # a 1x1 image is refused, not "explained"
    y = torch.zeros(3, 3, 32, 32); y[2, 0, 5, 5] = float('nan')
    with pytest.raises(ValueError, match=r'image\(s\) \[2\] .*NaN'): sp.explain(y)               # the NaN image is named

def test_a_disk_that_fills_during_a_run_is_an_error_not_a_traceback(md, image, tmp_path, capsys, monkeypatch):
    import spruce_nb.counterfactual as cf
    def full(x, path, overwrite=False): raise OSError(28, 'No space left on device', str(path))
    monkeypatch.setattr(cf, 'save_image', full)                        # after the checks: the disk fills while the outputs are written
    out = tmp_path / 'x'
    assert main(['explain', str(image), '--model-dir', str(md), '--out', str(out), '--no-pti', '--steps', '1']) == 2
    err = capsys.readouterr().err
    assert 'No space left on device' in err and 'q_original.png' in err and 'Traceback' not in err
    assert not out.exists()                                            # no half set, no temporary file: the run leaves nothing
    monkeypatch.undo()
    assert main(['explain', str(image), '--model-dir', str(md), '--out', str(out), '--no-pti', '--steps', '1']) == 0   # the rerun completes

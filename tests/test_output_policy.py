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

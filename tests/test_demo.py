"""The main job: `spruce demo` end to end on the shipped model zoo (small settings), and the zoo's integrity."""
import json
from pathlib import Path
import pytest
from spruce_nb.demo import ZOO_FILES, zoo_manifest, zoo_lacks, check_zoo_file, ensure_models
from spruce_nb.core import load_checkpoint

def test_zoo_files_match_manifest():
    "Every file of every zoo entry has the sha256 its manifest records, its commands and commit, and loads with the safe loader; cxr64 has every file the demo needs."
    man = zoo_manifest()
    assert 'cxr64' in man, 'the model zoo manifest has no cxr64 entry'
    assert set(ZOO_FILES) <= set(man['cxr64']['files']), f"cxr64 lacks {set(ZOO_FILES) - set(man['cxr64']['files'])}"
    for entry, e in man.items():
        assert e['task'] and e['resolution'] and e['files'], f'zoo entry {entry} has no task, resolution or files'
        for name, f in e['files'].items():
            ok, why = check_zoo_file(entry, name, man)
            assert ok, why
            assert f['command'] and f['quick_command'] and len(f['commit']) == 40, f'{entry}/{name}: command, quick_command or commit missing'
            load_checkpoint(Path(__file__).resolve().parents[1] / 'spruce_nb' / 'zoo' / entry / name)   # safe loader accepts it

def test_demo_cli_writes_report(tmp_path, capsys):
    from spruce_nb.cli import main
    out = tmp_path / 'demo'
    assert main(['demo', '--out', str(out), '--n', '2', '--steps', '4', '--pti-steps', '3']) == 0
    md = (out / 'report.md').read_text()
    assert 'flip ratio' in md and (out / 'report.png').stat().st_size > 10_000
    res = json.loads((out / 'report.json').read_text())['results']
    assert set(res) == {'plain', 'TRADES 2/255'}
    for r in res.values():
        assert 0 <= r['flip_ratio'] <= 1 and 0 <= r['edit_in_mask'] <= 1
    assert 'report:' in capsys.readouterr().out
    assert main(['demo', '--out', str(out), '--n', '2', '--steps', '4', '--pti-steps', '3']) == 2   # never overwrites silently
    mine = tmp_path / 'mine'; mine.mkdir(); (mine / 'report.json').write_text('{"my": "evaluate-classifier report"}')
    assert main(['demo', '--out', str(mine), '--n', '2', '--steps', '4', '--pti-steps', '3']) == 2   # a user's report.json is kept
    assert json.loads((mine / 'report.json').read_text()) == {'my': 'evaluate-classifier report'}
    err = capsys.readouterr().err
    assert 'report.json' in err and 'not made by spruce' in err

def _tasks():
    return sorted(v['task'].split(':')[-1] for v in zoo_manifest().values())

@pytest.mark.parametrize('task', _tasks())
def test_demo_runs_every_task_of_the_zoo(task, tmp_path, capsys):
    "`spruce demo --task T` for every task of the zoo: source → healthy target, the task's causal variable read by the oracle; an entry still being built is refused, naming what it lacks."
    from spruce_nb.cli import main
    from spruce_nb.demo import demo_task
    plan, out = demo_task(task), tmp_path / 'demo'
    lacking = zoo_lacks(zoo_manifest()[plan['entry']])
    rc = main(['demo', '--task', task, '--out', str(out), '--n', '2', '--steps', '4', '--pti-steps', '3'])
    if lacking:
        assert rc == 2 and 'not complete yet' in capsys.readouterr().err and not out.exists()
        return
    assert rc == 0
    rep = json.loads((out / 'report.json').read_text())
    assert rep['task']['entry'] == plan['entry'] and rep['task']['variable'] == plan['variable']
    assert f"{plan['source']} → {plan['target']}" in (out / 'report.md').read_text()
    assert all('var_after' in r and 0 <= r['flip_ratio'] <= 1 for r in rep['results'].values())

def test_demo_refuses_a_task_without_a_zoo_entry(tmp_path, capsys):
    from spruce_nb.cli import main
    assert main(['demo', '--task', 'mri-4stage', '--out', str(tmp_path / 'd')]) == 2
    assert 'cardiomegaly-vs-normal' in capsys.readouterr().err and not (tmp_path / 'd').exists()

def test_corrupt_zoo_file_is_rebuilt_with_its_dependents_only(tmp_path):
    import shutil
    from spruce_nb.demo import ZOO_DIR
    zoo = tmp_path / 'zoo'; shutil.copytree(ZOO_DIR, zoo)
    p = zoo / 'cxr64' / 'gmms_trades2.pt'; b = bytearray(p.read_bytes()); b[-10] ^= 1; p.write_bytes(bytes(b))
    models, src = ensure_models('cxr64', tmp_path / 'work', zoo_dir=zoo, manifest=zoo_manifest(zoo / 'manifest.json'))
    assert [k for k, v in src.items() if v != 'zoo'] == ['gmms_trades2.pt'] and 'sha256' in src['gmms_trades2.pt']
    assert (models / 'gmms_trades2.pt').exists()

def test_zoo_gmms_belong_to_their_classifiers():
    "Every shipped GMM file of every entry was fitted for the shipped (fp16-stored) classifier it pairs with: loading them together checks the weights' hash."
    from spruce_nb.demo import ZOO_DIR, zoo_manifest
    from spruce_nb.classifier import load_classifier
    from spruce_nb.piece import FeatureGMMs
    for entry, e in zoo_manifest().items():       # every entry: a GMM fitted for the fp32 training output is refused by the shipped fp16 classifier
        files = e['files']
        pairs = [(g, 'classifier' + g[len('gmms'):]) for g in files if g.startswith('gmms')]
        assert len(pairs) >= 2 or entry != 'cxr64'
        for g, c in pairs:
            assert c in files, f'{entry}: {g} has no classifier {c} in the zoo'
            FeatureGMMs.load(ZOO_DIR / entry / g, classifier=load_classifier(ZOO_DIR / entry / c, device='cpu'))

def test_every_zoo_command_is_declared_by_an_earlier_module():
    "The demo runs the manifest's commands through ZOO_COMMAND_MODULES (not spruce_nb.cli, a later notebook): each must be there."
    import importlib, shlex
    from spruce_nb.demo import ZOO_COMMAND_MODULES
    names = {c.name for m in ZOO_COMMAND_MODULES for c in importlib.import_module(f'spruce_nb.{m}').cli_commands}
    for entry in zoo_manifest().values():
        for f in entry['files'].values():
            # files of a later notebook (e.g. DISC's consistency models, 'module': 'disc') are not demo files: their module declares the command
            ok = names if 'module' not in f else {c.name for c in importlib.import_module(f"spruce_nb.{f['module']}").cli_commands}
            for k in ('command', 'quick_command'): assert shlex.split(f[k])[0] in ok, f[k]

def test_zoo_disc_consistency_models_match_manifest_and_classifiers():
    "DISC's consistency models in the zoo: hashes as recorded, and each belongs to the classifier its command names."
    import shlex
    from spruce_nb.demo import ZOO_DIR
    from spruce_nb.classifier import load_classifier
    from spruce_nb.disc import ManifoldConsistency
    man = zoo_manifest(); files = man['cxr64']['files']
    mine = [n for n, f in files.items() if f.get('module') == 'disc']
    assert {'duq.pt', 'duq_trades2.pt'} <= set(mine)
    for n in mine:
        ok, why = check_zoo_file('cxr64', n, man); assert ok, why
        clf = shlex.split(files[n]['command'])[shlex.split(files[n]['command']).index('--model') + 1].replace('{models}/', '')
        ManifoldConsistency.load(ZOO_DIR / 'cxr64' / n, classifier=load_classifier(ZOO_DIR / 'cxr64' / clf, device='cpu'))

def test_zoo_ddpm_matches_manifest_and_the_classifiers_domain():
    "ACE's DDPM in the zoo: hash as recorded, 64 px, trained on the cxr phantoms the zoo's classifiers were trained on."
    from spruce_nb.demo import ZOO_DIR
    from spruce_nb.classifier import load_classifier
    from spruce_nb.ace import ACE, load_ddpm
    ok, why = check_zoo_file('cxr64', 'ddpm.pt'); assert ok, why
    ddpm = load_ddpm(ZOO_DIR / 'cxr64' / 'ddpm.pt', device='cpu')
    assert ddpm.resolution == 64 and ddpm.data == 'phantoms:cxr:cardiomegaly-vs-normal'
    for clf in ('classifier.pt', 'classifier_trades2.pt'):
        ACE(load_classifier(ZOO_DIR / 'cxr64' / clf, device='cpu'), ddpm, device='cpu')   # the same image domain: accepted

"""`spruce evaluate` and `spruce compare` sharded under torchrun: 2 CPU processes (gloo on localhost) give the same per-image rows
and the same tables as 1 process; each rank computes its own batches; rank 0 holds the output directory."""
import csv, json, os, shutil, socket, subprocess, sys
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]

@pytest.fixture(scope='module')
def models(tiny_models_and_oracle): return tiny_models_and_oracle     # (root, model_dir): tests/conftest.py

def _args(cmd, md, root, out):
    common = ['--model-dir', str(md), '--n', '6', '--batch-size', '2', '--data-n', '48', '--n-real', '12', '--extractor', 'classifier',
              '--oracle', str(root / 'oracle.pt'), '--out', str(out)]
    if cmd == 'evaluate': return ['evaluate', *common, '--no-pti', '--steps', '2']
    return ['compare', '--methods', 'spruce,pgd', *common, '--no-pti', '--spruce-steps', '2', '--pgd-steps', '3']

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

def _spruce(argv, procs: int, ok: bool = True):
    "The `spruce` command in a fresh process (1) or under torchrun (2 ranks, gloo on localhost), one thread each; `ok`: it must succeed."
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'SPRUCE_PROGRESS': '0', 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'): env.pop(k, None)
    for attempt in range(3):   # gloo on a loaded 2-core machine sometimes aborts a rank at exit; only that is retried (as tests/test_training.py)
        pre = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={procs}', '--master_addr=127.0.0.1', f'--master_port={_free_port()}'] if procs > 1 else [sys.executable]
        r = subprocess.run(pre + ['-m', 'spruce_nb.cli', *(['--'] if procs > 1 else []), *argv], env=env, capture_output=True, text=True, timeout=400)
        if r.returncode == 0 or 'terminate called without an active exception' not in r.stderr: break
    assert (r.returncode == 0) == ok, r.stdout[-3000:] + r.stderr[-3000:]
    return r

def _ranks(run: Path) -> dict:
    return {int(f.stem.split('_')[1]): torch.load(f, weights_only=True)['rank'] for f in sorted((run / 'batches').glob('batch_*.pt'))}

@pytest.mark.timeout(900)
def test_two_processes_equal_one(models):
    root, md = models
    for cmd in ('evaluate', 'compare'):
        one, two = root / f'{cmd}_1', root / f'{cmd}_2'
        _spruce(_args(cmd, md, root, one), 1)
        r = _spruce(_args(cmd, md, root, two), 2)
        runs = [('', )] if cmd == 'evaluate' else [('spruce',), ('pgd',)]
        for sub in runs:
            a, b = one.joinpath(*sub), two.joinpath(*sub)
            assert _ranks(a) == {0: 0, 1: 0, 2: 0} and _ranks(b) == {0: 0, 1: 1, 2: 0}          # 3 batches: rank 1 computed batch 1
            assert (b / 'per_image.csv').read_text() == (a / 'per_image.csv').read_text()    # per-image rows identical
            assert (b / 'summary.csv').read_text() == (a / 'summary.csv').read_text()        # set-level numbers (FD, MMD, CD) equal
            ra, rb = (json.loads((x / 'report.json').read_text()) for x in (a, b))
            assert ra['summary'] == rb['summary'] and rb['batches_computed_this_call'] == [0, 1, 2] and rb['n_evaluated'] == 6
            rec = json.loads((b / '.spruce-outputs.json').read_text())['files']              # rank 0 claimed the run's files under the output policy
            assert rec['batches']['command'] == 'evaluate' and not (b / '.spruce-outputs.lock').exists()
        if cmd == 'compare':
            ja, jb = (json.loads((x / 'comparison.json').read_text()) for x in (one, two))
            assert ja['table'] == jb['table'] and ja['paired'] == jb['paired'] and ja['proxy_truth'] == jb['proxy_truth']
            assert (two / 'per_image.csv').read_text() == (one / 'per_image.csv').read_text()
        assert r.stdout.count('wrote ') == 1                                                  # rank 0 alone reports
    # resuming a sharded run in one process: a lost batch (rank 1's) is recomputed, nothing else, and the table is the same
    b = root / 'evaluate_2'
    (b / 'batches' / 'batch_00001.pt').unlink()
    _spruce(_args('evaluate', md, root, b), 1)
    assert _ranks(b) == {0: 0, 1: 0, 2: 0} and json.loads((b / 'report.json').read_text())['batches_computed_this_call'] == [1]
    assert (b / 'per_image.csv').read_text() == (root / 'evaluate_1' / 'per_image.csv').read_text()

    # a refusal on rank 0 (other settings in the same --out) stops every rank with the reason, before any work: no rank waits for ever
    r = _spruce(_args('evaluate', md, root, b) + ['--seed', '1'], 2, ok=False)
    assert 'different settings' in r.stderr and 'rank 0 stopped the run' in r.stderr
    assert _ranks(b) == {0: 0, 1: 0, 2: 0}

# ---------------------------------------------------------------- the trainers' commands under torchrun
def _world_size(run: Path) -> int:
    from spruce_nb.core import load_checkpoint
    return load_checkpoint(run / 'last.pt').metadata['engine']['world_size']

@pytest.mark.timeout(900)
def test_trainers_run_under_torchrun(models):
    "Every training command under torchrun: one run of 2 processes (DDP), rank 0 alone locks and claims --out and writes; a refusal stops both ranks."
    root, md = models
    runs = {'train-classifier': (['train-classifier', '--data', 'phantoms:cxr', '--image-size', '32', '--n-train', '32', '--n-val', '16',
                                  '--n-test', '16', '--epochs', '1', '--batch-size', '8'], 'classifier.pt', 'wrote '),
            'train-gan': (['train-gan', '--data', 'phantoms:cxr', '--n', '16', '--res', '32', '--config', 'tiny', '--batch', '4',
                           '--kimg', '0.008', '--metric-kimg', '0'], 'G_ema.pt', 'trained '),
            'train-encoder': (['train-encoder', '--generator', str(md / 'generator.pt'), '--data', 'phantoms:cxr', '--n', '16', '--steps', '2',
                               '--batch-size', '4', '--widths', '8', '16', '16', '32', '--units', '1', '1', '1', '1', '--fpn-channels', '16',
                               '--lambda-sim', '0'], 'encoder.pt', 'wrote '),
            'train-ddpm': (['train-ddpm', '--data', 'phantoms:cxr', '--n', '16', '--res', '32', '--steps', '2', '--batch-size', '4',
                            '--widths', '8', '16', '16', '16'], 'ddpm.pt', 'trained ')}
    for cmd, (argv, made, said) in runs.items():
        out = root / f'torchrun_{cmd}'
        r = _spruce(argv + ['--out', str(out)], 2)
        assert (out / made).exists() and _world_size(out) == 2, cmd                   # one DDP run of two processes
        rec = json.loads((out / '.spruce-outputs.json').read_text())['files']
        assert rec[made]['command'] == cmd and not (out / '.spruce-outputs.lock').exists(), cmd
        assert r.stdout.count(said) == 1, (cmd, r.stdout)                             # rank 0 alone reports
    out = root / 'torchrun_train-classifier'
    before = (out / 'classifier.pt').read_bytes()
    r = _spruce(runs['train-classifier'][0] + ['--out', str(out)], 2, ok=False)      # an earlier run, no --resume: refused on every rank
    assert 'pass --resume' in r.stderr and 'rank 0 stopped the run' in r.stderr
    assert (out / 'classifier.pt').read_bytes() == before

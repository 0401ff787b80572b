"""Evaluation harness: the CLI end to end on tiny 32-px models, resumption (no recomputation, same table as an uninterrupted
run), metrics computed from the images, refusal to mix settings, bad input, and PTI on when that module exists."""
import csv, json, os
from pathlib import Path
import pytest, torch

from spruce_nb.evaluate import (EvaluationConfig, evaluate_counterfactuals, tiny_model_dir, DEFAULT_DATA, THESIS_COLUMNS)

N, BS, DATA_N, N_REAL, STEPS = 4, 2, 48, 12, 2

@pytest.fixture(scope='module', autouse=True)
def evaluate_command():
    "Register the `evaluate` command for these tests until spruce_nb.cli.CLI_MODULES lists it."
    import spruce_nb.cli as cli
    with pytest.MonkeyPatch.context() as mp:
        if 'evaluate' not in cli.CLI_MODULES: mp.setattr(cli, 'CLI_MODULES', cli.CLI_MODULES + ('evaluate',))
        yield

@pytest.fixture(scope='module')
def models(tmp_path_factory):
    from spruce_nb.data import fit_oracle
    root = tmp_path_factory.mktemp('eval')
    md = tiny_model_dir(root / 'models')
    oracle = root / 'oracle.pt'
    fit_oracle('cxr', n=200, size=32, n_test=50).save(oracle)
    return root, md, oracle

def _cli(md, out, oracle, *extra):
    from spruce_nb.cli import main
    return main(['evaluate', '--model-dir', str(md), '--classes', 'cardiomegaly:normal', '--n', str(N), '--out', str(out),
                 '--no-pti', '--steps', str(STEPS), '--data', DEFAULT_DATA, '--data-n', str(DATA_N), '--n-real', str(N_REAL),
                 '--batch-size', str(BS), '--oracle', str(oracle), *extra])

def _spruce(md, **kw):
    from spruce_nb.counterfactual import Spruce
    sp = Spruce.from_dir(md, device='cpu', **kw)
    sp.base_config = sp.base_config.replace(steps=STEPS)
    return sp

def _rows(f): return list(csv.DictReader(open(f)))

@pytest.fixture(scope='module')
def cli_run(models):
    root, md, oracle = models
    out = root / 'cli'
    assert _cli(md, out, oracle) == 0
    return out

def test_cli_writes_table_figure_and_report(cli_run, capsys):
    out = cli_run
    for f in ('summary.csv', 'summary.md', 'per_image.csv', 'figure.png', 'report.json', 'selection.json', 'fingerprint.json'):
        assert (out / f).stat().st_size > 0, f
    assert len(list((out / 'batches').glob('batch_*.pt'))) == 2
    rows = _rows(out / 'per_image.csv')
    assert len(rows) == N and len({r['index'] for r in rows}) == N
    need = {'flipped', 'confidence', 'crossing_step', 'l1', 'mse', 'lpips', 'concentration', 'edit_err', 'in_mask', 'edit_cos',
            'leak', 't_star', 'path_residual', 'oracle_d_ctr', 'true_d_ctr', 'oracle_flip'}
    assert need <= set(rows[0]), need - set(rows[0])
    summ = _rows(out / 'summary.csv')
    assert [r['row'] for r in summ] == ['SPRUCE: counterfactuals', 'reconstructions (inversion, no edit)', 'originals (source class)']
    from spruce_nb.weights import resolve_weights
    real = resolve_weights('fid-inception') is not None and resolve_weights('efficientnet-lite0') is not None
    want = {'fd_clf', 'mmd_clf', 'flip_ratio', 'l1', 'confidence'} | ({'fid', 'kid', 'mmd_effnet'} if real else set())
    present = [(k, h) for k, h in THESIS_COLUMNS if k in summ[0]]
    assert want == {k for k, _ in present}, present      # 'auto': every installed extractor, and never a 'cmmd' without CLIP
    for k, _ in present: assert summ[0][k] not in ('', 'nan'), k
    md = (out / 'summary.md').read_text()
    assert all(h in md for _, h in present) and 'classifier-features:convnext_micro' in md and 'LPIPS' in md
    rep = json.loads((out / 'report.json').read_text())
    assert 'classifier-features:' in rep['extractor'] and 'pretrained_trunk' in rep['lpips']
    if real: assert {e['key'] for e in rep['extractors']} == {'inception', 'effnet', 'clf'} and all(e['weights']['sha256'] for e in rep['extractors'] if e['key'] != 'clf')
    assert rep['versions']['torch'] == torch.__version__ and rep['fingerprint']['counterfactual']['steps'] == STEPS
    assert rep['fingerprint']['use_pti'] is False and rep['n_evaluated'] == N and rep['n_real'] == N_REAL

def test_metrics_are_computed_from_the_images(cli_run):
    from spruce_nb.metrics import l1_per_pixel
    rows = [dict((k, float(v)) if k not in ('source', 'target', 'prediction', 'status') else (k, v) for k, v in r.items())
            for r in _rows(cli_run / 'per_image.csv')]
    b0 = torch.load(cli_run / 'batches' / 'batch_00000.pt', weights_only=True)
    u = lambda x: x.float() / 127.5 - 1
    l1 = l1_per_pixel(u(b0['images']['original']), u(b0['images']['counterfactual']))   # from the stored 8-bit images
    for i in range(len(l1)): assert abs(float(l1[i]) - rows[i]['l1']) < 2 / 255
    for r in rows:
        assert r['flipped'] == float(r['confidence'] > 0.5) and r['prediction'] == ('normal' if r['flipped'] else 'cardiomegaly')
        assert 0 <= r['in_mask'] <= 1 and r['edit_err'] >= 0 and -1 <= r['edit_cos'] <= 1 and r['leak'] >= 0
        assert r['true_d_ctr'] < 0 and r['true_d_opacity'] == 0      # cardiomegaly -> normal lowers the CTR, opacity untouched
    assert len({round(r['l1'], 7) for r in rows}) == N              # per image, not a constant
    s = _rows(cli_run / 'summary.csv')[0]
    assert abs(float(s['flip_ratio']) - sum(r['flipped'] for r in rows) / N) < 1e-9
    assert abs(float(s['l1']) - sum(r['l1'] for r in rows) / N) < 1e-6

def test_resume_does_not_recompute_and_matches_uninterrupted(models, cli_run):
    root, md, oracle = models
    sp = _spruce(md, use_pti=False)
    calls = []
    orig_explain = sp.explain
    sp.explain = lambda x, **kw: (calls.append(len(x)), orig_explain(x, **kw))[1]
    cfg = EvaluationConfig(n=N, batch_size=BS, data_n=DATA_N, n_real=N_REAL)
    out = root / 'resumed'
    part = evaluate_counterfactuals(sp, DEFAULT_DATA, config=cfg, out_dir=out, oracle=str(oracle), max_batches=1, show_progress=False)
    assert not part.complete and part.computed_batches == [0] and len(part.rows) == BS and calls == [BS]
    assert not (out / 'summary.csv').exists()
    b0 = out / 'batches' / 'batch_00000.pt'
    stamp = b0.stat().st_mtime_ns
    seen = []
    full = evaluate_counterfactuals(sp, DEFAULT_DATA, config=cfg, out_dir=out, oracle=str(oracle), show_progress=False,
                                    on_batch=lambda b, rows: seen.append(b))
    assert full.complete and full.computed_batches == [1] and seen == [1] and calls == [BS, N - BS]
    assert b0.stat().st_mtime_ns == stamp                              # the finished batch was read, not rewritten
    for f in ('per_image.csv', 'summary.csv'):
        assert (out / f).read_text() == (cli_run / f).read_text(), f   # same table as the uninterrupted CLI run
    again = evaluate_counterfactuals(sp, DEFAULT_DATA, config=cfg, out_dir=out, oracle=str(oracle), show_progress=False)
    assert again.complete and again.computed_batches == [] and calls == [BS, N - BS]

def test_refuses_other_settings_and_bad_input(models, cli_run, capsys):
    root, md, oracle = models
    assert _cli(md, cli_run, oracle, '--seed', '1') == 2
    assert 'different settings' in capsys.readouterr().err
    from spruce_nb.cli import main
    base = ['evaluate', '--model-dir', str(md), '--out', str(root / 'bad'), '--no-pti', '--data-n', '8']
    assert main(base + ['--classes', 'cardiomegaly']) == 2
    assert main(base + ['--classes', 'cardiomegaly:opacity']) == 2
    assert 'opacity' in capsys.readouterr().err
    assert main(['evaluate', '--model-dir', str(root / 'nowhere'), '--out', str(root / 'bad')]) == 2
    with pytest.raises(ValueError, match='both'): EvaluationConfig(source_class='normal', target_class='normal')

def test_with_pti_when_available(models):
    pti = pytest.importorskip('spruce_nb.pti')
    root, md, oracle = models
    sp = _spruce(md, use_pti=True, pti_config=pti.PTIConfig(steps=2, locality=False))
    r = evaluate_counterfactuals(sp, DEFAULT_DATA, config=EvaluationConfig(n=2, batch_size=2, data_n=DATA_N, n_real=N_REAL),
                                 out_dir=root / 'pti', oracle=str(oracle), show_progress=False)
    assert r.complete and r.report['fingerprint']['use_pti'] is True and len(r.rows) == 2

def test_cli_pti_flags_conflict(tmp_path, capsys):
    from spruce_nb.cli import main
    assert main(['evaluate', '--model-dir', str(tmp_path), '--out', str(tmp_path / 'o'), '--no-pti', '--pti-steps', '3']) == 2
    assert '--no-pti' in capsys.readouterr().err

def test_cli_refuses_bad_numbers_before_writing_anything(models, capsys):
    "Impossible settings fail before the run's fingerprint is written, so the corrected command is not blocked by it."
    from spruce_nb.cli import main
    root, md, oracle = models
    for flags in (['--steps', '0'], ['--lambda-perc', 'nan'], ['--lambda-image', '-1'], ['--pti-lr', 'inf']):
        out = root / f"refused_{flags[0].strip('-')}_{flags[1]}"
        args = ['evaluate', '--model-dir', str(md), '--classes', 'cardiomegaly:normal', '--out', str(out), *flags]
        assert main(args) == 2, flags
        assert flags[0] in capsys.readouterr().err and not out.exists(), flags

def test_cli_extends_a_run_to_a_larger_n(models, cli_run, capsys):
    root, md, oracle = models
    out = root / 'grown'
    assert _cli(md, out, oracle, '--n', str(N - 1)) == 0                # N-1 images: one full batch, one partial
    assert len(_rows(out / 'per_image.csv')) == N - 1
    b0 = out / 'batches' / 'batch_00000.pt'
    stamp = b0.stat().st_mtime_ns
    capsys.readouterr()
    assert _cli(md, out, oracle) == 0                                   # the same command with N: extended, not refused
    assert f'from N = {N - 1} to N = {N}' in capsys.readouterr().out
    assert b0.stat().st_mtime_ns == stamp                               # the full batch was kept
    for f in ('per_image.csv', 'summary.csv'):
        assert (out / f).read_text() == (cli_run / f).read_text(), f    # = the uninterrupted N-image run
    assert _cli(md, out, oracle, '--n', str(N - 1)) == 2                # a smaller N is refused
    assert 'different settings' in capsys.readouterr().err

def test_collect_eval_summarises_a_run(cli_run, tmp_path):
    "tools/collect_eval.py (what the notebooks' committed tables come from): means, 95 % intervals and paired rows from per_image.csv."
    import importlib.util, statistics
    spec = importlib.util.spec_from_file_location('collect_eval', Path(__file__).parent.parent / 'tools' / 'collect_eval.py')
    ce = importlib.util.module_from_spec(spec); spec.loader.exec_module(ce)
    ce.main([str(cli_run), '--out', str(tmp_path / 'ev.json')])
    [r] = json.loads((tmp_path / 'ev.json').read_text())
    rows = _rows(cli_run / 'per_image.csv')
    assert r['n'] == N and len(r['rows']) == N and r['row_columns'] == ce.PAIRED
    l1 = [float(x['l1']) for x in rows]
    assert abs(r['per_image']['l1']['mean'] - statistics.fmean(l1)) < 1e-12
    assert abs(r['per_image']['l1']['ci95'] - 1.96 * statistics.stdev(l1) / N ** 0.5) < 1e-12
    for x in rows: assert r['rows'][x['index']] == [round(float(x[k]), 4) for k in ce.PAIRED]

def test_extension_refused_before_anything_is_deleted(models, cli_run, tmp_path, capsys):
    "If the larger selection does not start with the images already explained, the run is left exactly as it was."
    import shutil
    root, md, oracle = models
    out = tmp_path / 'tampered'
    shutil.copytree(cli_run, out)
    sel = json.loads((out / 'selection.json').read_text())
    sel['indices'] = sel['indices'][::-1]                              # as if another classifier had chosen these images
    (out / 'selection.json').write_text(json.dumps(sel))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()}
    assert _cli(md, out, oracle, '--n', str(N + 1)) == 2
    assert 'does not start with' in capsys.readouterr().err
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob('*') if p.is_file()} == before

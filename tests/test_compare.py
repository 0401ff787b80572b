"""`spruce compare` end to end on tiny 32-px models: the combined table, per-image CSV, paired intervals and proxy–truth
correlations; resumption without recomputation; refusal of unknown methods and stray flags before any work; and the
two baselines (PGD, Latent Shift) through `spruce explain` / `spruce evaluate`."""
import csv, json
from pathlib import Path
import pytest, torch

from spruce_nb.evaluate import DEFAULT_DATA

@pytest.fixture(scope='module')
def models(tiny_models_and_oracle): return tiny_models_and_oracle     # (root, model_dir): tests/conftest.py

def _cmd(md, root, out, *extra, methods='spruce,pgd'):
    return ['compare', '--methods', methods, '--model-dir', str(md), '--n', '4', '--batch-size', '2', '--data-n', '48', '--n-real', '12',
            '--extractor', 'classifier', '--oracle', str(root / 'oracle.pt'), '--out', str(out), '--pgd-steps', '3',
            *(['--no-pti', '--spruce-steps', '2'] if 'spruce' in methods else []), *extra]

@pytest.fixture(scope='module')
def run(models):
    from spruce_nb.cli import main
    root, md = models
    out = root / 'cmp'
    assert main(_cmd(md, root, out)) == 0
    return root, md, out

def _rows(f): return list(csv.DictReader(open(f)))

def test_compare_writes_table_csv_paired_and_correlations(run):
    root, md, out = run
    for f in ('comparison.md', 'comparison.json', 'per_image.csv', 'figure.png'):
        assert (out / f).stat().st_size > 0, f
    for m in ('spruce', 'pgd'):                                    # each method's run is an ordinary `spruce evaluate` run
        assert (out / m / 'report.json').exists() and len(list((out / m / 'batches').glob('batch_*.pt'))) == 2
    rows = _rows(out / 'per_image.csv')
    assert len(rows) == 8 and sorted({r['method'] for r in rows}) == ['pgd', 'spruce']
    idx = {m: sorted(r['index'] for r in rows if r['method'] == m) for m in ('spruce', 'pgd')}
    assert idx['spruce'] == idx['pgd']                              # the same images for every method
    for r in rows: assert abs(float(r['err_d_ctr']) - abs(float(r['oracle_d_ctr']) - float(r['true_d_ctr']))) < 1e-9
    rep = json.loads((out / 'comparison.json').read_text())
    assert rep['reference'] == 'spruce' and [t['row'] for t in rep['table']] == ['SPRUCE', 'PGD']
    # a paired difference is recomputed from the CSV: mean of (pgd − spruce) by index, 1.96·s/√n
    l1 = {(r['method'], r['index']): float(r['l1']) for r in rows}
    d = [l1[('pgd', i)] - l1[('spruce', i)] for i in idx['pgd']]
    p = next(p for p in rep['paired'] if p['column'] == 'l1')
    import statistics, math
    assert p['method'] == 'pgd' and p['n'] == 4
    assert abs(p['mean'] - statistics.fmean(d)) < 1e-9 and abs(p['ci95'] - 1.96 * statistics.stdev(d) / math.sqrt(4)) < 1e-9
    # the correlations are Spearman's over all 8 image × method rows
    from scipy.stats import spearmanr
    c = next(c for c in rep['proxy_truth'] if c['proxy'] == 'l1' and c['truth'] == 'in_mask')
    assert c['n'] == 8 and c['oriented'] and abs(c['rho'] + spearmanr([float(r['l1']) for r in rows], [float(r['in_mask']) for r in rows]).statistic) < 1e-9   # L1 is lower-is-better: turned round
    text = (out / 'comparison.md').read_text()
    assert '## Paired differences: method − SPRUCE' in text and 'Spearman' in text and 'in causal region' in text

def test_compare_resumes_without_recomputing(run, capsys):
    from spruce_nb.cli import main
    root, md, out = run
    stamp = {f: f.stat().st_mtime_ns for f in [*out.glob('*/batches/batch_*.pt'), *out.glob('*/report.json')]}
    assert len(stamp) == 6
    before = json.loads((out / 'comparison.json').read_text())['table']
    assert main(_cmd(md, root, out)) == 0
    assert {f: f.stat().st_mtime_ns for f in stamp} == stamp        # no batch recomputed, no run's tables recomputed
    assert json.loads((out / 'comparison.json').read_text())['table'] == before

def test_compare_adds_a_method_and_adopts_an_evaluate_run(models):
    "A finished `spruce evaluate` run copied in as <method>/ is used as it is; only the new method is computed."
    import shutil
    from spruce_nb.cli import main
    root, md = models
    ev = root / 'ev_pgd'
    assert main(['evaluate', '--method', 'pgd', '--model-dir', str(md), '--n', '4', '--batch-size', '2', '--data-n', '48', '--n-real', '12',
                 '--extractor', 'classifier', '--oracle', str(root / 'oracle.pt'), '--steps', '3', '--out', str(ev)]) == 0
    out = root / 'cmp_adopt'; out.mkdir()
    shutil.copytree(ev, out / 'pgd')
    stamp = {f.name: f.stat().st_mtime_ns for f in (out / 'pgd' / 'batches').glob('*.pt')}
    assert main(_cmd(md, root, out, methods='pgd,latent-shift')) == 0
    assert {f.name: f.stat().st_mtime_ns for f in (out / 'pgd' / 'batches').glob('*.pt')} == stamp
    rep = json.loads((out / 'comparison.json').read_text())
    assert rep['reference'] == 'pgd' and [t['method'] for t in rep['table']] == ['pgd', 'latent-shift']

@pytest.mark.parametrize('extra, msg', [
    (('--methods', 'spruce,dice'), "unknown method(s) ['dice']; the choices are ['ace', 'disc', 'latent-shift', 'pgd', 'spruce']"),
    (('--methods', 'spruce,spruce'), 'named twice'),
    (('--disc-prior', 'dip'), '--disc-prior: set up a method that is not in --methods'),
    (('--steps', '5'), '--spruce-steps 50'),
    (('--method', 'disc'), 'not --method'),
])
def test_compare_refuses_before_any_work(models, tmp_path, capsys, extra, msg):
    from spruce_nb.cli import main
    root, md = models
    out = tmp_path / 'never'
    assert main(_cmd(md, root, out, *extra)) == 2
    assert msg in capsys.readouterr().err
    assert not out.exists()

def test_baselines_through_explain(models, tmp_path, capsys):
    "`spruce explain --method pgd|latent-shift`: the same outputs and records as every method."
    from spruce_nb.cli import main
    from spruce_nb.data import PhantomDataset
    from spruce_nb.core import save_image
    root, md = models
    ds = PhantomDataset('cxr', n=8, size=32, classes=['cardiomegaly', 'normal'], seed=5)
    from spruce_nb.classifier import load_classifier
    clf = load_classifier(md / 'classifier.pt')
    x, y = ds.tensors()
    with torch.no_grad(): p0 = clf(x).softmax(-1)[:, clf.classes.index('cardiomegaly')]
    f = tmp_path / 'q.png'; save_image(x[int(p0.argmax())], f)     # the one the tiny classifier calls cardiomegaly most surely
    for m in ('pgd', 'latent-shift'):
        out = tmp_path / m
        extra = ['--steps', '3'] if m == 'pgd' else []
        assert main(['explain', str(f), '--model-dir', str(md), '--method', m, '--target', 'normal', '--out', str(out), *extra]) == 0
        rec = json.loads((out / 'q.json').read_text())
        assert len(rec['trajectory']) >= 2 and (out / 'q_counterfactual.png').exists()
    assert main(['explain', str(f), '--model-dir', str(md), '--method', 'latent-shift', '--steps', '3', '--out', str(tmp_path / 'x')]) == 2
    assert 'no optimisation steps' in capsys.readouterr().err

def test_latent_shift_follows_the_published_search():
    "λ ← λ − 10 + λ//10 from 0 until a rule fires; here a 1-D toy where p falls linearly and the image never changes."
    from spruce_nb.compare import latent_shift_search, LatentShiftConfig
    class Clf(torch.nn.Module):
        def forward(self, img): l = img.mean((1, 2, 3)); return torch.stack([l, -l], 1)   # p(class 0) = σ(2·mean)
    ws0 = torch.zeros(1, 1, 1)
    render = lambda ws: (ws.view(-1, 1, 1, 1) * 5e-3).expand(-1, 3, 4, 4) + 1.0               # p falls slowly, the image changes < 5 %
    r = latent_shift_search(render, Clf(), ws0, torch.tensor([0]), LatentShiftConfig())
    lam, seq = 0, []
    while lam > -3000: lam = lam - 10 + lam // 10; seq.append(lam)
    assert r['reason'] == ['λ ≤ -3000'] and r['lam'].tolist() == [seq[-1]]
    r = latent_shift_search(render, Clf(), ws0, torch.tensor([0]), LatentShiftConfig(pred_diff=0.001))
    assert r['reason'] == ['p < p0 - 0.001'] and -3000 < r['lam'].item() < 0
    r = latent_shift_search(render, Clf(), ws0, torch.tensor([0]), LatentShiftConfig(max_change=1e-4))
    assert r['reason'] == ['image changed > 0.0001'] and r['lam'].item() < 0

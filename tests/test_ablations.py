"""Ablation sweeps: cells as data (one-at-a-time λs, ε files), a tiny plain-vs-robust + λ sweep through the harness with one
fixed extractor, resumption of a whole sweep, and the per-cell figure."""
import math
from pathlib import Path
import pytest, torch

from spruce_nb.ablations import (SweepCell, lambda_cells, epsilon_cells, epsilon_files, run_sweep, add_robust_classifier,
                                 plot_sweep_images, BASELINE_LAMBDAS, THESIS_LAMBDAS)
from spruce_nb.evaluate import EvaluationConfig, tiny_model_dir

def test_cells_are_one_at_a_time():
    cells = lambda_cells()
    assert len(cells) == 1 + sum(len(v) - 1 for v in THESIS_LAMBDAS.values())
    assert cells[0].overrides == BASELINE_LAMBDAS
    for c in cells[1:]:
        changed = [k for k in BASELINE_LAMBDAS if not math.isclose(c.overrides[k], BASELINE_LAMBDAS[k])]
        assert changed == [c.group]
    assert epsilon_files(0) == ('classifier.pt', 'gmms.pt') and epsilon_files(8) == ('classifier_trades8.pt', 'gmms_trades8.pt')
    assert len({c.slug for c in cells + epsilon_cells()}) == len(cells) + 4

def test_tiny_sweep_end_to_end(tmp_path):
    from spruce_nb.data import fit_oracle
    md = tiny_model_dir(tmp_path / 'models')
    add_robust_classifier(md, 8, steps=12, trades_steps=1)
    oracle = fit_oracle('cxr', n=200, size=32, n_test=50)
    cfg = EvaluationConfig(n=2, batch_size=2, data_n=48, n_real=12, n_figure=2)
    cells = epsilon_cells((0, 8)) + [SweepCell('λ_perc = 1', 'lambda_perc', overrides={**BASELINE_LAMBDAS, 'lambda_perc': 1.0})]
    rows = run_sweep(md, cells, tmp_path / 'sweep', config=cfg, use_pti=False, steps=2, oracle=oracle, show_progress=False)
    assert [r['row'] for r in rows] == [c.name for c in cells]
    assert len({r['extractor'] for r in rows}) == 1 and 'classifier.pt' in rows[0]['extractor']
    assert rows[0]['confidence'] != rows[1]['confidence']       # plain and robust rows explain different classifiers
    for r in rows: assert 0 <= r['flip_ratio'] <= 1 and r['fd_clf'] >= 0 and 0 <= r['in_mask'] <= 1
    md_text = (tmp_path / 'sweep' / 'sweep.md').read_text()
    assert 'ε = 8/255' in md_text and 'In-mask' in md_text
    stamp = (tmp_path / 'sweep' / cells[0].slug / 'batches' / 'batch_00000.pt').stat().st_mtime_ns
    again = run_sweep(md, cells, tmp_path / 'sweep', config=cfg, use_pti=False, steps=2, oracle=oracle, show_progress=False)
    assert [r['fd_clf'] for r in again] == [r['fd_clf'] for r in rows]   # read back, not recomputed
    assert (tmp_path / 'sweep' / cells[0].slug / 'batches' / 'batch_00000.pt').stat().st_mtime_ns == stamp
    import matplotlib.pyplot as plt
    plt.close(plot_sweep_images(tmp_path / 'sweep', cells))

def test_cli_ablations(tmp_path, capsys):
    "`spruce ablations`: ε sweep then a λ sweep on the best-CMMD classifier, one oracle for all cells, figures; bad flags fail clearly."
    from spruce_nb.cli import main
    md = tiny_model_dir(tmp_path / 'models')
    add_robust_classifier(md, 8, steps=12, trades_steps=1)
    out = tmp_path / 'abl'
    common = ['--model-dir', str(md), '--out', str(out), '--n', '2', '--batch-size', '2', '--steps', '2', '--no-pti', '--data-n', '48', '--n-real', '12']
    assert main(['ablations', '--sweeps', 'lambda-amplified', 'epsilon', '--epsilons', '0', '8'] + common) == 0
    for s in ('epsilon', 'lambda-amplified'):
        assert (out / s / 'sweep.md').exists() and (out / s / 'figure.png').stat().st_size > 0
    eps_cells = list((out / 'epsilon').glob('*/oracle.pt'))
    assert len(eps_cells) == 1                                   # fitted once, by the first cell
    assert not list((out / 'lambda-amplified').glob('*/oracle.pt'))
    assert 'λ sweeps explain' in capsys.readouterr().out
    assert main(['ablations', '--sweeps', 'lambda'] + common) == 2
    assert 'needs the ε sweep' in capsys.readouterr().err
    assert main(['ablations', '--sweeps', 'epsilon', '--epsilons', '0', '2'] + common) == 2
    assert 'classifier_trades2' in capsys.readouterr().err

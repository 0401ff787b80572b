"""Collect finished `spruce evaluate` runs into one small JSON for the notebooks and the README.

    python tools/collect_eval.py RUN_DIR [RUN_DIR ...] --out nbs/data/eval_cxr64.json

Per run: the command, the set-level summary rows (every realism column the run computed: fid, kid, mmd_effnet, fd_clf, mmd_clf, or the older runs' fid/cmmd on classifier features; the field's sfid and cd), and for every per-image
column (the thesis' and ground-truth columns, and the field's cout, s3_effnet, mnac, identity_preserved, sigma_l) its mean with a normal-approximation 95 % interval (1.96·s/√n), so two runs can be compared honestly, and the
PAIRED columns of every image (keyed by dataset index), so two runs can be compared image by image.
"""
import argparse, csv, json
from pathlib import Path

from spruce_nb.evaluate import mean_ci      # the package's one implementation of mean ± 1.96·s/√n (also `spruce compare`'s)

COLUMNS = ['flipped', 'confidence', 'l1', 'l1_nearest_target', 'below_nearest', 'lpips', 'recon_mse', 'recon_lpips', 'in_mask', 'edit_cos',
           'leak', 'oracle_flip', 'oracle_d_ctr', 'true_d_ctr', 'crossing_step',
           'cout', 's3_effnet', 'mnac', 'identity_preserved', 'sigma_l']       # the field's protocol (DiME/ACE; 11_metrics §7)
SET_LEVEL = ('row', 'fid', 'kid', 'cmmd', 'mmd_effnet', 'fd_clf', 'mmd_clf', 'sfid', 'cd')   # older runs: fid/cmmd were on classifier features (see 'extractor')
PAIRED = ['flipped', 'confidence', 'l1', 'in_mask', 'edit_cos']   # per image, for paired comparisons between runs


def per_image_stats(rows: list, columns=COLUMNS) -> dict:
    "mean_ci of every column of a run's per_image.csv rows (crossing steps of images that never crossed left out)."
    stats = {}
    for k in columns:
        v = [float(r[k]) for r in rows if r.get(k) not in (None, '')]
        if k == 'crossing_step': v = [x for x in v if x >= 0]
        if mean_ci(v): stats[k] = mean_ci(v)
    return stats


def collect(run: Path) -> dict:
    rep = json.loads((run / 'report.json').read_text())
    rows = list(csv.DictReader(open(run / 'per_image.csv')))
    causal = [k for k in (rows[0] if rows else {}) if k.startswith(('oracle_d_', 'true_d_')) and k not in COLUMNS]   # the task's causal variables (opacity, ...)
    stats = per_image_stats(rows, COLUMNS + causal)
    fp = rep['fingerprint']
    return dict(label=fp['label'], command=rep['command'], n=rep['n_evaluated'], extractor=rep['extractor'],
                lpips_trunk=rep['lpips']['trunk'], use_pti=fp['use_pti'], counterfactual=fp['counterfactual'],
                set_level=[{k: v for k, v in r.items() if k in SET_LEVEL} for r in rep['summary']],
                extractors=rep.get('extractors'), lpips_trunk_sha256=rep['lpips'].get('trunk_sha256'),
                per_image=stats, seconds_last_call=rep['seconds_this_call'],
                rows={r['index']: [round(float(r[k]), 4) for k in PAIRED] for r in rows}, row_columns=PAIRED)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('runs', nargs='+')
    p.add_argument('--out', required=True)
    a = p.parse_args(argv)
    res = [collect(Path(r)) for r in a.runs]
    Path(a.out).write_text(json.dumps(res, indent=1) + '\n')
    for r in res:
        s = r['per_image']
        print(r['label'], {k: f"{v['mean']:.3f}±{v['ci95']:.3f}" for k, v in s.items()})
    print(f'wrote {a.out}')


if __name__ == '__main__':
    main()

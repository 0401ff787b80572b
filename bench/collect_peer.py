"""Collect peer-method runs (`spruce evaluate --method disc|ace`) into one JSON, with DISC's own metrics and each method's speed.

    python bench/collect_peer.py /work/scratch/runs_disc/plain /work/scratch/runs_disc/trades2 --out nbs/data/eval_cxr64_disc.json --time
    python bench/collect_peer.py /work/scratch/runs_ace/plain /work/scratch/runs_ace/trades2 --out nbs/data/eval_cxr64_ace.json --time
    python bench/collect_peer.py /work/scratch/runs_ace/plain_s100 --out nbs/data/eval_cxr64_ace.json --time --add   # keep the runs already collected

Per run: the command, N, every per-image column of the harness as mean ± 95 % interval (1.96·s/√n), the set-level rows (FID, KID, ...),
and DISC's Δlog-odds = logit p_t(x') − logit p_t(x) (the originals re-read from the run's data and selection, scored by the run's classifier).
`--time` adds seconds per counterfactual: one batch of 16 of the same phantoms explained with the run's settings on one CPU thread.
"""
import argparse, csv, json, shlex, sys, time
from pathlib import Path

import torch
from spruce_nb.core import atomic_write
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'tools'))
from collect_eval import mean_ci as _stat, per_image_stats     # one implementation of the per-image statistics

COLUMNS = ['flipped', 'confidence', 'l1', 'mse', 'concentration', 'lpips', 'recon_mse', 'in_mask', 'edit_cos', 'leak', 'oracle_flip',
           'oracle_d_ctr', 'true_d_ctr', 'crossing_step', 'cout', 's3_effnet', 'mnac', 'identity_preserved', 'l1_nearest_target', 'below_nearest']
SET_LEVEL = ('row', 'fid', 'kid', 'cmmd', 'mmd_effnet', 'fd_clf', 'mmd_clf', 'sfid', 'cd')


def _classifier_of(command: str) -> str:
    a = shlex.split(command or '')
    return a[a.index('--classifier') + 1] if '--classifier' in a else 'classifier.pt'


def collect(run: Path, model_dir: Path, timing: bool) -> dict:
    from spruce_nb.data import dataset_from_spec
    from spruce_nb.classifier import load_classifier
    from spruce_nb.metrics import log_odds
    rep = json.loads((run / 'report.json').read_text())
    rows = list(csv.DictReader(open(run / 'per_image.csv')))
    stats = per_image_stats(rows, COLUMNS)
    fp, prot = rep['fingerprint'], rep['fingerprint']['protocol']
    clf_name = _classifier_of(rep['command'])
    clf = load_classifier(model_dir / clf_name, device='cpu').eval()
    ds = dataset_from_spec(prot['data'], split=prot['split'], size=clf.image_size, n=prot.get('data_n'), seed=prot.get('data_seed', 0))
    idx = [int(r['index']) for r in rows]
    t = clf.classes.index(prot['target_class'])
    x = torch.stack([ds[i][0] for i in idx])
    with torch.no_grad(): lo_x = torch.cat([log_odds(clf(x[i:i + 64]), t) for i in range(0, len(x), 64)])
    conf = torch.tensor([float(r['confidence']) for r in rows], dtype=torch.float64).clamp(1e-7, 1 - 1e-7)
    dlo = (torch.log(conf / (1 - conf)) - lo_x.double()).tolist()
    stats['delta_log_odds'] = _stat(dlo)
    out = dict(label=fp['label'], command=rep['command'], n=rep['n_evaluated'], classifier=clf_name, extractor=rep['extractor'],
               describe=next((l for l in (run / 'summary.md').read_text().splitlines() if l.startswith('- explainer:')), ''),
               disc=fp.get('disc'), ace=fp.get('ace'), models=fp.get('models'), set_level=[{k: v for k, v in r.items() if k in SET_LEVEL} for r in rep['summary']],
               per_image=stats, status={s: sum(r['status'] == s for r in rows) for s in sorted({r['status'] for r in rows})},
               seconds_last_call=rep['seconds_this_call'])
    if timing:
        torch.set_num_threads(1)
        if 'ace' in fp:
            from spruce_nb.ace import ACE, ACEConfig
            d = ACE.from_dir(model_dir, classifier=clf_name, device='cpu', config=ACEConfig(**fp['ace']))
        else:
            from spruce_nb.disc import DISC, DISCConfig
            d = DISC.from_dir(model_dir, classifier=clf_name, consistency='duq', device='cpu', config=DISCConfig(**fp['disc']))
        t0 = time.perf_counter(); d.explain(x[:16], target=prot['target_class'], show_progress=False)
        out['seconds_per_cf'] = round((time.perf_counter() - t0) / len(x[:16]), 3)
        out['timing'] = dict(batch=len(x[:16]), threads=1, torch=torch.__version__,
                             note="one batch of 16, this run's settings, one CPU thread (other jobs shared the 2 cores)")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('runs', nargs='+')
    p.add_argument('--model-dir', default='spruce_nb/zoo/cxr64')
    p.add_argument('--out', required=True)
    p.add_argument('--time', action='store_true', help='also time one batch of 16 on one CPU thread')
    p.add_argument('--add', action='store_true', help='keep the runs already in --out (a run with the same command is replaced)')
    a = p.parse_args(argv)
    res = [collect(Path(r), Path(a.model_dir), a.time) for r in a.runs]
    out = Path(a.out)
    if a.add and out.exists():
        new = {r['command'] for r in res}
        res = [r for r in json.loads(out.read_text()) if r['command'] not in new] + res
    with atomic_write(out, overwrite=True, mode='w') as f: f.write(json.dumps(res, indent=1) + '\n')
    for r in res:
        print(r['label'], r['classifier'], r.get('seconds_per_cf'), {k: f"{v['mean']:.3f}±{v['ci95']:.3f}" for k, v in r['per_image'].items()})
    print(f'wrote {a.out}')


if __name__ == '__main__':
    main()

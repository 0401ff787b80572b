"""One generator for both chest tasks (#25): is the cardiomegaly classifier explained as well through the 3-class chest generator
(cxr64-opacity: normal, cardiomegaly, opacity) as through its own 2-class one (cxr64)?

Both are `spruce evaluate` runs with the same command, classifier, GMMs and held-out images; only --model-dir's generator and
encoder differ. The 2-class run is the committed acceptance run (nbs/data/eval_cxr64_acceptance.json, collected by
tools/collect_eval.py, which keeps its per-image flip, confidence, L1, in-region share and edit cosine); the 3-class run is
a run directory. Prints both runs' means and the paired differences (3-class − 2-class, image by image, 95 % intervals), the
share of the image each chest task's causal region covers (the README's "region's share": the true masks of held-out source
phantoms, dilated by 2 px as `metrics.edit_metrics` does for its in-region share), and writes them to --out.

    python bench/shared_generator.py RUN_3CLASS --out nbs/data/shared_generator_cxr.json
"""
import argparse, csv, json
from pathlib import Path

from spruce_nb.compare import paired_differences
from spruce_nb.evaluate import mean_ci
from spruce_nb.tasks import THESIS_TASKS, region_share, paired_rows   # the chance level of the in-region share (19_tasks)

ROOT = Path(__file__).resolve().parents[1]
SET_ROWS = ('counterfactuals', 'reconstructions')

def _set_level(summary: list, keys=('fid', 'mmd_effnet')) -> dict:
    "The set-level realism of the counterfactuals and of the reconstructions (rows of the run's summary)."
    out = {}
    for r in summary:
        name = next((s for s in SET_ROWS if s in r.get('row', '')), None)
        if name: out[name] = {k: r[k] for k in keys if k in r}
    return out

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('run', help='the spruce evaluate run through the 3-class generator')
    p.add_argument('--reference', default=str(ROOT / 'nbs/data/eval_cxr64_acceptance.json'), help='collected runs (tools/collect_eval.py)')
    p.add_argument('--reference-index', type=int, default=0, help='which collected run (0: the plain classifier)')
    p.add_argument('--out', required=True)
    a = p.parse_args(argv)
    ref = json.loads(Path(a.reference).read_text())[a.reference_index]
    cols = ref['row_columns']
    rows_ref = paired_rows(ref)
    run = Path(a.run)
    rep = json.loads((run / 'report.json').read_text())
    rows_run = [dict(index=int(r['index']), **{k: float(r[k]) for k in cols if r.get(k) not in (None, '')})
                for r in csv.DictReader(open(run / 'per_image.csv'))]
    same = sorted({r['index'] for r in rows_ref} & {r['index'] for r in rows_run})
    paired = paired_differences({'3-class G': rows_run, '2-class G': rows_ref}, '2-class G', cols)
    res = dict(reference=dict(label=ref['label'], command=ref['command'], n=ref['n'], set_level=_set_level(ref['set_level']),
                              means={k: mean_ci([r[k] for r in rows_ref]) for k in cols}),
               run=dict(label=rep['fingerprint']['label'], command=rep['command'], n=rep['n_evaluated'], set_level=_set_level(rep['summary']),
                        means={k: mean_ci([r[k] for r in rows_run if k in r]) for k in cols}),
               same_images=len(same), paired=paired,
               region_share={t: round(region_share(THESIS_TASKS[t]), 3) for t in ('cardiomegaly', 'opacity')})
    Path(a.out).write_text(json.dumps(res, indent=1) + '\n')
    print(f"images in both runs: {len(same)} (2-class: {len(rows_ref)}, 3-class: {len(rows_run)})")
    for side in ('reference', 'run'):
        s = res[side]
        print(f"{s['label']}: " + ', '.join(f"{k} {v['mean']:.3f}±{v['ci95']:.3f}" for k, v in s['means'].items() if v)
              + '; ' + ', '.join(f"{n} {k.upper()} {v:.1f}" if k == 'fid' else f"{n} {k} {v:.3f}" for n, d in s['set_level'].items() for k, v in d.items()))
    for d in paired:
        print(f"paired {d['column']}: 3-class − 2-class = {d['mean']:+.3f} ± {d['ci95']:.3f} (n={d['n']}; higher {d['higher']}, lower {d['lower']})")
    print('causal region (dilated 2 px), share of the image: ' + ', '.join(f'{k} {v:.2f}' for k, v in res['region_share'].items()))
    print(f'wrote {a.out}')

if __name__ == '__main__':
    main()

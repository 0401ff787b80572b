"""How much of the disease does the inversion alone keep? (#25)

For held-out source phantoms of one of the thesis' tasks (`spruce_nb.tasks.THESIS_TASKS`), prints what the phantom oracle
reads of the task's causal variable, and what the task's plain classifier says, on four versions of the same images:
the originals, the e4e reconstructions (the pivot w_p through G), the e4e + PTI reconstructions SPRUCE starts from (the
acceptance protocol's PTI: 100 steps at lr 1e-3), and the true counterfactuals of the phantoms. The oracle is fitted as
`spruce evaluate` fits it (2000 phantoms, data seed + 1), so its columns are the harness' columns; reading it on the true
counterfactuals shows how much of the true change the oracle itself can see.

    python bench/inversion_oracle.py oct --n 32 --out nbs/data/inversion_oracle_oct.json
"""
import argparse, json
from pathlib import Path

import torch
from spruce_nb.counterfactual import Spruce
from spruce_nb.data import PhantomDataset, fit_oracle, phantom_counterfactuals
from spruce_nb.demo import ZOO_DIR
from spruce_nb.evaluate import mean_ci
from spruce_nb.pti import PTIConfig
from spruce_nb.tasks import THESIS_TASKS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('task', choices=sorted(THESIS_TASKS))
    p.add_argument('--n', type=int, default=32, help='held-out source phantoms (the first N of the test split, whatever the classifier says)')
    p.add_argument('--pti-steps', type=int, default=100)
    p.add_argument('--out', default=None, help='write the numbers as JSON here')
    a = p.parse_args(argv)
    if a.out and Path(a.out).exists(): raise SystemExit(f'{a.out} exists; choose another --out (nothing is overwritten).')
    t = THESIS_TASKS[a.task]
    torch.manual_seed(0)
    sp = Spruce.from_dir(ZOO_DIR / t.entry, device='cpu', pti_config=PTIConfig(steps=a.pti_steps, lr=1e-3))
    ds = PhantomDataset(t.modality, n=8 * a.n, size=64, seed=0, classes=(t.target, t.source), split='test')
    idx = [i for i in range(len(ds)) if ds.labels[i] == 1][:a.n]
    x = torch.stack([ds[i][0] for i in idx])
    gt = phantom_counterfactuals(t.modality, ds.seeds[idx], t.source, t.target, ds.size, markers=ds.markers[idx],
                                 marker_scale=ds.marker_scale)['counterfactuals']   # one batch: what ds.ground_truth renders per item
    oracle = fit_oracle(t.modality, n=2000, size=64, seed=1)
    inv = sp.invert(x)
    with torch.no_grad():
        versions = {'original': x, 'e4e reconstruction': sp.G.synthesis(inv.ws_pivot, noise_mode='const').clamp(-1, 1),
                    'e4e + PTI reconstruction': inv.render(inv.ws_pivot).clamp(-1, 1), 'true counterfactual': gt}
        j, src, tgt = oracle.names.index(t.variable), sp.classes.index(t.source), sp.classes.index(t.target)
        res = {}
        for name, im in versions.items():
            v, pr = oracle.read(im.float())[:, j], sp.classifier(im.float()).softmax(-1)
            res[name] = dict(oracle=mean_ci(v.tolist()), oracle_sd=float(v.std()), p_source=mean_ci(pr[:, src].tolist()),
                             predicted_target=float((pr.argmax(-1) == tgt).float().mean()))
            print(f"{name:26s} oracle {t.variable} {res[name]['oracle']['mean']:8.3f} ± {res[name]['oracle']['ci95']:.3f} (sd {res[name]['oracle_sd']:.3f})  "
                  f"p({t.source}) {res[name]['p_source']['mean']:.3f}  predicted {t.target} {res[name]['predicted_target']:.0%}")
    if a.out:
        tmp = Path(a.out).with_suffix('.tmp')           # written whole, then moved into place
        tmp.write_text(json.dumps(dict(task=a.task, entry=t.entry, n=len(idx), pti_steps=a.pti_steps, variable=t.variable,
                                               oracle_mae=oracle.error.get(t.variable) if isinstance(oracle.error, dict) else None,
                                               command='python bench/inversion_oracle.py ' + ' '.join(argv or __import__('sys').argv[1:]), versions=res), indent=1) + '\n')
        tmp.replace(a.out)
        print(f'wrote {a.out}')

if __name__ == '__main__':
    main()

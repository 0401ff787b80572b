"""Is it the number of steps or the regularisers that holds SPRUCE's optimisation back on a thesis task?

On the first N held-out source images of the task (test split, dataset order) that the task's plain zoo classifier gets right,
one shared inversion (the acceptance protocol's PTI: 100 steps at lr 1e-3), then the latent optimisation under the settings below;
prints flip ratio, mean p(target) and p(target) along the steps for each, and writes them as JSON.

    python bench/steps_needed.py mri --n 16 --out nbs/data/steps_needed_mri.json

Settings: the acceptance protocol (T = 50, λ_image 1e-3); the same without any regulariser (λ_perc = λ_latent = λ_image = 0);
T = 200 (the package default) with the acceptance λs. If removing the regularisers changes nothing and T = 200 flips, the step
budget is what limits: the step size is cosine-annealed to 0 over T steps, so a large edit can run out of steps.
"""
import argparse, json, time
from pathlib import Path

import torch

from spruce_nb.counterfactual import Spruce, CounterfactualConfig
from spruce_nb.demo import ZOO_DIR
from spruce_nb.pti import PTIConfig
from spruce_nb.records import open_dataset
from spruce_nb.tasks import THESIS_TASKS

SETTINGS = {'acceptance (T = 50, λ_image 1e-3)': dict(steps=50, lambda_image=1e-3),
            'T = 50, no regulariser': dict(steps=50, lambda_image=0.0, lambda_perc=0.0, lambda_latent=0.0),
            'T = 200, λ_image 1e-3': dict(steps=200, lambda_image=1e-3)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('task', choices=sorted(THESIS_TASKS))
    p.add_argument('--n', type=int, default=16)
    p.add_argument('--out', type=Path, default=None)
    a = p.parse_args(argv)
    if a.out is not None and a.out.exists(): raise SystemExit(f'{a.out} exists; choose another --out (nothing is overwritten).')
    t = THESIS_TASKS[a.task]
    ds = open_dataset(t.data, split='test', size=64)
    base = Spruce.from_dir(ZOO_DIR / t.entry, pti_config=PTIConfig(steps=100, lr=1e-3))
    src = base.classes.index(t.source)
    cand = [i for i in range(len(ds)) if int(ds.labels[i]) == src]          # labels without rendering every image
    X = torch.stack([ds[i][0] for i in cand[:4 * a.n]])
    with torch.no_grad(): ok = base.classifier(X.to(base.device)).argmax(-1).cpu() == src
    X = X[ok][:a.n]
    inv = base.invert(X)
    res = dict(task=a.task, entry=t.entry, source=t.source, target=t.target, n=len(X), settings={})
    for name, kw in SETTINGS.items():
        s = Spruce(base.classifier, base.G, base.encoder, base.gmms, config=CounterfactualConfig(**kw), pti_config=base.pti_config)
        t0 = time.time()
        e = s.explain(X, target=t.target, inversion=inv, show_progress=False)
        P = e.probs[:, :, base.classes.index(t.target)]
        r = dict(flip=float(e.flipped.float().mean()), p_target=float(e.confidence.mean()), seconds=round(time.time() - t0, 1),
                 p_target_by_step={int(k): round(float(P[k].mean()), 3) for k in range(0, len(P), max(1, (len(P) - 1) // 8))})
        res['settings'][name] = r
        print(f"{name}: flip {r['flip']:.0%}, p({t.target}) {r['p_target']:.2f}; along the steps {r['p_target_by_step']}", flush=True)
    if a.out is not None:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix('.tmp'); tmp.write_text(json.dumps(res, indent=1) + '\n'); tmp.replace(a.out)
        print(f'wrote {a.out}')


if __name__ == '__main__': main()

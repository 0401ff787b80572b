"""Side-by-side figure of the same held-out phantoms explained by SPRUCE and DISC (plain and TRADES 2/255 classifiers).

    OMP_NUM_THREADS=1 python bench/disc_figure.py --n 6 --out nbs/images/disc_vs_spruce.png

The images are the first N of the acceptance selection (`spruce evaluate`'s seed 0: the first correctly classified cardiomegaly phantoms
of the plain classifier in phantoms:cxr:cardiomegaly-vs-normal, test split). SPRUCE runs with the README's acceptance settings (T = 50,
PTI 100 steps at lr 1e-3, λ_image 1e-3), DISC with its defaults and the zoo's DUQ models. Rows: original, SPRUCE and DISC per classifier
(p(normal) in the title), and the phantom's true counterfactual.
"""
import argparse
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--n', type=int, default=6)
    p.add_argument('--model-dir', default='spruce_nb/zoo/cxr64')
    p.add_argument('--out', default='nbs/images/disc_vs_spruce.png')
    a = p.parse_args(argv)
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    from spruce_nb.core import seed_everything, image_to_numpy
    from spruce_nb.data import dataset_from_spec, phantom_counterfactuals
    from spruce_nb.evaluate import select_correctly_classified
    from spruce_nb.counterfactual import Spruce, CounterfactualConfig
    from spruce_nb.pti import PTIConfig
    from spruce_nb.disc import DISC
    torch.set_num_threads(1)
    md = Path(a.model_dir)
    ds = dataset_from_spec('phantoms:cxr:cardiomegaly-vs-normal', split='test', size=64)
    rows = {}
    for clf, gm, tag in [('classifier.pt', 'gmms.pt', 'plain'), ('classifier_trades2.pt', 'gmms_trades2.pt', 'TRADES 2/255')]:
        sp = Spruce.from_dir(md, classifier=clf, gmms=gm, device='cpu', pti_config=PTIConfig(steps=100, lr=1e-3))
        sp.base_config = sp.base_config.replace(steps=50, lambda_image=1e-3)
        if tag == 'plain':
            idx = select_correctly_classified(sp.classifier, ds, 'cardiomegaly', a.n, 0)['indices'][:a.n]
            x = torch.stack([ds[i][0] for i in idx])
        seed_everything(0)
        rows[f'SPRUCE, {tag}'] = sp.explain(x, target='normal', show_progress=False)
        seed_everything(0)
        rows[f'DISC, {tag}'] = DISC.from_dir(md, classifier=clf, consistency='duq', device='cpu').explain(x, target='normal', show_progress=False)
    gt = phantom_counterfactuals('cxr', ds.seeds[idx], 'cardiomegaly', 'normal', size=64)['counterfactuals']
    names = ['original'] + list(rows) + ['true counterfactual']
    fig, axs = plt.subplots(len(names), a.n, figsize=(1.6 * a.n, 1.75 * len(names)))
    for j in range(a.n):
        for r, name in enumerate(names):
            ax = axs[r, j]
            if name == 'original': im, t = x[j], f'#{idx[j]}'
            elif name == 'true counterfactual': im, t = gt[j], ''
            else: ex = rows[name]; im, t = ex.counterfactual[j], f'p(normal) {float(ex.confidence[j]):.2f}'
            ax.imshow(image_to_numpy(im)); ax.set_xticks([]); ax.set_yticks([])
            ax.set_title(t, fontsize=7)
            if j == 0: ax.set_ylabel(name, fontsize=8)
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=100)
    from PIL import Image
    Image.open(a.out).convert('L').save(a.out, optimize=True)   # grayscale phantoms: a third of the bytes
    print(f'wrote {a.out}: images {idx}')


if __name__ == '__main__':
    main()

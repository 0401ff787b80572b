"""Peer check: ACE's own COUT code (guillaumejs2403/ACE, eval_utils/cout_metrics.py, from C3LT) vs `spruce_nb.metrics.cout`,
on the same images and the same classifier.

Run (ACE is fetched for the run and never committed; any local checkout works):
    git clone https://github.com/guillaumejs2403/ACE /tmp/ace     # or: git --git-dir=MIRROR archive HEAD | tar -x -C /tmp/ace
    python bench/peer_ace_metrics.py --ace /tmp/ace [--n 3] [--classifier spruce_nb/zoo/cxr64/classifier.pt]

Images: held-out cardiomegaly chest phantoms (64 px) and four candidate counterfactuals towards *normal* (the true counterfactual,
half of its effect, the true counterfactual with fresh noise, another patient), explained classifier: the model zoo's plain
ConvNeXt. ACE works on [0, 1] images, spruce_nb on [-1, 1]: ACE gets (x + 1) / 2 and a wrapper that feeds the classifier 2x − 1.
ACE's two branches are both run: multi-class (softmax, source and target class given) and binary (one sigmoid logit,
l_normal − l_cardiomegaly, the source read from its sign). Per image: theirs (`calculate_cout` on a batch of one) vs ours, the
largest difference, and ACE's own dataset-level `evaluate` (its mean over a DataLoader) vs our mean. Acceptance: <= 1e-5.
"""
import argparse, sys, time
from pathlib import Path

import torch
from torch import nn

import spruce_nb
from spruce_nb.classifier import load_classifier
from spruce_nb.core import to_unit
from spruce_nb.data import make_phantoms, phantom_counterfactuals
from spruce_nb.metrics import cout, phantom_cf_path


class ZeroOne(nn.Module):
    "ACE's convention: the classifier takes [0, 1] images."
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, z): return self.m(z * 2 - 1)


class OneLogit(nn.Module):
    "A two-class softmax classifier as ACE's binary classifiers are: one logit, positive for class `pos`."
    def __init__(self, m, pos, neg): super().__init__(); self.m, self.pos, self.neg = m, pos, neg
    def forward(self, z): l = self.m(z); return (l[:, self.pos] - l[:, self.neg])[:, None]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--ace', required=True, help='a local checkout of guillaumejs2403/ACE')
    ap.add_argument('--n', type=int, default=3, help='phantoms per candidate')
    ap.add_argument('--classifier', default=str(Path(spruce_nb.__file__).parent / 'zoo' / 'cxr64' / 'classifier.pt'))
    ap.add_argument('--seed', type=int, default=5)
    a = ap.parse_args(argv)
    ace = Path(a.ace)
    if not (ace / 'eval_utils' / 'cout_metrics.py').is_file():
        raise SystemExit(f"{ace}: no eval_utils/cout_metrics.py; pass --ace a checkout of https://github.com/guillaumejs2403/ACE")
    sys.path.insert(0, str(ace))
    from eval_utils.cout_metrics import calculate_cout, gen_masks, evaluate   # ACE's code, unchanged
    import subprocess
    rev = subprocess.run(['git', '-C', str(ace), 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip() or 'unknown (not a git work tree)'

    clf = load_classifier(a.classifier, device='cpu').eval()
    si, ti = clf.classes.index('cardiomegaly'), clf.classes.index('normal')
    b = make_phantoms('cxr', a.n, 64, a.seed, ('cardiomegaly',), 'test')
    gt = phantom_counterfactuals('cxr', b.seeds, 'cardiomegaly', 'normal')
    half = phantom_cf_path('cxr', b.seeds, 'cardiomegaly', 'normal', ts=[0.5])[0][0]
    noisy = (gt['counterfactuals'] + 0.04 * torch.randn(gt['images'].shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    other = make_phantoms('cxr', a.n, 64, a.seed + 1, ('normal',), 'test').images
    x = gt['images'].repeat(4, 1, 1, 1)
    xc = torch.cat([gt['counterfactuals'], half, noisy, other])
    kind = ['true CF'] * a.n + ['half effect'] * a.n + ['true CF + noise'] * a.n + ['other patient'] * a.n
    x01, c01 = to_unit(x), to_unit(xc)
    H, W = x.shape[-2:]
    step = max(1, (H * W) // 50)                                      # as ACE's evaluate(): cout_num_steps = 50
    print(f'ACE {ace} (commit {rev}); classifier {a.classifier} (classes {list(clf.classes)}); {len(x)} pairs of 64-px phantoms, step {step} px')
    worst = 0.0
    for branch in ('multi-class (softmax)', 'binary (one sigmoid logit)'):
        binary = branch.startswith('binary')
        model = OneLogit(clf, ti, si) if binary else clf
        t = time.perf_counter()
        ours = cout(model, x, xc, binary=True) if binary else cout(model, x, xc, ti, si)
        t_ours = time.perf_counter() - t
        t = time.perf_counter()
        theirs = torch.tensor([calculate_cout(x01[i:i + 1], c01[i:i + 1], gen_masks(x01[i:i + 1], c01[i:i + 1]), ZeroOne(model),
                                              si, ti, step, binary)[0] for i in range(len(x))], dtype=torch.float64)
        t_theirs = time.perf_counter() - t
        loader = torch.utils.data.DataLoader(list(zip(x01, c01)), batch_size=4, shuffle=False)
        ace_mean, _ = evaluate(si, ti, ZeroOne(model), loader, 'cpu', binary)
        d = (ours.double() - theirs).abs()
        worst = max(worst, float(d.max()), abs(float(ours.double().mean()) - ace_mean))
        print(f'\n{branch}:  ours {t_ours:.1f} s (batched), ACE {t_theirs:.1f} s (one image at a time)')
        print(f"{'pair':>4s} {'candidate':16s} {'ACE COUT':>11s} {'ours':>11s} {'|diff|':>9s}")
        for i in range(len(x)): print(f'{i:4d} {kind[i]:16s} {theirs[i]:11.7f} {ours[i]:11.7f} {d[i]:9.2e}')
        print(f'max |ACE − ours| per image: {d.max():.2e};  ACE evaluate() mean {ace_mean:.7f}, ours {ours.double().mean():.7f}, '
              f'|diff| {abs(float(ours.double().mean()) - ace_mean):.2e}')
    print(f'\nlargest difference overall: {worst:.2e} -> ' + ('PASS (<= 1e-5)' if worst <= 1e-5 else 'FAIL (> 1e-5)'))
    return 0 if worst <= 1e-5 else 1


if __name__ == '__main__':
    raise SystemExit(main())

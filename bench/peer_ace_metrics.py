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

With --layout RUN/dime --exp LABEL --layout-classifier CLF.pt (a `spruce evaluate --layout dime` run and the classifier it
explained), it also reads that run's files with ACE's compute_COUT.py (its CFDataset: CC/{CCF,ICF}/CF and Original/Correct, as
PNGs in [0, 1]) and runs ACE's `evaluate` on them, against our `cout` on the same decoded images, given ACE's ordering map
(acceptance) and with its own (the tie order of equal 8-bit differences then follows the other decoding's rounding: printed only). compute_COUT.py does not import
as shipped (it imports models.mnist and core.attacks_and_models.Normalizer, which the repository lacks, and h5py, blobfile and
mpi4py for datasets it does not use here): those names are stubbed, nothing else is changed.
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
    "A two-class softmax classifier as ACE's binary classifiers are: one logit per image [N], positive for class `pos`."
    def __init__(self, m, pos, neg): super().__init__(); self.m, self.pos, self.neg = m, pos, neg
    def forward(self, z): l = self.m(z); return l[:, self.pos] - l[:, self.neg]


def layout_check(a, evaluate) -> float:
    "ACE's compute_COUT.py pipeline (CFDataset + evaluate) on a --layout dime run vs our cout on the same files."
    import types, csv
    for name in ('models.mnist', 'h5py', 'blobfile', 'mpi4py'):      # names compute_COUT.py imports but does not use here
        if name not in sys.modules:
            m = types.ModuleType(name); m.Net = m.MPI = None; sys.modules[name] = m
    import core.attacks_and_models as cam
    if not hasattr(cam, 'Normalizer'): cam.Normalizer = None
    argv, sys.argv = sys.argv, sys.argv[:1]
    import compute_COUT
    sys.argv = argv
    ds = compute_COUT.CFDataset(a.layout, a.exp)
    clf = load_classifier(a.layout_classifier, device='cpu').eval()
    si, ti = clf.classes.index(a.source), clf.classes.index(a.target)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=False)
    ace_mean, _ = evaluate(si, ti, ZeroOne(clf), loader, 'cpu', False)   # compute_COUT.py's call, classifier in [0, 1]
    x01 = torch.stack([ds[i][0] for i in range(len(ds))]); c01 = torch.stack([ds[i][1] for i in range(len(ds))])
    from eval_utils.cout_metrics import gen_masks
    ours = cout(clf, x01 * 2 - 1, c01 * 2 - 1, ti, si).double()
    ours_m = cout(clf, x01 * 2 - 1, c01 * 2 - 1, ti, si, mask=gen_masks(x01, c01)[:, 0]).double()
    d, d0 = abs(float(ours_m.mean()) - ace_mean), abs(float(ours.mean()) - ace_mean)
    print(f"\nlayout {a.layout} (EXP {a.exp}, {len(ds)} counterfactuals read by ACE's CFDataset), classifier {a.layout_classifier}:")
    print(f"  ACE compute_COUT pipeline mean {ace_mean:.7f}; ours on the same PNGs with ACE's ordering map {float(ours_m.mean()):.7f}, |diff| {d:.2e}")
    print(f"  ours with its own map (mask from the [-1, 1] decoding u/127.5 - 1) {float(ours.mean()):.7f}, |diff| {d0:.2e}: "
          "8-bit images tie on many |x' - x| values, and float rounding of the two decodings orders the ties differently")
    per = Path(a.layout).parent / 'per_image.csv'
    if per.exists():
        rows = list(csv.DictReader(open(per)))
        h = sum(float(r['cout']) for r in rows) / len(rows)
        print(f"  (the run's own cout column, on the unquantised float images: mean {h:.7f}; the PNGs are 8-bit, so it may differ a little)")
    return d

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--ace', required=True, help='a local checkout of guillaumejs2403/ACE')
    ap.add_argument('--n', type=int, default=3, help='phantoms per candidate')
    ap.add_argument('--classifier', default=str(Path(spruce_nb.__file__).parent / 'zoo' / 'cxr64' / 'classifier.pt'))
    ap.add_argument('--seed', type=int, default=5)
    ap.add_argument('--layout', default=None, help='also check a `spruce evaluate --layout dime` run: its dime/ folder')
    ap.add_argument('--exp', default='SPRUCE', help='EXP name under --layout/Results (the run label)')
    ap.add_argument('--layout-classifier', default=None, help='the classifier that run explained')
    ap.add_argument('--source', default='cardiomegaly'); ap.add_argument('--target', default='normal')
    ap.add_argument('--only', choices=['multi', 'binary'], default=None, help="run only one of ACE's two branches")
    a = ap.parse_args(argv)
    ace = Path(a.ace)
    if not (ace / 'eval_utils' / 'cout_metrics.py').is_file():
        raise SystemExit(f"{ace}: no eval_utils/cout_metrics.py; pass --ace a checkout of https://github.com/guillaumejs2403/ACE")
    if a.layout and not a.layout_classifier: raise SystemExit('--layout needs --layout-classifier: the classifier that run explained')
    sys.path.insert(0, str(ace))
    from eval_utils.cout_metrics import calculate_cout, gen_masks, evaluate   # ACE's code, unchanged
    import subprocess
    rev = subprocess.run(['git', '-C', str(ace), 'rev-parse', 'HEAD'], capture_output=True, text=True).stdout.strip() or 'unknown: not a git work tree'

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
    for branch in [b for b in ('multi-class (softmax)', 'binary (one sigmoid logit)') if a.only is None or b.startswith(a.only)]:
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
    if a.layout:
        worst = max(worst, layout_check(a, evaluate))
    print(f'\nlargest difference overall: {worst:.2e} -> ' + ('PASS (<= 1e-5)' if worst <= 1e-5 else 'FAIL (> 1e-5)'))
    return 0 if worst <= 1e-5 else 1


if __name__ == '__main__':
    raise SystemExit(main())

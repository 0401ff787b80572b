"""Batched 1-D GMM fit (spruce_nb.piece.fit_gmm_1d) vs a loop of scikit-learn GaussianMixture fits, side by side in one run.

The ConvNeXt-Base case of the thesis: 1024 features x 2 classes x 4000 samples, K = 5, scikit-learn defaults
(tol 1e-3, reg_covar 1e-6, max_iter 100, k-means init, n_init 1, random_state fixed) against ours (tol 1e-3, 3 inits).

    python bench/bench_gmm.py                 # full: every feature fitted by both (about 1-2 minutes of scikit-learn)
    python bench/bench_gmm.py --quick         # scikit-learn on a subset of features; its total time is EXTRAPOLATED
    python bench/bench_gmm.py --from feats.pt # real features: a torch.save'd dict(features=[N, D], predictions=[N])

Default data: synthetic "network-like" features (GELU of random 1-3 component Gaussian mixtures with random scales,
offsets and a few near-constant columns), because this CPU machine cannot produce 8000 ConvNeXt-Base feature vectors
quickly; `--from` runs the same comparison on real features (e.g. `collect_features(clf, ds)._asdict()`).
Times: CPU time of this process (time.process_time, robust to other jobs sharing the machine) and wall time.
"""
import os
os.environ.setdefault('OMP_NUM_THREADS', '1'); os.environ.setdefault('MKL_NUM_THREADS', '1')
import argparse, time, warnings
import numpy as np
import torch

torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))
from spruce_nb.piece import fit_gmm_1d


def synthetic_features(n_classes, n, d, seed=0):
    "Class-conditional GELU-of-mixture features [n_classes, n, d] (ConvNeXt-like: skewed, multimodal, some near-constant)."
    g = torch.Generator().manual_seed(seed)
    out = []
    for c in range(n_classes):
        m = torch.randint(1, 4, (d,), generator=g)
        comp = (torch.rand(n, d, generator=g) * m).long()                       # component per sample, < m
        mus = torch.randn(3, d, generator=g) * 1.5
        sds = torch.rand(3, d, generator=g) * 0.8 + 0.1
        z = mus.gather(0, comp) + sds.gather(0, comp) * torch.randn(n, d, generator=g)
        x = torch.nn.functional.gelu(z) * (torch.rand(d, generator=g) * 2 + 0.05) + torch.randn(d, generator=g) * 0.2
        x[:, :4] = x[:, :4] * 1e-4 + 0.3                                         # a few nearly constant features
        out.append(x)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--features', type=int, default=1024, help='features D (default 1024, ConvNeXt-Base)')
    p.add_argument('--classes', type=int, default=2)
    p.add_argument('--samples', type=int, default=4000, help='samples per class (default 4000)')
    p.add_argument('--k', type=int, default=5)
    p.add_argument('--quick', action='store_true', help='fit scikit-learn on --sk-features features per class only and extrapolate its time')
    p.add_argument('--sk-features', type=int, default=64, help='with --quick: features per class fitted by scikit-learn (default 64)')
    p.add_argument('--from', dest='src', default=None, help='torch file with dict(features=[N, D], predictions=[N]) (real features)')
    p.add_argument('--seed', type=int, default=0)
    a = p.parse_args(argv)

    if a.src:
        d = torch.load(a.src, weights_only=True)
        X, P = d['features'].float(), d['predictions'].long()
        data = [X[P == c] for c in P.unique().tolist()]
        src = f"{a.src}: {len(data)} predicted classes, {X.shape[1]} features, samples per class {[len(x) for x in data]}"
    else:
        data = synthetic_features(a.classes, a.samples, a.features, a.seed)
        src = f"synthetic network-like features: {a.classes} classes x {a.samples} samples x {a.features} features"
    D = data[0].shape[1]
    sk_cols = list(range(D)) if not a.quick else sorted(np.random.default_rng(a.seed).choice(D, min(a.sk_features, D), replace=False).tolist())
    print(src)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; K = {a.k}")

    # ours: one batched fit per class
    ours_cpu = ours_wall = 0.0; ll_ours = []
    for x in data:
        c0, w0 = time.process_time(), time.perf_counter()
        g = fit_gmm_1d(x, k=a.k, seed=a.seed)
        ours_cpu += time.process_time() - c0; ours_wall += time.perf_counter() - w0
        ll_ours.append(g.log_likelihood(x).double().numpy())

    # scikit-learn: a loop of GaussianMixture(K) fits
    from sklearn.mixture import GaussianMixture
    from sklearn.exceptions import ConvergenceWarning
    sk_cpu = sk_wall = 0.0; ll_sk = []; n_sk = 0
    for x in data:
        xn = x.double().numpy(); lls = []
        for j in sk_cols:
            c0, w0 = time.process_time(), time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter('ignore', ConvergenceWarning)
                gm = GaussianMixture(a.k, random_state=a.seed).fit(xn[:, [j]])
            sk_cpu += time.process_time() - c0; sk_wall += time.perf_counter() - w0; n_sk += 1
            lls.append(gm.score(xn[:, [j]]))
        ll_sk.append(np.array(lls))

    n_total = D * len(data)
    scale = n_total / n_sk
    sk_cpu_tot, sk_wall_tot = sk_cpu * scale, sk_wall * scale
    o = np.concatenate([l[sk_cols] for l in ll_ours]); s = np.concatenate(ll_sk)
    print()
    print(f"{'':34s}{'ours (batched torch)':>22s}{'scikit-learn loop':>22s}")
    print(f"{'features fitted':34s}{n_total:>22d}{n_sk:>22d}")
    lab = ' (extrapolated x%.1f)' % scale if a.quick else ''
    print(f"{'CPU time, all features [s]':34s}{ours_cpu:>22.2f}{sk_cpu_tot:>22.2f}{lab}")
    print(f"{'wall time, all features [s]':34s}{ours_wall:>22.2f}{sk_wall_tot:>22.2f}{lab}")
    print(f"{'per feature, CPU [ms]':34s}{1000 * ours_cpu / n_total:>22.2f}{1000 * sk_cpu / n_sk:>22.2f}")
    print(f"{'mean per-feature LL (same cols)':34s}{o.mean():>22.5f}{s.mean():>22.5f}")
    if a.quick: print(f"{'mean per-feature LL (all ours)':34s}{np.concatenate(ll_ours).mean():>22.5f}")
    rel = (o.mean() - s.mean()) / abs(s.mean())
    print()
    print(f"speed-up (CPU time): {sk_cpu_tot / ours_cpu:.1f}x   (wall: {sk_wall_tot / ours_wall:.1f}x)" + ('   [scikit-learn time extrapolated from %d of %d fits]' % (n_sk, n_total) if a.quick else ''))
    print(f"LL difference ours - sklearn: {o.mean() - s.mean():+.5f} nats/sample/feature ({100 * rel:+.3f} % of |sklearn|); "
          f"median per-feature difference {np.median(o - s):+.5f}; features where ours is worse by > 0.01: {int((o < s - 0.01).sum())} of {len(o)}, better by > 0.01: {int((o > s + 0.01).sum())}")
    print(f"goal >= 20x faster: {'met' if sk_cpu_tot / ours_cpu >= 20 else 'NOT met'}; goal LL no worse than sklearn by > 0.5 %: {'met' if rel >= -0.005 else 'NOT met'}")


if __name__ == '__main__':
    main()

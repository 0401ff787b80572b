"""Counterfactuals per second at 64 px on the CPU: batched optimisation vs one image at a time, measured side by side.

Uses the model zoo (spruce_nb/zoo/cxr64) and the same pivots for every batch size; PTI is excluded (it is timed in
bench_inversion.py), so this measures the latent optimisation that `Spruce.explain` runs per batch.

    OMP_NUM_THREADS=1 python bench/bench_counterfactual.py [--steps 10] [--batches 1 4 8] [--lpips-net vgg]
"""
import argparse, time
import torch
from spruce_nb.core import seed_everything
from spruce_nb.counterfactual import Spruce, CounterfactualConfig, optimise_latents
from spruce_nb.piece import exceptional_features
from spruce_nb.data import PhantomDataset
from spruce_nb.demo import ZOO_DIR

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--steps', type=int, default=10)
    ap.add_argument('--batches', type=int, nargs='+', default=[1, 4, 8])
    ap.add_argument('--lpips-net', default='vgg')
    a = ap.parse_args()
    seed_everything(0)
    sp = Spruce.from_dir(ZOO_DIR / 'cxr64', use_pti=False, config=CounterfactualConfig(steps=a.steps, lpips_net=a.lpips_net))
    nmax = max(a.batches)
    ds = PhantomDataset('cxr', n=8 * nmax, size=64, classes=('normal', 'cardiomegaly'), split='test')
    x = torch.stack([ds[i][0] for i in range(len(ds)) if ds.labels[i] == 1][:nmax])
    inv = sp.invert(x)
    tgt = torch.zeros(nmax, dtype=torch.long)
    with torch.no_grad(): xt = exceptional_features(sp.classifier.features(x), tgt, sp.gmms, weight=sp.classifier.head).x_cf
    cfg = sp.config
    print(f'T = {a.steps} steps, LPIPS {a.lpips_net}, torch threads {torch.get_num_threads()}, {nmax} images')
    per_image = {}
    for b in a.batches:
        t0 = time.perf_counter()
        for i in range(0, nmax, b):
            sl = slice(i, i + b)
            optimise_latents(inv.render, sp.classifier, x[sl], inv.ws_pivot[sl], xt[sl], tgt[sl], cfg, show_progress=False)
        per_image[b] = (time.perf_counter() - t0) / nmax
    base = per_image[a.batches[0]]
    print(f"{'batch':>6} {'s / counterfactual':>20} {'counterfactuals / s':>20} {'speed-up vs batch ' + str(a.batches[0]):>22}")
    for b, s in per_image.items(): print(f'{b:>6} {s:>20.2f} {1 / s:>20.3f} {base / s:>22.2f}x')

if __name__ == '__main__': main()

"""Phantom generation speed: the vectorised generator vs a naive per-image loop (same renderer, one image at a time).

Run: OMP_NUM_THREADS=1 python bench/bench_phantoms.py [--n 10000] [--size 64] [--naive-n 500]
The naive loop is timed on --naive-n images and scaled to n; both produce byte-identical images (checked).
"""
import argparse, time
import torch
from spruce_nb.data import PHANTOM_CLASSES, make_phantoms, phantom_modalities, phantom_seeds, _render, _MODELS

def naive(mod, n, size):
    "Reference: render one image per call (what a straightforward per-image implementation does)."
    m, cl = _MODELS[mod], len(PHANTOM_CLASSES[mod])
    seeds, cls = phantom_seeds(n, 0), torch.arange(n) % cl
    return torch.cat([_render(m, seeds[i:i + 1], cls[i:i + 1], size)['images'] for i in range(n)])

if __name__ == '__main__':
    ap = argparse.ArgumentParser()
    ap.add_argument('--n', type=int, default=10000); ap.add_argument('--size', type=int, default=64)
    ap.add_argument('--naive-n', type=int, default=500); ap.add_argument('--threads', type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f'{a.n} images at {a.size}px, {a.threads} thread(s); naive loop timed on {a.naive_n} images and scaled')
    print(f"{'modality':11s} {'ours (s)':>9s} {'naive (s)':>10s} {'speed-up':>9s} {'ours img/s':>11s} {'ours CPU s':>11s}  (wall clock; CPU s is less sensitive to a busy machine)")
    for mod in phantom_modalities():     # 'mri-anatomy' only where nilearn is installed
        cl = PHANTOM_CLASSES[mod]
        t = time.perf_counter(); make_phantoms(mod, 1, a.size)     # warm-up: one-off costs (the MNI template for mri-anatomy)
        if time.perf_counter() - t > 0.5: print(f'{mod}: first call (one-off preparation) {time.perf_counter() - t:.2f} s')
        t, c = time.perf_counter(), time.process_time(); b = make_phantoms(mod, a.n, a.size, 0, cl)
        ours, cpu = time.perf_counter() - t, time.process_time() - c
        t = time.perf_counter(); ref = naive(mod, a.naive_n, a.size); nv = (time.perf_counter() - t) * a.n / a.naive_n
        same = torch.equal(((b.images[:a.naive_n, 0] + 1) * 127.5).round().to(torch.uint8), ref)
        print(f'{mod:11s} {ours:9.2f} {nv:10.2f} {nv / ours:8.1f}x {a.n / ours:11.0f} {cpu:11.2f}' + ('' if same else '  MISMATCH'))

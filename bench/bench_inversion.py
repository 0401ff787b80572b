"""Benchmark: GAN inversion (e4e + PTI) on the CPU at 64 px, seconds per image.

Ours, measured in the same run, side by side:
  * e4e inversion: one batched forward pass;
  * PTI 'sequential' = the reference scheme (danielroich/PTI single_id_coach: a copy of G per image, torch Adam, one image at a time);
  * PTI 'batched'    = ours (stacked synthesis-parameter copies, functional_call + vmap, element-wise Adam);
  * PTI 'multi-id'   = the reference's multi_id_coach scheme (one shared G, each image one Adam step per epoch) — timed only:
    it returns one generator for all images, not one per image, so it is not what SPRUCE needs.
Early stopping is disabled here so that every mode runs the same number of steps.

    OMP_NUM_THREADS=1 python bench/bench_inversion.py                # tiny untrained G (timing only)
    OMP_NUM_THREADS=1 python bench/bench_inversion.py --real         # zoo G + encoder: also reconstruction / locality table
"""
import argparse, copy, os, sys, time
from pathlib import Path

import torch
import torch.nn.functional as F

from spruce_nb.core import seed_everything
from spruce_nb.stylegan2 import tiny_config, load_generator
from spruce_nb.data import make_phantoms
from spruce_nb.e4e import E4EConfig, build_encoder, load_encoder, invert, synthesize, reconstruction_metrics
from spruce_nb import pti


def multi_id(G, images, ws, cfg, lp):
    "The reference multi_id_coach scheme: one tuned copy of G shared by all images; `steps` epochs of one Adam step per image."
    Gt = copy.deepcopy(G).eval().requires_grad_(False)
    for p in Gt.synthesis.parameters(): p.requires_grad_(True)
    opt = torch.optim.Adam(Gt.synthesis.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(cfg.steps):
        for i in range(len(images)):
            img = Gt.synthesis(ws[i:i + 1], noise_mode='const')
            loss = cfg.lambda_l2 * F.mse_loss(img, images[i:i + 1]) + cfg.lambda_lpips * lp(img, images[i:i + 1])[0]
            if cfg.locality:
                w_r = pti.locality_codes(G, ws[i], torch.randn(1, G.z_dim, generator=gen), cfg.alpha, cfg.locality_psi)
                with torch.no_grad(): old = G.synthesis(w_r, noise_mode='none')
                new = Gt.synthesis(w_r, noise_mode='none')
                loss = loss + cfg.locality_l2 * F.mse_loss(new, old) + cfg.locality_lpips * lp(old, new).mean()
            opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    return Gt


def timed(f):
    t = time.perf_counter(); out = f(); return out, time.perf_counter() - t


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('--n', type=int, default=4, help='images')
    ap.add_argument('--steps', type=int, default=20, help='PTI steps per image (reference: 350, with early stop)')
    ap.add_argument('--real', action='store_true', help='use the zoo generator and encoder; also print reconstruction and locality')
    ap.add_argument('--zoo', default=os.environ.get('SPRUCE_ZOO', '/work/scratch/zoo'))
    ap.add_argument('--no-multi-id', action='store_true')
    ap.add_argument('--real-steps', type=int, default=350, help='--real: PTI step budget for the reconstruction table (reference 350)')
    ap.add_argument('--threshold', type=float, default=0.06, help='--real: early-stop LPIPS (reference 0.06; 0 = off, see nbs/08_pti §8)')
    a = ap.parse_args(argv)
    torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    seed_everything(0)
    zoo = Path(a.zoo)
    if a.real:
        epath = zoo / 'e4e_cxr64' / 'encoder.pt'
        gpath = epath.parent / 'generator.pt'              # the generator the encoder was trained for
        if not gpath.exists(): gpath = zoo / 'gan_cxr64' / 'G_ema.pt'
        if not (gpath.exists() and epath.exists()): sys.exit(f'--real needs {gpath} and {epath} (see nbs/05_stylegan2 and nbs/07_e4e).')
        G = load_generator(gpath, device='cpu'); E = load_encoder(epath, G=G, device='cpu')
        what = f'zoo generator {gpath} + encoder {epath}'
    else:
        G = tiny_config(64).make_generator().eval().requires_grad_(False)
        E = build_encoder(G, E4EConfig(widths=(16, 32, 64, 128), units=(1, 2, 2, 1), fpn_channels=64)).eval()
        what = 'tiny untrained generator (z=w=64, channel_max 32) + untrained encoder: timing only'
    x = make_phantoms('cxr', a.n, size=G.img_resolution, split='test', classes=('normal', 'cardiomegaly')).images
    print(f'# {what}; {a.n} held-out test phantoms at {G.img_resolution} px; PTI {a.steps} steps, early stop off; '
          f'torch {torch.__version__}, {torch.get_num_threads()} thread(s)')
    cfg = pti.PTIConfig(steps=a.steps, lpips_threshold=-1.0)
    lp = pti._lpips(cfg.lpips_net, 'cpu')
    lp(x[:1], x[:1])                                                    # warm-up (builds the LPIPS module)
    ws, t_e4e = timed(lambda: invert(E, x))
    res_s, t_seq = timed(lambda: pti.pivotal_tuning(G, x, ws_pivot=ws, cfg=cfg.replace(batched=False)))
    res_b, t_bat = timed(lambda: pti.pivotal_tuning(G, x, ws_pivot=ws, cfg=cfg.replace(batched=True, chunk=a.n)))
    diff = (res_b.reconstructions() - res_s.reconstructions()).abs().max().item()
    n = a.n
    rows = [('e4e inversion (batched forward)', t_e4e / n, None),
            ('PTI sequential (reference scheme)', t_seq / n, None),
            ('PTI batched (ours, vmap)', t_bat / n, t_seq / t_bat)]
    if not a.no_multi_id:
        _, t_mid = timed(lambda: multi_id(G, x, ws, cfg, lp))
        rows.append(('PTI multi-id (reference; ONE shared G)', t_mid / n, t_seq / t_mid))
    print(f"{'':42s} {'s/image':>9s} {'speed-up vs sequential':>24s}")
    for name, s, r in rows: print(f'{name:42s} {s:9.3f} {"" if r is None else f"{r:.2f}x":>24s}')
    print(f'{"e4e + PTI sequential":42s} {(t_e4e + t_seq) / n:9.3f}')
    print(f'{"e4e + PTI batched":42s} {(t_e4e + t_bat) / n:9.3f} {f"{(t_e4e + t_seq) / (t_e4e + t_bat):.2f}x":>24s}')
    print(f'max |batched - sequential| reconstruction difference: {diff:.2e}')
    print(f'per step and image: sequential {t_seq / n / a.steps * 1e3:.0f} ms, batched {t_bat / n / a.steps * 1e3:.0f} ms '
          f'(reference anchor: ~10 min/image on CPU at 1024 px, PTI#25)')
    if a.real:
        cfg_r = pti.PTIConfig(steps=a.real_steps, lpips_threshold=a.threshold)   # reference: 350 steps, early stop at LPIPS 0.06
        res, t = timed(lambda: pti.pivotal_tuning(G, x, ws_pivot=ws, cfg=cfg_r))
        avg = synthesize(G, G.mapping.w_avg[None, None].repeat(n, G.num_ws, 1))
        tab = {'w_avg image': reconstruction_metrics(avg, x), 'e4e': reconstruction_metrics(synthesize(G, ws), x),
               'e4e + PTI': reconstruction_metrics(res.reconstructions(), x)}
        print(f'\n# reconstruction of {n} held-out test phantoms (MSE on [0,1], LPIPS-VGG{"" if pti_lpips_real() else " with a RANDOM trunk"}); '
              f'PTI {a.real_steps} steps max, threshold {a.threshold}, locality on: {t / n:.1f} s/image, steps used {res.steps.tolist()}')
        for k, m in tab.items(): print(f"{k:14s} MSE {m['mse']:.3e} ± {m['mse_std']:.1e}   LPIPS {m['lpips']:.4f} ± {m['lpips_std']:.4f}")
        loc = pti.locality_change(res, n=16)
        res0 = pti.pivotal_tuning(G, x, ws_pivot=ws, cfg=cfg_r.replace(locality=False))
        loc0 = pti.locality_change(res0, n=16)
        print(f"locality (16 random z, LPIPS G vs G*_i, mean over images): with regulariser {loc['random_lpips'].mean():.4f}, "
              f"without {loc0['random_lpips'].mean():.4f}; change at the pivot {loc['pivot_lpips'].mean():.4f}; "
              f"recon LPIPS without regulariser {reconstruction_metrics(res0.reconstructions(), x)['lpips']:.4f}")


def pti_lpips_real():
    from spruce_nb.perceptual import lpips_pretrained
    return lpips_pretrained('vgg')


if __name__ == '__main__':
    main()

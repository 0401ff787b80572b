"""StyleGAN2 speed on this machine: training seconds per kimg (tiny config, 64 px, CPU) and generator images/s,
next to the NVlabs reference networks (stylegan2-ada-pytorch, its pure-PyTorch `ref` ops on CPU, force_fp32=True as NVlabs advises for CPU) measured in the same run.

    OMP_NUM_THREADS=1 python bench/bench_stylegan2.py [--res 64] [--steps 6] [--nvlabs PATH/TO/stylegan2-ada-pytorch]

Without --nvlabs (or $NVLABS_SG2ADA) only our numbers are printed. With it, the same weights are loaded into both
implementations (identical parameter names), outputs are compared, and ours/reference ratios are printed.
"""
import argparse, os, sys, time, math
import torch
from torch.utils.data import TensorDataset

from spruce_nb import stylegan2 as sg


def timeit(fn, n=3, warmup=1):
    for _ in range(warmup): fn()
    t = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t) / n


def load_nvlabs(path, cfg):
    sys.path.insert(0, path)
    from training.networks import Generator as NVG, Discriminator as NVD
    G = NVG(cfg.z_dim, 0, cfg.w_dim, cfg.resolution, 3, mapping_kwargs=dict(num_layers=cfg.map),
            synthesis_kwargs=dict(channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=cfg.num_fp16_res, conv_clamp=cfg.conv_clamp))
    D = NVD(0, cfg.resolution, 3, channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=cfg.num_fp16_res,
            conv_clamp=cfg.conv_clamp, epilogue_kwargs=dict(mbstd_group_size=cfg.mbstd))
    return G, D


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--res', type=int, default=64)
    ap.add_argument('--steps', type=int, default=6, help='training steps timed (after one warm-up step)')
    ap.add_argument('--batch', type=int, default=16)
    ap.add_argument('--nvlabs', default=os.environ.get('NVLABS_SG2ADA'))
    a = ap.parse_args()
    torch.manual_seed(0)
    print(f'torch {torch.__version__}, threads {torch.get_num_threads()}, device cpu')
    cfg = sg.tiny_config(a.res, batch=a.batch)

    # 1. training: seconds per kimg of the full step (Gmain, lazy Greg, Dmain, lazy R1, EMA), amortised over the lazy intervals
    ds = TensorDataset(torch.rand(a.batch * 2, 3, a.res, a.res) * 2 - 1, torch.zeros(a.batch * 2))
    tr = sg.make_trainer(cfg, ds, None, kimg=(a.steps + 1) * a.batch / 1000, metric_kimg=0, device='cpu')
    os.environ.setdefault('SPRUCE_PROGRESS', '0')
    step, t = tr.step_fn, []
    orig = tr.step_fn
    def timed(trainer, batch):
        s = time.perf_counter(); out = orig(trainer, batch); t.append(time.perf_counter() - s); return out
    tr.step_fn = timed
    tr.fit()
    per_step = sum(t[1:]) / max(len(t) - 1, 1)
    print(f'\n[train] tiny @ {a.res}px, batch {a.batch}: {per_step:.2f} s/step -> {per_step * 1000 / a.batch:.1f} s/kimg '
          f'(steps timed: {len(t) - 1}; step 0 includes R1 and path length, the mix over 16 steps is 4 pl + 1 R1)')

    # 2. inference: images/s for G (eval, fused modconv, noise const) and G+D forward/backward (what a training phase costs)
    G, D = cfg.make_generator().eval(), cfg.make_discriminator()
    z = torch.randn(a.batch, cfg.z_dim)
    with torch.no_grad():
        g_s = timeit(lambda: G(z, noise_mode='const'))
    G.train()
    gd_s = timeit(lambda: D(G(z)).sum().backward(), n=2)
    ours = dict(gen=a.batch / g_s, gd=gd_s)
    print(f'[infer] G images/s (batch {a.batch}): ours {ours["gen"]:.1f}')
    print(f'[fwd+bwd] G->D forward+backward, batch {a.batch}: ours {gd_s:.3f} s')

    if not a.nvlabs:
        print('\nreference: NVlabs code not given (--nvlabs DIR or $NVLABS_SG2ADA); ratios skipped.')
        return
    nG, nD = load_nvlabs(a.nvlabs, cfg)
    G.load_state_dict(nG.state_dict(), strict=True); D.load_state_dict(nD.state_dict(), strict=True)
    nG.eval(); G.eval()
    with torch.no_grad():
        diff = (G(z, noise_mode='const') - nG(z, None, noise_mode='const', force_fp32=True)).abs().max().item()
        x = torch.rand(a.batch, 3, a.res, a.res) * 2 - 1
        ddiff = (D(x) - nD(x, None, force_fp32=True)).abs().max().item()
        n_s = timeit(lambda: nG(z, None, noise_mode='const', force_fp32=True))
    nG.train()
    ngd_s = timeit(lambda: nD(nG(z, None, force_fp32=True), None, force_fp32=True).sum().backward(), n=2)
    print(f'\nsame weights: max |G_ours - G_nvlabs| = {diff:.2e}, max |D_ours - D_nvlabs| = {ddiff:.2e}')
    print(f'{"":28s}{"ours":>10s}{"NVlabs":>10s}{"ours/ref":>10s}')
    print(f'{"G images/s (eval)":28s}{ours["gen"]:10.1f}{a.batch / n_s:10.1f}{ours["gen"] / (a.batch / n_s):10.2f}')
    print(f'{"G->D fwd+bwd s (train)":28s}{gd_s:10.3f}{ngd_s:10.3f}{gd_s / ngd_s:10.2f}')


if __name__ == '__main__':
    main()

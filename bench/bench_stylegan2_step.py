"""One StyleGAN2 training iteration, ours vs NVlabs: losses, per-phase gradients, parameters after each Adam step, G_ema.

    OMP_NUM_THREADS=1 python bench/bench_stylegan2_step.py --nvlabs PATH/TO/stylegan2-ada-pytorch [--res 32] [--iters 17]

Ours: `make_trainer(tiny_config(...))` and its `StyleGAN2Step` called directly on a fixed real batch.
Reference: NVlabs `training/loss.py` StyleGAN2Loss driven by the phase logic of `training/training_loop.py`
(Gmain, Greg every `pl_interval` with gain = interval, Dmain, Dreg every `r1_interval` with gain = interval,
Adam lr·c and β^c with c = k/(k+1), nan_to_num, G_ema with ema_kimg/ema_rampup; no augment pipe), copied here
line by line because the NVlabs loop itself needs a dataset/launcher. Both start from the same weights (identical
parameter names). Every random draw ours makes (z, style-mixing cutoff and coin, mixing z, per-layer noise,
path-length noise) is recorded and replayed to the reference in its own call order, keyed by (function, shape).

By default the reference is re-synchronised to ours (G, D, G_ema, Adam moments/step, pl_mean) before every
iteration, so each iteration is compared from an identical state. --free lets both run on their own; --control EPS
adds a second copy of ours started from weights x(1 + EPS·N(0,1)), which shows that float32-sized differences grow
to ~lr-sized parameter differences within one Adam step (β1 = 0) in free-running GAN training anyway.

Prints, for each iteration and phase, the loss values side by side and max |Δgrad| (absolute, and relative to the
largest gradient of that tensor), then max |Δparam| of G, D and G_ema after the iteration, and pl_mean / w_avg.
Without --nvlabs (or $NVLABS_SG2ADA) it says so and exits 0.
"""
import argparse, copy, os, sys
from collections import defaultdict
import torch

from spruce_nb import stylegan2 as sg

_orig = dict(randn=torch.randn, randn_like=torch.randn_like, rand=torch.rand, randint=torch.randint, random_=torch.Tensor.random_)


def _shape(args, kwargs):
    s = kwargs.get('size', args[0] if args else ())
    if isinstance(s, (list, tuple)) and len(args) <= 1: return tuple(int(v) for v in s)
    if isinstance(s, torch.Size): return tuple(s)
    return tuple(int(v) for v in args)


class RNGTape:
    "Record every torch.randn/randn_like/rand/randint draw (mode 'record'), or replay them by (kind, shape) ('replay')."
    def __init__(self, mixing_prob: float = 0.9): self.log, self.mixing_prob, self.coin = defaultdict(list), mixing_prob, 0.0

    def __enter__(self): return self
    def __exit__(self, *a):
        torch.randn, torch.randn_like, torch.rand, torch.randint = _orig['randn'], _orig['randn_like'], _orig['rand'], _orig['randint']
        torch.Tensor.random_ = _orig['random_']

    def record(self):
        log = self.log
        def randn(*a, **k):
            out = _orig['randn'](*a, **k); log[('randn', tuple(out.shape))].append(out.clone()); return out
        def randn_like(t, **k):
            out = _orig['randn_like'](t, **k); log[('randn_like', tuple(out.shape))].append(out.clone()); return out
        def rand(*a, **k):
            out = _orig['rand'](*a, **k); log[('rand', tuple(out.shape))].append(out.clone()); return out
        def randint(*a, **k):
            out = _orig['randint'](*a, **k); log[('int', tuple(out.shape))].append(out.clone()); return out
        torch.randn, torch.randn_like, torch.rand, torch.randint = randn, randn_like, rand, randint
        return self

    def take(self, key):
        if not self.log.get(key): raise RuntimeError(f'reference asked for a random draw {key} that ours never made')
        return self.log[key].pop(0)

    def replay(self):
        def randn(*a, **k):
            return self.take(('randn', _shape(a, k))).to(k.get('device') or 'cpu')
        def randn_like(t, **k):
            if t.ndim == 2 and self.coin >= self.mixing_prob:   # NVlabs draws the mixing z even when the coin says 'no mixing'
                self.coin = 0.0; return _orig['randn_like'](t, **k)   # (its values are then unused); ours skips the draw
            return self.take(('randn_like', tuple(t.shape))).to(t.device, t.dtype)
        def rand(*a, **k):
            out = self.take(('rand', _shape(a, k))).to(k.get('device') or 'cpu')
            self.coin = float(out); return out
        def random_(t, *a, **k):
            return t.fill_(self.take(('int', tuple(t.shape))).item())
        def randint(*a, **k):
            return self.take(('int', tuple(k.get('size', a[-1]))))
        torch.randn, torch.randn_like, torch.rand, torch.randint = randn, randn_like, rand, randint
        torch.Tensor.random_ = random_
        return self

    def leftover(self): return {k: len(v) for k, v in self.log.items() if v}


def load_nvlabs(path, cfg):
    sys.path.insert(0, path)
    from training.networks import Generator as NVG, Discriminator as NVD
    from training import loss as nvloss
    # fp16 is CUDA-only in ours; the NVlabs blocks would cast to fp16 even on CPU, so run the reference in fp32 (same conv_clamp).
    G = NVG(cfg.z_dim, 0, cfg.w_dim, cfg.resolution, 3, mapping_kwargs=dict(num_layers=cfg.map),
            synthesis_kwargs=dict(channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=0, conv_clamp=cfg.conv_clamp))
    D = NVD(0, cfg.resolution, 3, channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=0,
            conv_clamp=cfg.conv_clamp, epilogue_kwargs=dict(mbstd_group_size=cfg.mbstd))
    return G, D, nvloss


class NVlabsLoop:
    "The per-batch body of NVlabs `training_loop.py` (phases, lazy-reg Adam, nan_to_num, G_ema) around StyleGAN2Loss."
    def __init__(self, nvloss, G, D, cfg):
        self.G, self.D, self.cfg = G.train().requires_grad_(False), D.train().requires_grad_(False), cfg
        self.G_ema = copy.deepcopy(G).eval()
        self.loss = nvloss.StyleGAN2Loss(torch.device('cpu'), G.mapping, G.synthesis, D, augment_pipe=None,
                                         style_mixing_prob=cfg.style_mixing_prob, r1_gamma=cfg.gamma, pl_batch_shrink=cfg.pl_batch_shrink,
                                         pl_decay=cfg.pl_decay, pl_weight=cfg.pl_weight)
        self.stats = defaultdict(list)
        nvloss.training_stats.report = lambda name, value: self.stats[name].append(value.detach().clone() if torch.is_tensor(value) else value)
        self.phases = []
        for name, module, reg_interval in [('G', G, cfg.pl_interval), ('D', D, cfg.r1_interval)]:
            mb_ratio = reg_interval / (reg_interval + 1)
            opt = torch.optim.Adam(module.parameters(), lr=cfg.lrate * mb_ratio, betas=[b ** mb_ratio for b in cfg.adam_betas], eps=cfg.adam_eps)
            self.phases += [dict(name=name + 'main', module=module, opt=opt, interval=1), dict(name=name + 'reg', module=module, opt=opt, interval=reg_interval)]
        self.batch_idx, self.cur_nimg = 0, 0

    def step(self, real, zs, on_grads):
        "zs: phase name -> z [N, z_dim] (the draws ours made); on_grads(phase, module) is called before each opt.step()."
        N = real.shape[0]
        for ph in self.phases:
            if self.batch_idx % ph['interval'] != 0: continue
            ph['opt'].zero_grad(set_to_none=True)
            ph['module'].requires_grad_(True)
            gen_z = zs.get(ph['name'], torch.zeros(N, self.G.z_dim))
            self.loss.accumulate_gradients(phase=ph['name'], real_img=real, real_c=torch.zeros(N, 0), gen_z=gen_z,
                                           gen_c=torch.zeros(N, 0), sync=True, gain=ph['interval'])
            ph['module'].requires_grad_(False)
            for p in ph['module'].parameters():
                if p.grad is not None: torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            on_grads(ph['name'], ph['module'])
            ph['opt'].step()
        cfg = self.cfg
        ema_nimg = cfg.ema_kimg * 1000
        if cfg.ema_rampup is not None: ema_nimg = min(ema_nimg, self.cur_nimg * cfg.ema_rampup)
        ema_beta = 0.5 ** (N / max(ema_nimg, 1e-8))
        with torch.no_grad():
            for p_ema, p in zip(self.G_ema.parameters(), self.G.parameters()): p_ema.copy_(p.lerp(p_ema, ema_beta))
            for b_ema, b in zip(self.G_ema.buffers(), self.G.buffers()): b_ema.copy_(b)
        self.cur_nimg += N
        self.batch_idx += 1


def grads_of(module):
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def compare(a: dict, b: dict):
    "max abs difference over all tensors, max over tensors of (max abs diff / max abs of the reference), worst tensor."
    if set(a) != set(b): return dict(keys=f'differ: only ours {sorted(set(a) - set(b))[:4]}, only ref {sorted(set(b) - set(a))[:4]}')
    mx, rel, worst = 0.0, 0.0, ''
    for k in a:
        d = (a[k].float() - b[k].float()).abs().max().item() if a[k].numel() else 0.0
        s = b[k].float().abs().max().item() if b[k].numel() else 0.0
        r = d / s if s > 0 else (0.0 if d == 0 else float('inf'))
        mx = max(mx, d)
        if r > rel: rel, worst = r, k
    return dict(abs=mx, rel=rel, worst=worst)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--nvlabs', default=os.environ.get('NVLABS_SG2ADA'), help='path to a stylegan2-ada-pytorch checkout')
    ap.add_argument('--res', type=int, default=32)
    ap.add_argument('--batch', type=int, default=8)
    ap.add_argument('--iters', type=int, default=17, help='iterations (17 covers Greg at 0,4,8,12,16 and Dreg at 0,16)')
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--free', action='store_true', help='let the two runs evolve freely (default: before every iteration the reference gets '
                    "ours' G, D, G_ema, Adam state and pl_mean, so each iteration is compared from an identical state)")
    ap.add_argument('--control', type=float, default=0.0, metavar='EPS',
                    help='with --free: also run a second copy of OURS whose weights are multiplied by (1 + EPS·N(0,1)), to show how fast '
                         'float32-sized differences grow by themselves in free-running GAN training')
    a = ap.parse_args()
    if not a.nvlabs:
        print('reference: NVlabs code not given (--nvlabs DIR or $NVLABS_SG2ADA); nothing to compare.'); return 0
    torch.manual_seed(a.seed)
    cfg = sg.tiny_config(a.res, batch=a.batch)
    from torch.utils.data import TensorDataset
    real = torch.rand(a.batch, 3, a.res, a.res) * 2 - 1
    ds = TensorDataset(real, torch.zeros(a.batch, dtype=torch.long))
    tr = sg.make_trainer(cfg, ds, out_dir=None, kimg=1.0, metric_kimg=0, device='cpu', seed=a.seed)
    G, D = tr.modules['G'], tr.modules['D']
    with torch.no_grad():   # non-trivial noise strengths so their gradients and the noise draws matter
        for n, p in G.named_parameters():
            if 'noise_strength' in n: p.fill_(0.1)
    tr.ema['G'].module.load_state_dict(G.state_dict())
    nG, nD, nvloss = load_nvlabs(a.nvlabs, cfg)
    nG.load_state_dict(G.state_dict()); nD.load_state_dict(D.state_dict())
    ref = NVlabsLoop(nvloss, nG, nD, cfg)
    if a.control:
        tr2 = sg.make_trainer(cfg, ds, out_dir=None, kimg=1.0, metric_kimg=0, device='cpu', seed=a.seed)
        g = torch.Generator().manual_seed(1)
        for src, dst in ((G, tr2.modules['G']), (D, tr2.modules['D'])):
            dst.load_state_dict(src.state_dict())
            with torch.no_grad():
                for p in dst.parameters(): p.mul_(1 + a.control * torch.randn(p.shape, generator=g))
        tr2.ema['G'].module.load_state_dict(tr2.modules['G'].state_dict())
    print(f'config: tiny {a.res} px, batch {a.batch}, z=w={cfg.z_dim}, map {cfg.map}, mbstd {cfg.mbstd}, gamma {cfg.gamma:.4g}, '
          f'pl_interval {cfg.pl_interval}, r1_interval {cfg.r1_interval}, mixing {cfg.style_mixing_prob}, ema {cfg.ema_kimg} kimg rampup {cfg.ema_rampup}, '
          f'{"free-running" if a.free else "reference re-synchronised to ours before every iteration"}')
    print('Adam  ours G', {k: tr.optimizers['G'].defaults[k] for k in ('lr', 'betas')}, ' ref G', {k: ref.phases[0]['opt'].defaults[k] for k in ('lr', 'betas')})
    print('Adam  ours D', {k: tr.optimizers['D'].defaults[k] for k in ('lr', 'betas')}, ' ref D', {k: ref.phases[2]['opt'].defaults[k] for k in ('lr', 'betas')})
    worst = defaultdict(float)
    assert [n for n, _ in G.named_parameters()] == [n for n, _ in nG.named_parameters()]
    assert [n for n, _ in D.named_parameters()] == [n for n, _ in nD.named_parameters()]
    for it in range(a.iters):
        if not a.free:   # identical starting state for this iteration: weights, G_ema, Adam moments/step, pl_mean
            nG.load_state_dict(G.state_dict()); nD.load_state_dict(D.state_dict())
            ref.G_ema.load_state_dict(tr.ema['G'].module.state_dict())
            for ph, name in ((ref.phases[0], 'G'), (ref.phases[2], 'D')):
                hp = [{k: gr[k] for k in ('lr', 'betas', 'eps')} for gr in ph['opt'].param_groups]
                ph['opt'].load_state_dict(copy.deepcopy(tr.optimizers[name].state_dict()))   # (load_state_dict would share the moment tensors)
                for gr, h in zip(ph['opt'].param_groups, hp): gr.update(h)   # keep the reference's own lr/betas
            ref.loss.pl_mean.fill_(tr.state.get('pl_mean', 0.0))
        # --- ours, recording the random draws and the gradients each optimiser step sees
        ours_grads = []
        orig_step = tr.optimizer_step
        def spy(name, _o=orig_step):
            ours_grads.append((name, grads_of(tr.modules[name]))); _o(name)
        tr.optimizer_step = spy
        with RNGTape(cfg.style_mixing_prob) as tape:
            tape.record()
            logs = tr.step_fn(tr, (real, torch.zeros(a.batch, dtype=torch.long)))
        tr.optimizer_step = orig_step
        saved = {k: list(v) for k, v in tape.log.items()}
        # --- reference, replaying them
        N, zd = a.batch, cfg.z_dim
        zs = {'Gmain': tape.log[('randn', (N, zd))][0], 'Dmain': tape.log[('randn', (N, zd))][1]}
        if ('randn', (N // cfg.pl_batch_shrink, zd)) in tape.log:
            zg = tape.log[('randn', (N // cfg.pl_batch_shrink, zd))][0]
            zs['Greg'] = torch.cat([zg, torch.zeros(N - zg.shape[0], zd, dtype=zg.dtype)])
        del tape.log[('randn', (N, zd))]; tape.log.pop(('randn', (N // cfg.pl_batch_shrink, zd)), None)
        ref_grads = []
        ref.stats.clear()
        with tape:
            tape.replay()
            ref.step(real, zs, lambda ph, m: ref_grads.append((ph, grads_of(m))))
        if a.control:
            with RNGTape(cfg.style_mixing_prob) as t2:
                t2.log.update({k: list(v) for k, v in saved.items()})
                t2.replay()
                tr2.step_fn(tr2, (real, torch.zeros(a.batch, dtype=torch.long)))
            cG = compare({n: p.detach() for n, p in tr2.modules['G'].named_parameters()}, {n: p.detach() for n, p in G.named_parameters()})
            cD = compare({n: p.detach() for n, p in tr2.modules['D'].named_parameters()}, {n: p.detach() for n, p in D.named_parameters()})
            for k, v in (('control G', cG), ('control D', cD)): worst[k] = max(worst[k], v['rel'])
            print(f'iter {it:2d} control (ours vs ours x(1+{a.control:g}N)): G params max|Δ| {cG["abs"]:.2e} (rel {cG["rel"]:.1e}), D params {cD["abs"]:.2e} (rel {cD["rel"]:.1e})')
        left = tape.leftover()
        if left: print(f'  !! random draws ours made that the reference did not use: {left}')
        names = [p for p, _ in ref_grads]
        if [n for n, _ in ours_grads] != [p[0] for p in names]:
            print(f'  !! phase sequence differs: ours {[n for n, _ in ours_grads]} ref {names}'); return 1
        st = {k: torch.cat([v.reshape(-1) for v in vs]).float().mean().item() for k, vs in ref.stats.items() if vs and torch.is_tensor(vs[0])}
        loss_pairs = {'Gmain': [('G_loss', 'Loss/G/loss')], 'Greg': [('G_pl_penalty', 'Loss/pl_penalty'), ('pl_mean', None)],
                      'Dmain': [('D_loss', 'Loss/D/loss')], 'Dreg': [('D_r1_penalty', 'Loss/r1_penalty')]}
        for (_, go), (ph, gr) in zip(ours_grads, ref_grads):
            c = compare(go, gr)
            worst[ph] = max(worst[ph], c.get('rel', float('inf')))
            ls = []
            for ko, kr in loss_pairs[ph]:
                rv = float(ref.loss.pl_mean) if kr is None else st.get(kr, float('nan'))
                ls.append(f'{ko} {logs.get(ko, float("nan")):.6g} vs {rv:.6g}')
            print(f'iter {it:2d} {ph:5s}: {"; ".join(ls):60s} grad max|Δ| {c.get("abs", float("nan")):.2e} rel {c.get("rel", float("nan")):.2e} ({c.get("worst", c.get("keys"))})')
        pG = compare({n: p.detach() for n, p in G.named_parameters()}, {n: p.detach() for n, p in nG.named_parameters()})
        pD = compare({n: p.detach() for n, p in D.named_parameters()}, {n: p.detach() for n, p in nD.named_parameters()})
        pE = compare(dict(tr.ema['G'].module.state_dict()), dict(ref.G_ema.state_dict()))
        wa = (G.mapping.w_avg - nG.mapping.w_avg).abs().max().item()
        for k, v in (('G params', pG), ('D params', pD), ('G_ema state', pE)): worst[k] = max(worst[k], v['rel'])
        print(f'iter {it:2d} after : G params max|Δ| {pG["abs"]:.2e} (rel {pG["rel"]:.1e}), D params {pD["abs"]:.2e} (rel {pD["rel"]:.1e}), '
              f'G_ema {pE["abs"]:.2e} (rel {pE["rel"]:.1e}), w_avg {wa:.2e}, pl_mean {tr.state["pl_mean"]:.6g} vs {float(ref.loss.pl_mean):.6g}')
    print('\nworst relative difference over all iterations (max |Δ| / max |ref| per tensor):')
    for k, v in worst.items(): print(f'  {k:12s} {v:.2e}')
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""GPU path check (issue #28): what a GPU user runs, on CUDA, with throughput and peak memory per item.

    python bench/gpu_check.py                                  # CUDA, the thesis' 256-px configuration (< 8 min on one H100)
    python bench/gpu_check.py --device cpu --tiny              # the same code path at 32 px (smoke test, tests/test_gpu_check.py)

Items, each through the library's own public entry points (no training loop of its own):

1. `stylegan2`  `stylegan2.train_stylegan2(paper256_config(256))` with ADA (`augment.AugmentPipe` + `AdaptiveP`, as
   `spruce train-gan --ada`), mixed precision as NVlabs does it: fp16 in the 4 highest-resolution blocks of G and D
   (`num_fp16_res=4`, `conv_clamp=256`; the engine's autocast stays off for GANs by design).
2. `classifier` `classifier.train_classifier(ClassifierConfig())`: ConvNeXt-Base, 256 px, batch 64, AMP 'auto' (bf16/fp16).
3. `trades`     the same with `ClassifierConfig.trades_recipe()` (batch 16, ε = 8/255, 10 PGD steps) → `robust.make_trades_step`.
4. `e4e`        `e4e.train_encoder` for the paper256 generator: IR-SE50 body (e4e's reference widths/units, FPN 512),
   batch 8, LPIPS-Alex + similarity on the ConvNeXt-Base features + latent discriminator, AMP 'auto'; all 14 offsets live
   (`progressive=False`: the steady state after the progressive phase).
5. `explain`    `Spruce.explain` at 256 px with PTI and the library defaults (PTIConfig(), CounterfactualConfig()),
   split into `Spruce.invert` (e4e + PTI) and the latent optimisation.

Every model is RANDOMLY INITIALISED: no pretrained 256-px models exist for this package, so the numbers are speed and
memory only, never quality. Training data are random tensors (the speed of a step does not depend on the pixels).

Timing: a `training.Callback` synchronises CUDA after every step; the first `warmup` steps are not timed, the rest give
s/step (median and mean) and images/s (mean). Peak memory is `torch.cuda.max_memory_allocated`, reset before each item,
so it includes the models, optimisers and warm-up. Each item runs in try/except; `--budget-s` skips the items that
no longer fit and stops a running trainer early (CancelFit) when the budget is spent. Results: a table on stdout and
JSON at `--out` (written atomically).
"""
import argparse, datetime, gc, json, math, os, platform, statistics, subprocess, sys, time, traceback, warnings
from pathlib import Path

import torch

from spruce_nb.core import atomic_write, seed_everything
from spruce_nb.training import Callback, CancelFit

ITEMS = ('classifier', 'trades', 'stylegan2', 'e4e', 'explain')
RANDOM_NOTE = 'random-init models: no pretrained 256-px models exist, so these are speed/memory numbers only, not quality'


# ------------------------------------------------------------------------------------------------ sizes
def sizes(tiny: bool) -> dict:
    "Per-item sizes: the thesis' GPU configuration, or a tiny CPU one with the same code path."
    if tiny:
        return dict(res=32, warmup=1, steps=2, clf_arch='convnext_micro', clf_batch=8, trades_batch=4, trades_steps=2,
                    gan_batch=8, gan_steps=2, e4e_batch=4, explain_n=2, pti_steps=3, cf_steps=3, gmm_n=16, gmm_k=2)
    return dict(res=256, warmup=3, steps=10, clf_arch='convnext_base', clf_batch=64, trades_batch=16, trades_steps=10,
                gan_batch=64, gan_steps=16, e4e_batch=8, explain_n=4, pti_steps=None, cf_steps=None, gmm_n=32, gmm_k=5)


# ------------------------------------------------------------------------------------------------ helpers
def sync(dev):
    if dev.type == 'cuda': torch.cuda.synchronize(dev)

def reset_memory(dev):
    gc.collect()
    if dev.type == 'cuda':
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)

def peak_gib(dev):
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == 'cuda' else None

def random_data(n: int, res: int, seed: int = 0):
    "n random images in [-1, 1] with balanced labels (0, 1) as a TensorDataset."
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, res, res, generator=g) * 2 - 1
    return torch.utils.data.TensorDataset(x, torch.arange(n) % 2)

def last_metrics(history) -> dict:
    "The losses of the last logged step (a NaN here under AMP is a finding, whatever the speed)."
    rec = history[-1] if history else {}
    return {k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and ('loss' in k or k in ('step', 'l2', 'lpips'))}

class StepTimer(Callback):
    "Synchronise after every step; time the steps after `warmup`; stop the run (CancelFit) past `deadline`."
    order = 1000
    def __init__(self, warmup: int, device, deadline: float):
        self.warmup, self.device, self.deadline = warmup, device, deadline
        self.times, self.last, self.out_of_time = [], None, False
    def before_fit(self, trainer):
        sync(self.device); self.last = time.perf_counter()
    def after_step(self, trainer):
        sync(self.device); now = time.perf_counter()
        if trainer.step > self.warmup: self.times.append(now - self.last)   # includes the loader's next batch (host → device)
        self.last = now
        if now > self.deadline and trainer.step < trainer.total_steps:
            self.out_of_time = True
            raise CancelFit('gpu_check: time budget spent')
    def result(self, batch: int) -> dict:
        t = self.times
        if not t: return dict(steps_timed=0, stopped_by_budget=self.out_of_time)
        mean = sum(t) / len(t)
        return dict(steps_timed=len(t), s_per_step=mean, s_per_step_median=statistics.median(t), images_per_s=batch / mean,
                    stopped_by_budget=self.out_of_time)


# ------------------------------------------------------------------------------------------------ items
def item_classifier(S, dev, deadline, trades=False):
    from spruce_nb.classifier import ClassifierConfig, train_classifier
    from spruce_nb.robust import make_trades_step
    batch = S['trades_batch'] if trades else S['clf_batch']
    kw = dict(arch=S['clf_arch'], image_size=S['res'], batch_size=batch)
    cfg = ClassifierConfig.trades_recipe(8 / 255, trades_steps=S['trades_steps'], **kw) if trades else ClassifierConfig(**kw)
    timer = StepTimer(S['warmup'], dev, deadline)
    _, hist = train_classifier(cfg, random_data(2 * batch, S['res']), max_steps=S['warmup'] + S['steps'], device=dev, callbacks=[timer],
                               make_step=make_trades_step if trades else None)
    from spruce_nb.training import resolve_amp
    amp = resolve_amp('auto' if cfg.amp else 'fp32', dev)
    conf = f"{cfg.arch} {cfg.image_size}px b{batch} amp={str(amp).replace('torch.', '') if amp else 'fp32'}"
    if trades: conf += f" ε=8/255 PGD{cfg.trades_steps}"
    return dict(config=conf, unit='img/s', batch=batch, **timer.result(batch), last=last_metrics(hist))

def gan_config(S):
    from spruce_nb.stylegan2 import paper256_config, tiny_config
    return tiny_config(S['res'], batch=S['gan_batch']) if S['res'] < 256 else paper256_config(S['res'])

def item_stylegan2(S, dev, deadline):
    from spruce_nb.stylegan2 import train_stylegan2
    from spruce_nb.augment import AugmentPipe, AdaptiveP
    cfg = gan_config(S)
    steps = S['warmup'] + S['gan_steps']   # gan_steps = 16 on GPU: one lazy-R1 period (every 16) and 4 path-length steps
    pipe = AugmentPipe(p=0.2)               # ADA 'bgc' at a mid-run p (p = 0 would make every augmentation a no-op)
    timer = StepTimer(S['warmup'], dev, deadline)
    tr = train_stylegan2(cfg, random_data(2 * cfg.batch, cfg.resolution), None, kimg=(steps * cfg.batch - 0.5) / 1000, metric_kimg=0,
                    augment_pipe=pipe, callbacks=[AdaptiveP(pipe, p_init=0.2), timer], device=dev)
    fp16 = 'fp16 blocks on CUDA' if dev.type == 'cuda' and cfg.num_fp16_res else 'fp32 (fp16 blocks are CUDA-only)'
    conf = f"{cfg.name} {cfg.resolution}px b{cfg.batch} ADA p=0.2, num_fp16_res={cfg.num_fp16_res}: {fp16}"
    return dict(config=conf, unit='img/s', batch=cfg.batch, **timer.result(cfg.batch), last=last_metrics(tr.history))

def e4e_config(S, **kw):
    from spruce_nb.e4e import E4EConfig
    if S['res'] < 256: return E4EConfig(resolution=S['res'], batch_size=S['e4e_batch'], progressive=False, **kw)
    return E4EConfig(resolution=S['res'], widths=(64, 128, 256, 512), units=(3, 4, 14, 3), fpn_channels=512,
                     batch_size=S['e4e_batch'], progressive=False, **kw)

def make_classifier(S, dev):
    from spruce_nb.classifier import ClassifierConfig
    return ClassifierConfig(arch=S['clf_arch'], image_size=S['res']).build(pretrained=False).to(dev)

def item_e4e(S, dev, deadline):
    from spruce_nb.e4e import train_encoder, classifier_similarity
    torch.manual_seed(0)
    G = gan_config(S).make_generator().to(dev).eval()
    clf = make_classifier(S, dev)
    steps = S['warmup'] + S['steps']
    cfg = e4e_config(S, max_steps=steps)
    timer = StepTimer(S['warmup'], dev, deadline)
    _, hist = train_encoder(G, random_data(2 * cfg.batch_size, cfg.resolution), cfg, sim_fn=classifier_similarity(clf), device=dev,
                  callbacks=[timer], amp='auto')
    from spruce_nb.training import resolve_amp
    amp = resolve_amp('auto', dev)
    conf = (f"{'IR-SE50' if S['res'] >= 256 else 'IR tiny'} {cfg.resolution}px b{cfg.batch_size} {G.num_ws} ws, LPIPS-{cfg.lpips_net}, "
            f"sim on {S['clf_arch']}, amp={str(amp).replace('torch.', '') if amp else 'fp32'}")
    return dict(config=conf, unit='img/s', batch=cfg.batch_size, **timer.result(cfg.batch_size), last=last_metrics(hist))

def balanced_gmms(clf, S, dev):
    "Feature GMMs for a random-init classifier: shift S's bias so half the images are predicted as each class, then fit."
    from spruce_nb.piece import fit_feature_gmms
    x = random_data(S['gmm_n'], S['res'], seed=1).tensors[0].to(dev)
    with torch.no_grad():
        lg = clf.head(clf.features(x)).float()
        clf.head.bias[1] -= (lg[:, 1] - lg[:, 0]).median()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')   # few samples per class for K components: a speed check, not a fit
        return fit_feature_gmms(clf, x, k=S['gmm_k'])

def item_explain(S, dev, deadline):
    from spruce_nb.counterfactual import Spruce, CounterfactualConfig
    from spruce_nb.pti import PTIConfig
    from spruce_nb.e4e import build_encoder
    torch.manual_seed(0)
    G = gan_config(S).make_generator().to(dev).eval()
    clf = make_classifier(S, dev).eval()
    E = build_encoder(G, e4e_config(S)).to(dev).eval()
    gm = balanced_gmms(clf, S, dev)
    pti = PTIConfig() if S['pti_steps'] is None else PTIConfig(steps=S['pti_steps'])
    cf = CounterfactualConfig() if S['cf_steps'] is None else CounterfactualConfig(steps=S['cf_steps'])
    imgs = random_data(S['explain_n'], S['res'], seed=2).tensors[0]
    # warm-up: one image, 2 PTI steps, 2 optimisation steps (LPIPS networks built, kernels chosen)
    Spruce(clf, G, E, gm, config=cf.replace(steps=2), pti_config=pti.replace(steps=2), device=dev).explain(imgs[:1], show_progress=False)
    sp = Spruce(clf, G, E, gm, config=cf, pti_config=pti, device=dev)
    sync(dev); t0 = time.perf_counter()
    inv = sp.invert(imgs)
    sync(dev); t1 = time.perf_counter()
    sp.explain(imgs, inversion=inv, show_progress=False)
    sync(dev); t2 = time.perf_counter()
    n = len(imgs)
    conf = f"{S['res']}px N={n}, PTI {pti.steps} steps (LPIPS-{pti.lpips_net}), T={cf.steps} (LPIPS-{cf.lpips_net})"
    return dict(config=conf, unit='s/image', batch=n, steps_timed=1, s_per_image=(t2 - t0) / n, images_per_s=n / (t2 - t0),
                invert_s=t1 - t0, optimise_s=t2 - t1, pti_steps=pti.steps, cf_steps=cf.steps)

RUNNERS = dict(classifier=item_classifier, trades=lambda S, d, t: item_classifier(S, d, t, trades=True),
               stylegan2=item_stylegan2, e4e=item_e4e, explain=item_explain)


# ------------------------------------------------------------------------------------------------ report
def environment(dev) -> dict:
    env = dict(torch=torch.__version__, python=platform.python_version(), device=str(dev),
               date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
    if dev.type == 'cuda':
        p = torch.cuda.get_device_properties(dev)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   bf16=torch.cuda.is_bf16_supported())
    else: env.update(threads=torch.get_num_threads())
    try: env['commit'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                                        cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except Exception: env['commit'] = None
    try:
        from spruce_nb.perceptual import lpips_info
        env['lpips_pretrained_trunk'] = {n: bool(lpips_info(n).get('pretrained_trunk')) for n in ('vgg', 'alex')}
    except Exception as e: env['lpips_pretrained_trunk'] = f'unknown ({type(e).__name__})'
    return env

def fmt(v, spec):
    return '-' if v is None else format(v, spec)

def table(rows) -> str:
    head = f"{'item':<11} {'status':<8} {'s/step':>8} {'img/s':>8} {'s/image':>8} {'peak GiB':>9} {'elapsed s':>9}  config"
    out = [head, '-' * len(head)]
    for r in rows:
        out.append(f"{r['item']:<11} {r['status']:<8} {fmt(r.get('s_per_step'), '8.3f'):>8} {fmt(r.get('images_per_s'), '8.1f'):>8} "
                   f"{fmt(r.get('s_per_image'), '8.2f'):>8} {fmt(r.get('peak_mem_gib'), '9.2f'):>9} {fmt(r.get('elapsed_s'), '9.1f'):>9}  "
                   f"{r.get('config') or r.get('error') or r.get('reason', '')}")
    return '\n'.join(out)

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--device', default='cuda', help="'cuda' (default) or 'cpu' (with --tiny for the smoke test)")
    ap.add_argument('--tiny', action='store_true', help='32-px sizes and 1+2 steps per trainer: the same code path, for CPU smoke tests')
    ap.add_argument('--only', nargs='+', choices=ITEMS, default=list(ITEMS), help='items to run (default: all, in this order)')
    ap.add_argument('--budget-s', type=float, default=360.0, help='wall-clock budget in s: items that no longer fit are skipped, a running trainer stops (default 360)')
    ap.add_argument('--min-item-s', type=float, default=None, help='skip an item when less than this is left (default 25 s; 0 with --tiny)')
    ap.add_argument('--out', default='bench_out/gpu_check.json', help='JSON results (written atomically)')
    args = ap.parse_args(argv)
    os.environ.setdefault('SPRUCE_PROGRESS', '0')   # no progress bars between the table lines
    t_start = time.perf_counter()
    dev = torch.device(args.device)
    if dev.type == 'cuda' and not torch.cuda.is_available():
        print('gpu_check: --device cuda but torch sees no CUDA device; run with --device cpu --tiny for the CPU smoke test.', file=sys.stderr)
        return 2
    if dev.type == 'cuda' and dev.index is None: dev = torch.device('cuda', torch.cuda.current_device())
    S = sizes(args.tiny)
    min_item = args.min_item_s if args.min_item_s is not None else (0.0 if args.tiny else 25.0)
    deadline = t_start + args.budget_s
    env = environment(dev)
    print(f"gpu_check on {env.get('gpu', env['device'])} (torch {env['torch']}{', tiny' if args.tiny else ''}); budget {args.budget_s:.0f} s")
    print(f"NOTE: {RANDOM_NOTE}.")
    rows = []
    for name in args.only:
        left = deadline - time.perf_counter()
        if left < min_item:
            rows.append(dict(item=name, status='skipped', reason=f'time budget: {left:.0f} s left < {min_item:.0f} s'))
            print(f"[{name}] skipped: {left:.0f} s of the budget left", flush=True); continue
        reset_memory(dev); seed_everything(0)
        t0 = time.perf_counter()
        try:
            r = dict(item=name, status='ok', **RUNNERS[name](S, dev, deadline))
            if r.get('stopped_by_budget'): r['status'] = 'partial'
            if any(not math.isfinite(v) for v in r.get('last', {}).values()): r['status'] = 'nan-loss'
        except Exception as e:
            r = dict(item=name, status='failed', error=f'{type(e).__name__}: {e}'[:500], traceback=traceback.format_exc()[-4000:])
            print(f"[{name}] FAILED: {r['error']}", file=sys.stderr)
        r.update(elapsed_s=time.perf_counter() - t0, peak_mem_gib=peak_gib(dev))
        rows.append(r)
        print(f"[{name}] {r['status']} in {r['elapsed_s']:.1f} s: " + ', '.join(
            f'{k}={v:.4g}' if isinstance(v, float) else f'{k}={v}' for k, v in r.items()
            if k not in ('item', 'status', 'traceback', 'elapsed_s', 'config')), flush=True)
        reset_memory(dev)
    total = time.perf_counter() - t_start
    print('\n' + table(rows))
    print(f"\ntotal {total:.1f} s; {RANDOM_NOTE}.")
    res = dict(tool='bench/gpu_check.py', tiny=args.tiny, budget_s=args.budget_s, total_s=total, note=RANDOM_NOTE, environment=env,
               sizes=S, items=rows)
    with atomic_write(args.out, overwrite=True, mode='w') as f: json.dump(res, f, indent=1, default=str)
    print(f'wrote {args.out}')
    return 0 if all(r['status'] in ('ok', 'partial', 'skipped') for r in rows) else 1

if __name__ == '__main__':
    sys.exit(main())

"""ACE's DDPM and ACE's mask, measured: the numbers and figure of nbs/16_ace.ipynb (rerun to reproduce them).

    OMP_NUM_THREADS=1 python bench/ace_experiments.py samples  [--n 256]  # DDPM vs StyleGAN: FID/KID to real phantoms, same features, same n
    OMP_NUM_THREADS=1 python bench/ace_experiments.py ablation [--n 16] [--split val] [--steps 50 100]  # ACE with vs without inpainting on the same pre-explanations, a sweep of the mask's threshold and dilation, and (several --steps) the attack's length

Both add their block to nbs/data/ace_experiments.json (atomically); `samples` also writes nbs/images/ace_samples.png.
"""
import sys, json, time, argparse, dataclasses
from pathlib import Path
import torch
from spruce_nb.core import atomic_write, seed_everything, dump_json
from spruce_nb.demo import ZOO_DIR
from spruce_nb.data import dataset_from_spec, phantom_counterfactuals
from spruce_nb.ace import ACE, ACEConfig, load_ddpm, pre_explanation, ace_mask, inpaint
from spruce_nb.metrics import edit_metrics, get_extractor

TASK = 'phantoms:cxr:cardiomegaly-vs-normal'

def _update(path, key, block):
    p = Path(path)
    d = json.loads(p.read_text()) if p.exists() else {}
    d[key] = block
    with atomic_write(p, overwrite=True, mode='w') as f: dump_json(d, f, indent=1)

def _ci(v):
    v = torch.as_tensor(v, dtype=torch.float64)
    return dict(mean=float(v.mean()), ci95=float(1.96 * v.std() / len(v) ** 0.5) if len(v) > 1 else None, n=len(v))

def samples(a):
    from spruce_nb.stylegan2 import load_generator, generate_images
    zoo = Path(a.model_dir)
    ddpm, G = load_ddpm(zoo / 'ddpm.pt'), load_generator(zoo / 'generator.pt')
    real_ds = dataset_from_spec(TASK, split='test', size=64)
    real = torch.stack([real_ds[i][0] for i in torch.randperm(len(real_ds), generator=torch.Generator().manual_seed(1))[:a.n].tolist()])
    t0 = time.time()
    dd = ddpm.sample(a.n, steps=a.steps[0], generator=torch.Generator().manual_seed(0))
    t_ddpm = time.time() - t0
    t0 = time.time(); gg = generate_images(G, a.n, seed=0); t_gan = time.time() - t0
    out = dict(command='python bench/ace_experiments.py samples ' + ' '.join(sys.argv[2:]), n=a.n, ddpm_steps=a.steps[0], real=f'{TASK} test split, {a.n} images (both classes)',
               seconds=dict(ddpm=round(t_ddpm, 1), stylegan=round(t_gan, 1)))
    for name in ('inception', 'effnet'):
        e = get_extractor(name)
        fr = e(real)
        out[name] = dict(extractor=e.name, ddpm=e.set_metrics(e(dd), fr), stylegan=e.set_metrics(e(gg), fr))
    _update(a.out, 'samples', out)
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    fig, axs = plt.subplots(3, 8, figsize=(10, 4.1))
    for r, (imgs, name) in enumerate(((real, 'real phantoms'), (dd, f'DDPM ({a.steps[0]} steps)'), (gg, 'StyleGAN2'))):
        for c in range(8):
            axs[r, c].imshow(imgs[c, 0], cmap='gray', vmin=-1, vmax=1); axs[r, c].axis('off')
        axs[r, 0].set_title(name, fontsize=9, loc='left')
    fig.tight_layout()
    with atomic_write(a.figure, overwrite=True) as f: fig.savefig(f, format='png', dpi=90)
    print(json.dumps(out, indent=1))

def ablation(a):
    from spruce_nb.classifier import load_classifier
    zoo = Path(a.model_dir)
    ace = ACE(load_classifier(zoo / a.classifier), load_ddpm(zoo / 'ddpm.pt'), ACEConfig(steps=max(a.steps)))
    ds = dataset_from_spec(TASK, split=a.split, size=64)
    src, tgt = 'cardiomegaly', 'normal'
    ci = ace.classes.index(src)
    idx = [i for i in range(len(ds)) if int(ds[i][1]) == ci][:a.n]
    x = torch.stack([ds[i][0] for i in idx])
    seed_everything(0)
    target = torch.full((len(x),), ace.classes.index(tgt))
    # the attack runs to each of a.steps in turn, continuing from the previous pre-explanation (the same iterates as one run
    # of max(a.steps)); the inpainting draws from its own generator, so it does not shift the attack's noise
    t_pre, done, pe, per_steps = 0.0, 0, None, []
    for s in sorted(set(a.steps)):
        t0 = time.time()
        pre = pre_explanation(ace.ddpm, ace.classifier, x, target, dataclasses.replace(ace.config, steps=s - done), show_progress=True, start=pe)
        t_pre += time.time() - t0
        pe, done = pre['pe'], s
        _, kp = ace_mask(x, pe, ace.config)
        with torch.no_grad(): cf_s = inpaint(ace.ddpm, x, pe, kp, ace.config, generator=torch.Generator().manual_seed(1))
        per_steps.append((s, pe, pre['probs'][-1][:, target[0]], cf_s))
    pre, keep = dict(pe=pe), kp                  # the mask of the longest attack, as computed in the loop
    t0 = time.time()
    with torch.no_grad(): cf = inpaint(ace.ddpm, x, pe, keep, ace.config)   # the global generator, as before --steps took several lengths
    t_inp = time.time() - t0
    gt = phantom_counterfactuals(ds.modality, ds.seeds[idx], src, tgt, size=64, markers=ds.markers[idx])
    out = dict(command='python bench/ace_experiments.py ablation ' + ' '.join(sys.argv[2:]), n=len(x), split=a.split, classifier=a.classifier, steps=max(a.steps),
               seconds_per_image=dict(pre_explanation=round(t_pre / len(x), 2), inpainting=round(t_inp / len(x), 2)),
               mask_fraction=_ci((~keep).float().flatten(1).mean(1)))
    def scores(img):
        with torch.no_grad(): p = ace.classifier(img).softmax(-1)[:, ace.classes.index(tgt)]
        m = edit_metrics(img, x, gt['images'], gt['counterfactuals'], gt['masks'])
        return dict(flip=(p > 0.5).float(), confidence=p, l1=(img - x).abs().flatten(1).mean(1) / 2, **m)
    if len(per_steps) > 1:     # the attack's length: flips of the pre-explanation, of its filtered image and of the inpainted counterfactual
        out['by_steps'] = [dict(steps=st, pre_explanation_flip=_ci(scores(pe_s)['flip']), filtered_flip=_ci((pf > 0.5).float()),   # the classifier on the filtered last iterate
                                **{f'inpainted_{k}': _ci(v) for k, v in scores(cf_s).items() if k in ('flip', 'confidence', 'in_mask', 'edit_cos', 'l1')})
                           for st, pe_s, pf, cf_s in per_steps]
        for r in out['by_steps']:
            print(f"{r['steps']} steps: pre-explanation flip {r['pre_explanation_flip']['mean']:.3f}, filtered {r['filtered_flip']['mean']:.3f}, "
                  f"inpainted {r['inpainted_flip']['mean']:.3f} (in-mask {r['inpainted_in_mask']['mean']:.3f})", flush=True)
    base = scores(pre['pe'])
    for name, s in (('pre_explanation', base), ('inpainted', scores(cf))):
        out[name] = {k: _ci(v) for k, v in s.items()}
    # the mask's threshold and dilation: does a tighter mask localise the edit (paired with the same pre-explanations)?
    sweep = []
    for thr in a.thresholds:
        for dil in a.dilations:
            cfg = dataclasses.replace(ace.config, inpaint=thr, dilation=dil)
            _, kp = ace_mask(x, pre['pe'], cfg)
            seed_everything(1)
            with torch.no_grad(): s = scores(inpaint(ace.ddpm, x, pre['pe'], kp, cfg))
            sweep.append(dict(inpaint=thr, dilation=dil, mask_fraction=_ci((~kp).float().flatten(1).mean(1)),
                              **{k: _ci(s[k]) for k in ('flip', 'in_mask', 'edit_cos', 'l1')},
                              in_mask_gain=_ci(s['in_mask'] - base['in_mask'])))
            print(f"inpaint {thr} dilation {dil}: mask {sweep[-1]['mask_fraction']['mean']:.2f} flip {sweep[-1]['flip']['mean']:.2f} "
                  f"in-mask {sweep[-1]['in_mask']['mean']:.3f} (gain {sweep[-1]['in_mask_gain']['mean']:+.3f} ± {sweep[-1]['in_mask_gain']['ci95']:.3f})", flush=True)
    out['mask_sweep'] = sweep
    _update(a.out, f'ablation_{Path(a.classifier).stem}' + ('' if a.split == 'test' else f'_{a.split}') + ('' if max(a.steps) == 50 else f'_steps{max(a.steps)}'), out)
    print(json.dumps(out, indent=1))
    import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt
    rows = [(x, 'original'), (pre['pe'], 'pre-explanation'), ((~keep).float() * 2 - 1, 'mask'), (cf, 'ACE counterfactual'), (gt['counterfactuals'], 'true counterfactual')]
    cols = min(6, len(x))
    fig, axs = plt.subplots(len(rows), cols, figsize=(1.25 * cols, 6.6), squeeze=False)
    for r, (imgs, name) in enumerate(rows):
        for c in range(cols):
            axs[r, c].imshow(imgs[c, 0].cpu(), cmap='gray', vmin=-1, vmax=1); axs[r, c].axis('off')
        axs[r, 0].set_title(name, fontsize=9, loc='left')
    fig.tight_layout()
    if a.split != 'test' or max(a.steps) != ACEConfig().steps: return               # the notebook's figure: the test images, ACE's default length
    with atomic_write(a.figure.replace('ace_samples', 'ace_steps'), overwrite=True) as f: fig.savefig(f, format='png', dpi=90)

if __name__ == '__main__':
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument('what', choices=['samples', 'ablation'])
    ap.add_argument('--model-dir', default=str(ZOO_DIR / 'cxr64'))
    ap.add_argument('--n', type=int, default=None, help='images (samples: 256, ablation: 16)')
    ap.add_argument('--steps', type=int, nargs='+', default=[50], help='samples: respaced sampling steps (50); ablation: attack steps (50; several: the attack continues from one to the next and each is scored)')
    ap.add_argument('--classifier', default='classifier.pt')
    ap.add_argument('--split', default='test', choices=['val', 'test'], help="ablation: phantom split ('val' to choose settings, 'test' to report them)")
    ap.add_argument('--thresholds', type=float, nargs='+', default=[0.15, 0.3, 0.5], help='ablation: mask thresholds to sweep (ACE: 0.15)')
    ap.add_argument('--dilations', type=int, nargs='+', default=[1, 5], help='ablation: mask dilations to sweep (ours: 5; ACE: 15 at 128-256 px)')
    ap.add_argument('--out', default='nbs/data/ace_experiments.json')
    ap.add_argument('--figure', default='nbs/images/ace_samples.png')
    a = ap.parse_args()
    a.n = a.n or (256 if a.what == 'samples' else 16)
    torch.set_num_threads(1)
    (samples if a.what == 'samples' else ablation)(a)

"""Does each λ term of the SPRUCE objective do its job? Switch each off, and turn each up, on the model zoo.

    OMP_NUM_THREADS=1 python tools/lambda_terms.py --n 8 --steps 50 --out nbs/data/lambda_terms.json

For N correctly classified held-out cardiomegaly phantoms (one shared e4e inversion, no PTI, so every setting starts
from the same pivot) it explains them towards 'normal' under each setting and records what each term should control:
|G(w) − I| (λ_image), LPIPS(G(w), I) (λ_perc), ‖w − w_p‖₁ (λ_latent), plus flip ratio, p(normal) and the share of the
edit inside the phantom's causal mask. It also records the size of each weighted term at the pivot, which says
which term dominates the objective at the thesis' λs. Writes a JSON that nbs/10_counterfactual.ipynb tabulates.
"""
import argparse, json, time
from pathlib import Path

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--model-dir', default=None, help='model directory (default: the package zoo cxr64)')
    p.add_argument('--n', type=int, default=8, help='images')
    p.add_argument('--steps', type=int, default=50, help='optimisation steps T')
    p.add_argument('--lpips-net', default='vgg')
    p.add_argument('--out', required=True, help='JSON file to write')
    p.add_argument('--overwrite', action='store_true')
    a = p.parse_args(argv)
    from spruce_nb.core import seed_everything, atomic_write
    from spruce_nb.counterfactual import Spruce, CounterfactualConfig, spruce_loss_terms
    from spruce_nb.data import dataset_from_spec, phantom_counterfactuals
    from spruce_nb.evaluate import select_correctly_classified, _items
    from spruce_nb.metrics import edit_metrics, l1_per_pixel
    from spruce_nb.perceptual import lpips_distance, lpips_info
    from spruce_nb.demo import ZOO_DIR
    out = Path(a.out)
    if out.exists() and not a.overwrite: raise FileExistsError(f"{out} exists; pass --overwrite to replace it.")
    md = Path(a.model_dir) if a.model_dir else ZOO_DIR / 'cxr64'
    seed_everything(0)
    base = CounterfactualConfig(steps=a.steps, lpips_net=a.lpips_net)
    sp = Spruce.from_dir(md, use_pti=False, config=base)
    ds = dataset_from_spec('phantoms:cxr:cardiomegaly-vs-normal', split='test', size=sp.resolution, seed=0)
    idx = select_correctly_classified(sp.classifier, ds, 'cardiomegaly', a.n, seed=0)['indices']
    x = _items(ds, idx)
    gt = phantom_counterfactuals(ds.modality, ds.seeds[idx], 'cardiomegaly', 'normal', size=ds.size, markers=ds.markers[idx])
    inv = sp.invert(x)
    lp = lambda u, v: lpips_distance(u, v, net=a.lpips_net)
    thesis = dict(lambda_perc=base.lambda_perc, lambda_latent=base.lambda_latent, lambda_image=base.lambda_image)
    settings = [('thesis λs', {}), ('λ_image = 0', dict(lambda_image=0.)), ('λ_perc = 0', dict(lambda_perc=0.)),
                ('λ_latent = 0', dict(lambda_latent=0.)), ('all λ = 0 (feature term only)', dict(lambda_image=0., lambda_perc=0., lambda_latent=0.)),
                ('λ_image × 10³', dict(lambda_image=base.lambda_image * 1e3)), ('λ_image × 10⁴', dict(lambda_image=base.lambda_image * 1e4)),
                ('λ_perc × 10⁴', dict(lambda_perc=base.lambda_perc * 1e4)),
                ('λ_latent × 10²', dict(lambda_latent=base.lambda_latent * 1e2)), ('λ_latent × 10³', dict(lambda_latent=base.lambda_latent * 1e3))]
    # what does not depend on the setting, once: PIECE's target features x' and the terms at the pivot (shared inversion)
    from spruce_nb.piece import exceptional_features
    xd = x.to(sp.device)
    with torch.no_grad():
        tgt = torch.full((len(x),), sp.classes.index('normal'), device=sp.device)
        xt = exceptional_features(sp.classifier.features(xd), tgt, sp.gmms, weight=sp.classifier.head, t=base.threshold).x_cf
        rec0 = inv.render(inv.ws_pivot).clamp(-1, 1)
        terms0 = spruce_loss_terms(rec0, sp.classifier.features(rec0), xt, xd, inv.ws_pivot, inv.ws_pivot, lpips_fn=lp)
    rows = []
    for name, over in settings:
        t0 = time.time()
        sp.base_config = base.replace(**over)
        seed_everything(0)
        ex = sp.explain(x, target='normal', inversion=inv, show_progress=False)
        cf, rec = ex.counterfactual, ex.reconstruction
        em = edit_metrics(cf, rec, gt['images'], gt['counterfactuals'], gt['masks'])
        with torch.no_grad():
            terms = spruce_loss_terms(cf.to(sp.device), sp.classifier.features(cf.to(sp.device)), xt, xd, ex.ws.to(sp.device),
                                      ex.ws_pivot.to(sp.device), lpips_fn=lp)
        c = sp.config  # the λs actually used (scaled to this resolution and latent size)
        w = dict(piece=1., perc=c.lambda_perc, latent=c.lambda_latent, image=c.lambda_image)
        rows.append(dict(setting=name, overrides=over, lambdas_used={k: getattr(c, k) for k in thesis},
                         flip_ratio=float(ex.flipped.float().mean()), p_target=float(ex.confidence.mean()),
                         l1_cf_rec=float(l1_per_pixel(rec, cf).mean()), l1_cf_orig=float(l1_per_pixel(x, cf).mean()),
                         lpips_cf_orig=float(lp(cf, x).mean()), latent_l1=float((ex.ws - ex.ws_pivot).abs().flatten(1).sum(1).mean()),
                         in_mask=float(em['in_mask'].mean()), edit_cos=float(em['edit_cos'].mean()),
                         weighted_terms_at_pivot={k: float(w[k] * terms0[k].mean()) for k in w},
                         weighted_terms_at_end={k: float(w[k] * terms[k].mean()) for k in w}, seconds=round(time.time() - t0, 1)))
        print(json.dumps({k: v for k, v in rows[-1].items() if k not in ('overrides',)}), flush=True)
    res = dict(command='OMP_NUM_THREADS=1 python tools/lambda_terms.py ' + ' '.join(argv if argv is not None else __import__('sys').argv[1:]),
               model_dir=str(md), n=len(x), steps=a.steps, use_pti=False, lpips=lpips_info(a.lpips_net), thesis_lambdas=thesis, rows=rows)
    with atomic_write(out, overwrite=a.overwrite, mode='w') as f: json.dump(res, f, indent=1)
    print(f'wrote {out}')


if __name__ == '__main__':
    main()

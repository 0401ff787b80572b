"""Does PTI's reference early stop (LPIPS-Alex <= 0.07, danielroich/PTI configs/hyperparameters.py) suit 64-px phantoms?

    OMP_NUM_THREADS=2 python tools/pti_early_stop.py      (needs `spruce weights install`; about 2 minutes)

Tunes the zoo generator on 8 held-out cardiomegaly phantoms (100 steps, lr 1e-3, as the demo) with the reference stop, without
a stop, and with the previous default (LPIPS-VGG, no stop), and prints steps used, final LPIPS and reconstruction MSE/LPIPS-Alex.
"""
import torch, time
from spruce_nb.stylegan2 import load_generator
from spruce_nb.e4e import load_encoder, invert, synthesize, reconstruction_metrics
from spruce_nb.pti import pivotal_tuning, PTIConfig
from spruce_nb.data import make_phantoms
from spruce_nb.perceptual import lpips_pretrained
assert lpips_pretrained('alex'), 'run `spruce weights install` first: the stop is on the published LPIPS scale'
G = load_generator('spruce_nb/zoo/cxr64/generator.pt', device='cpu'); E = load_encoder('spruce_nb/zoo/cxr64/encoder.pt', G=G, device='cpu')
x = make_phantoms('cxr', 8, size=64, split='test', classes=('cardiomegaly',)).images
rec0 = synthesize(G, invert(E, x)); print('e4e', {k: round(v,4) for k, v in reconstruction_metrics(rec0, x, 'alex').items()})
for name, cfg in [('alex thr 0.07 (reference)', PTIConfig(steps=100, lr=1e-3, lpips_threshold=0.07)), ('alex no stop', PTIConfig(steps=100, lr=1e-3, lpips_threshold=0)),
                  ('vgg no stop (old default)', PTIConfig(steps=100, lr=1e-3, lpips_net='vgg', lpips_threshold=0))]:
    t = time.time(); r = pivotal_tuning(G, x, encoder=E, cfg=cfg)
    with torch.no_grad(): rec = r.reconstructions()
    print(name, 'steps', r.steps.tolist(), 'final lpips', [round(float(v), 3) for v in r.lpips], f'{time.time()-t:.0f}s')
    if rec is not None: print('   recon', {k: round(v, 4) for k, v in reconstruction_metrics(rec, x, 'alex').items()})

"""Training throughput (images/s) of the plain and the TRADES step on the same Trainer, side by side, and TRADES' cost ratio.

Fixed tiny ConvNeXt (`convnext_micro`, 0.27 M parameters) on 64-px cardiomegaly-vs-normal phantoms, CPU by default.
TRADES with 10 inner PGD steps costs about 11 forward+backward passes per image more or less (10 attack steps of
forward+input-backward, plus clean and adversarial forwards/backwards), so the expected ratio is ~11x; much worse is a bug.

    OMP_NUM_THREADS=1 python bench/bench_classifier.py [--steps 20] [--batch-size 64] [--device cpu]
"""
import argparse, os, time
os.environ.setdefault('SPRUCE_PROGRESS', '0')
import torch
from spruce_nb.core import seed_everything
from spruce_nb.data import dataset_from_spec
from spruce_nb.classifier import ClassifierConfig, BatchAugment, make_criterion, make_classifier_step
from spruce_nb.robust import make_trades_step
from spruce_nb.training import Trainer


def throughput(cfg, ds, step_factory, steps, warmup, device):
    "Images per second of `steps` optimisation steps after `warmup` untimed ones (one Trainer per measurement)."
    seed_everything(0)
    clf = cfg.build()
    opt = torch.optim.AdamW(clf.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    crit = make_criterion(cfg)
    step = step_factory(cfg, crit, BatchAugment.from_config(cfg))
    times = []
    def timed(trainer, batch):
        if trainer.device.type == 'cuda': torch.cuda.synchronize()
        t = time.perf_counter(); out = step(trainer, batch)
        if trainer.device.type == 'cuda': torch.cuda.synchronize()
        times.append(time.perf_counter() - t); return out
    Trainer({'model': clf}, {'model': opt}, timed, ds, cfg.batch_size, warmup + steps, None, device=device, log_every=10 ** 9,
            amp='auto' if cfg.amp else 'fp32').fit()
    t = sum(times[warmup:])
    return cfg.batch_size * steps / t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--steps', type=int, default=10); p.add_argument('--warmup', type=int, default=2)
    p.add_argument('--batch-size', type=int, default=64); p.add_argument('--device', default='cpu')
    p.add_argument('--arch', default='convnext_micro'); p.add_argument('--size', type=int, default=64)
    a = p.parse_args()
    if a.device == 'cpu': torch.set_num_threads(int(os.environ.get('OMP_NUM_THREADS', '1')))
    ds = dataset_from_spec('phantoms:cxr', split='train', n=a.batch_size * (a.steps + a.warmup), size=a.size)
    base = ClassifierConfig.phantom_preset(arch=a.arch, image_size=a.size, batch_size=a.batch_size, classes=ds.classes)
    plain = throughput(base, ds, lambda cfg, crit, aug: make_classifier_step(crit, aug, cfg.num_classes), a.steps, a.warmup, a.device)
    tcfg = base.replace(trades_eps=8 / 255, trades_steps=10, trades_beta=6.0)
    trades = throughput(tcfg, ds, make_trades_step, a.steps, a.warmup, a.device)
    print(f"device {a.device}, {a.arch} at {a.size}px, batch {a.batch_size}, {a.steps} timed steps, torch threads {torch.get_num_threads()}")
    print(f"{'loop':<28}{'images/s':>12}")
    print(f"{'plain (CE + augment)':<28}{plain:>12.1f}")
    print(f"{'TRADES (10 PGD steps)':<28}{trades:>12.1f}")
    print(f"TRADES cost relative to plain: {plain / trades:.2f}x (expected about 11x for 10 inner steps)")


if __name__ == '__main__':
    main()

"""spruce_nb.robust: PGD, the TRADES loss against an independent re-derivation of the reference, TRADES on the Trainer, bad input."""
import copy
import pytest, torch
import torch.nn as nn
import torch.nn.functional as F
from spruce_nb.classifier import Classifier, ClassifierConfig, train_classifier, save_classifier
from spruce_nb.robust import (pgd_attack, trades_loss, trades_perturb, eps_to_pm1, robust_accuracy, input_gradients,
                              mask_energy_fraction, make_trades_step)
from spruce_nb.data import dataset_from_spec
from spruce_nb.cli import main


class OnUnit(nn.Module):
    "The classifier seen on [0, 1] images, as the reference code expects."
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, u): return self.m(2 * u - 1)


def reference_trades(g, u, y, step_size, epsilon, steps, beta):
    """yaodongyu/TRADES `trades_loss` (l_inf branch) on [0, 1] images, re-derived: eval-mode sign ascent of
    KL_sum(softmax g(u) || softmax g(u')) from u + 0.001 N(0, I) (CPU RNG), projection to the ball and [0, 1];
    then, in train mode, CE(g(u), y) + beta * KL_sum(...) / B with the clean target not detached (g(u) forwarded twice)."""
    g.eval()
    adv = u.detach() + 0.001 * torch.randn(u.shape).to(u.dtype)
    for _ in range(steps):
        adv = adv.detach().requires_grad_(True)
        target = torch.softmax(g(u), 1)                                   # recomputed each step, as the reference
        div = (target * (torch.log(target) - torch.log_softmax(g(adv), 1))).sum()
        grad, = torch.autograd.grad(div, adv)
        adv = adv.detach() + step_size * grad.sign()
        adv = torch.max(torch.min(adv, u + epsilon), u - epsilon).clamp(0, 1)
    g.train()
    adv = adv.clamp(0, 1)
    nat = F.cross_entropy(g(u), y)
    p = torch.softmax(g(u), 1)                                            # second clean forward, not detached
    rob = (p * (torch.log(p) - torch.log_softmax(g(adv), 1))).sum() / len(u)
    return nat + beta * rob, adv


@pytest.mark.parametrize('arch', ['convnext_micro', 'resnet10t'])
def test_trades_loss_matches_reference(arch):
    torch.manual_seed(0)
    net = Classifier(arch, 3, image_size=32).double().train()
    twin = copy.deepcopy(net)              # same weights and BatchNorm buffers: our forwards update the running stats
    x = torch.rand(6, 3, 32, 32, dtype=torch.float64) * 2 - 1
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    eps, alpha, steps, beta = 8 / 255, 2 / 255, 4, 6.0
    torch.manual_seed(123)
    ours, parts = trades_loss(net, x, y, eps=eps, alpha=alpha, steps=steps, beta=beta, return_parts=True)
    g_ours = torch.autograd.grad(ours, list(net.parameters()), allow_unused=True)
    assert net.training
    torch.manual_seed(123)
    ref, adv_u = reference_trades(OnUnit(twin), (x + 1) / 2, y, alpha, eps, steps, beta)
    g_ref = torch.autograd.grad(ref, list(twin.parameters()), allow_unused=True)
    torch.testing.assert_close(ours, ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(parts['x_adv'], adv_u * 2 - 1, atol=1e-10, rtol=0)
    assert (parts['x_adv'] - x).abs().max() <= 2 * eps + 1e-12
    for a, b in zip(g_ours, g_ref):
        if a is None: assert b is None
        else: torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7)
    assert parts['robust'] > 0


def test_trades_defaults_are_the_thesis():
    import inspect
    sig = inspect.signature(trades_loss).parameters
    assert sig['beta'].default == 6.0 and sig['steps'].default == 10 and abs(sig['eps'].default - 8 / 255) < 1e-12
    assert sig['alpha'].default is None                                    # None = eps / 4
    cfg = ClassifierConfig.trades_recipe()
    assert (cfg.lr, cfg.batch_size, cfg.trades_beta, cfg.trades_steps) == (1e-4, 16, 6.0, 10)


def test_pgd_attack_properties():
    torch.manual_seed(0)
    m = Classifier('convnext_micro', 2, image_size=32).train()
    x = torch.rand(8, 3, 32, 32) * 2 - 1; x[:, :, :4] = 1.0                 # some pixels at the range edge
    y = torch.arange(8) % 2
    xa = pgd_attack(m, x, y, eps=4 / 255, steps=5)
    assert (xa - x).abs().max() <= 8 / 255 + 1e-6 and xa.min() >= -1 and xa.max() <= 1
    assert m.training and all(p.grad is None for p in m.parameters())
    m.eval()
    assert F.cross_entropy(m(xa), y) > F.cross_entropy(m(x), y)
    xt = pgd_attack(m, x, 1 - y, eps=4 / 255, steps=5, targeted=True)
    assert F.cross_entropy(m(xt), 1 - y) < F.cross_entropy(m(x), 1 - y)
    assert torch.equal(pgd_attack(m, x, y, steps=0, random_start=False), x)


@pytest.mark.parametrize('bad', [0, -1 / 255, 8, 255, float('nan')])
def test_eps_outside_unit_interval_is_rejected(bad):
    m = Classifier('convnext_micro', 2, image_size=32)
    x, y = torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.long)
    with pytest.raises(ValueError, match=r'\(0, 1\]'): pgd_attack(m, x, y, eps=bad)
    with pytest.raises(ValueError, match=r'\(0, 1\]'): trades_loss(m, x, y, eps=bad)
    with pytest.raises(ValueError, match=r'\(0, 1\]'): ClassifierConfig(trades_eps=bad) if bad == bad and bad != 0 else eps_to_pm1(bad)


def test_trades_trains_on_the_shared_trainer(tmp_path):
    tr = dataset_from_spec('phantoms:cxr', split='train', n=32, size=32)
    cfg = ClassifierConfig.trades_recipe(8 / 255, arch='convnext_micro', image_size=32, classes=tr.classes, epochs=1, trades_steps=2)
    with pytest.raises(ValueError, match='make_trades_step'): train_classifier(cfg, tr, None, tmp_path / 'plain', max_steps=2)   # never a silent plain run
    assert not (tmp_path / 'plain').exists()
    clf, hist = train_classifier(cfg, tr, None, tmp_path / 'run', max_steps=2, make_step=make_trades_step)
    assert {'loss', 'natural', 'robust', 'acc'} <= set(hist[-1])
    assert (tmp_path / 'run' / 'last.pt').exists()
    with pytest.raises(ValueError, match='trades_eps'): make_trades_step(cfg.replace(trades_eps=0.0))


def test_robust_eval_saliency_and_cli(tmp_path):
    torch.manual_seed(0)
    clf = Classifier('convnext_micro', 2, classes=['normal', 'cardiomegaly'], image_size=32).eval()
    x = torch.rand(6, 3, 32, 32) * 2 - 1; y = torch.arange(6) % 2
    r = robust_accuracy(clf, (x, y), eps=8 / 255, steps=3)
    assert r['n'] == 6 and 0 <= r['pgd_acc'] <= r['clean_acc'] + 1e-9 and r['eps_255'] == 8
    g = input_gradients(clf, x, y)
    assert g.shape == x.shape and g.abs().sum() > 0
    full, none = torch.ones(6, 32, 32, dtype=torch.bool), torch.zeros(6, 32, 32, dtype=torch.bool)
    torch.testing.assert_close(mask_energy_fraction(g, full), torch.ones(6)); torch.testing.assert_close(mask_energy_fraction(g, none), torch.zeros(6))
    with pytest.raises(ValueError, match='labels must be in'): robust_accuracy(clf, (x, y + 2), steps=1)
    save_classifier(clf, tmp_path / 'c.pt')
    assert main(['evaluate-robustness', '--ckpt', str(tmp_path / 'c.pt'), '--n', '4', '--steps', '2']) == 0
    assert main(['evaluate-robustness', '--ckpt', str(tmp_path / 'c.pt'), '--n', '4', '--eps', '0']) == 2

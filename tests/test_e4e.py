"""e4e: encoder contract (offsets, stages, sizes), latent pool, training on the Trainer (progressive schedule, exact resume), save/load identity, batched invert, CLI, bad input."""
import json
import pytest
import torch
from torch.utils.data import TensorDataset

from spruce_nb import e4e
from spruce_nb.core import seed_everything
from spruce_nb.stylegan2 import tiny_config, export_generator
from spruce_nb.cli import main

SMALL = dict(widths=(8, 16, 16, 32), units=(1, 1, 1, 1), fpn_channels=16)


@pytest.fixture(scope='module')
def G():
    seed_everything(0)
    return tiny_config(32).make_generator().eval().requires_grad_(False)


def _ds(n=16, res=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, 3, res, res, generator=g) * 2 - 1, torch.zeros(n, dtype=torch.long))


def _cfg(**kw):
    return e4e.E4EConfig(**{**dict(resolution=32, batch_size=4, lambda_sim=0.0, d_reg_every=2), **SMALL, **kw})


def test_encoder_codes_offsets_and_stages(G):
    E = e4e.build_encoder(G, _cfg())
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    ws, d = E(x, return_deltas=True)
    assert ws.shape == (3, G.num_ws, G.w_dim) and torch.equal(d[:, 0], torch.zeros_like(d[:, 0]))
    assert torch.allclose(ws - d, (ws - d)[:, :1].expand_as(ws))              # ws = w·1 + Δ
    assert torch.allclose(E.latent_avg, G.mapping.w_avg)
    for s in (0, 3):
        E.progressive_stage = s
        ws, d = E(x, return_deltas=True)
        assert d[:, s + 1:].abs().max() == 0 and (s == 0 or d[:, 1:s + 1].abs().min() > 0)
        ws.sum().backward()
        live = [i for i, b in enumerate(E.styles) if b.linear.weight.grad is not None and b.linear.weight.grad.abs().sum() > 0]
        assert live == list(range(s + 1))
        E.zero_grad(set_to_none=True)


@pytest.mark.parametrize('R', [16, 64, 128])
def test_any_generator_resolution_and_wrong_size(R):
    num_ws = 2 * R.bit_length() - 4
    E = e4e.Encoder4Editing(e4e.E4EConfig(resolution=R, **SMALL), num_ws, 8)
    assert E(torch.zeros(2, 3, R, R)).shape == (2, num_ws, 8)
    with pytest.raises(ValueError, match='spatial size'): E(torch.zeros(2, 3, R // 2, R // 2))
    with pytest.raises(ValueError, match=r'\[-1, 1\]'): E(torch.full((2, 3, R, R), 3.0))


def test_bad_configs(G):
    with pytest.raises(ValueError, match='>= 16'): e4e.E4EConfig(resolution=8)
    with pytest.raises(ValueError, match='resolution'): e4e.build_encoder(G, e4e.E4EConfig(resolution=64))
    with pytest.raises(ValueError, match='unknown option'): e4e.E4EConfig.from_dict({'lambda_idd': 1})
    with pytest.raises(ValueError, match='feature network'): e4e.E4EStep(G, e4e.E4EConfig(resolution=32))
    with pytest.raises(ValueError, match="'ir' or a timm ResNet"): e4e.Encoder4Editing(e4e.E4EConfig(backbone='vit_tiny'), 10, 8)


def test_latent_pool():
    pool = e4e.LatentCodesPool(3, seed=0)
    a = torch.randn(3, 4)
    assert torch.equal(pool.query(a), a)
    b = torch.randn(400, 4)
    frac = (pool.query(b) != b).any(1).float().mean().item()                 # full pool: ~half are swapped for stored codes
    assert 0.35 < frac < 0.65
    fake = torch.randn(5, 3, 4)                       # [B, k, w_dim]: one live layer per sample
    q = e4e.LatentCodesPool(10, seed=0).query(fake)
    assert q.shape == (5, 4) and all(any(torch.equal(q[i], fake[i, j]) for j in range(3)) for i in range(5))


def test_training_progressive_schedule_and_logs(G):
    cfg = _cfg(max_steps=8, progressive_start=2, progressive_step_every=1)
    E, hist = e4e.train_encoder(G, _ds(), cfg, log_every=1, device='cpu')
    stages = [h['stage'] for h in hist]
    assert stages == [0, 0, 1, 2, 3, 4, 5, 6]                  # one more Δ_i per step after 2 W-only steps
    assert hist[1]['delta_1'] == 0 and hist[2]['delta_1'] > 0 and hist[2]['delta_2'] == 0
    assert 'd_r1' in hist[0] and 'd_r1' not in hist[1] and 'adv' in hist[0] and 'delta_reg' not in hist[0] and 'delta_reg' in hist[2]
    assert E.progressive_stage == 6 and not E.training


def test_exact_resume(G, tmp_path):
    cfg = _cfg(max_steps=6, progressive_start=1, progressive_step_every=1, w_pool_size=2)
    E_full, _ = e4e.train_encoder(G, _ds(), cfg, out_dir=tmp_path / 'a', device='cpu')
    from spruce_nb.training import Callback, CancelFit
    class Stop(Callback):
        def after_step(self, trainer):
            if trainer.step == 3: raise CancelFit('interrupted')
    tr = e4e.make_encoder_trainer(G, _ds(), cfg, tmp_path / 'b', device='cpu', callbacks=[Stop()])
    tr.fit()
    assert tr.step == 3
    tr2 = e4e.make_encoder_trainer(G, _ds(), cfg, tmp_path / 'b', device='cpu')
    tr2.fit(resume=True)
    a, b = E_full.state_dict(), tr2.unwrap('encoder').state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_save_load_identity_and_batched_invert(G, tmp_path):
    E = e4e.build_encoder(G, _cfg()).eval()
    E.progressive_stage = 4
    e4e.save_encoder(E, tmp_path / 'enc.pt', G=G)
    E2 = e4e.load_encoder(tmp_path / 'enc.pt', G=G)
    assert E2.progressive_stage == 4
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    ws = e4e.invert(E2, x, batch_size=2)
    assert torch.allclose(ws, torch.cat([E(x[i:i + 1]) for i in range(5)]), atol=1e-5)
    assert e4e.invert(E2, x[:0]).shape == (0, G.num_ws, G.w_dim)
    other = tiny_config(32).make_generator()
    with pytest.raises(ValueError, match='another generator'): e4e.load_encoder(tmp_path / 'enc.pt', G=other)
    with pytest.raises(ValueError, match='spatial size'): e4e.invert(E2, torch.zeros(2, 3, 64, 64))


def test_reconstruction_metrics_and_interpolation(G):
    from spruce_nb.classifier import Classifier
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    m = e4e.reconstruction_metrics(x, x)
    assert m['mse'] == 0 and abs(m['lpips']) < 1e-6
    m2 = e4e.reconstruction_metrics(-x, x)
    assert abs(m2['mse'] - (x.square()).mean().item()) < 1e-5             # MSE on [0, 1]: ((-x+1)/2 - (x+1)/2)^2 = x^2
    clf = Classifier('convnext_micro', 2, image_size=32)
    ws = G.mapping(torch.randn(2, G.z_dim))
    r = e4e.interpolation_curve(G, clf, ws[0], ws[1], n=5)
    assert r['p'].shape == (5,) and r['images'].shape == (5, 3, 32, 32) and r['path_ratio'] >= 1 - 1e-5


def test_similarity_loss_uses_classifier_features(G):
    from spruce_nb.classifier import Classifier
    clf = Classifier('convnext_micro', 2, image_size=64)
    f = e4e.classifier_similarity(clf)
    assert f(torch.zeros(2, 3, 32, 32)).shape == (2, clf.feature_dim)      # resized to the classifier's input size
    E, hist = e4e.train_encoder(G, _ds(8), _cfg(max_steps=2, lambda_sim=0.5, lambda_adv=0.0), sim_fn=f, log_every=1, device='cpu')
    assert 'sim' in hist[0] and 'd_loss' not in hist[0]


def test_cli_train_encoder(G, tmp_path):
    export_generator(G, tmp_path / 'G.pt')
    out = tmp_path / 'run'
    args = ['train-encoder', '--generator', str(tmp_path / 'G.pt'), '--data', 'phantoms:cxr', '--n', '16', '--out', str(out),
            '--steps', '3', '--batch-size', '4', '--widths', '8', '16', '16', '32', '--units', '1', '1', '1', '1', '--fpn-channels', '16',
            '--device', 'cpu']
    assert main(args) == 2                                                 # λ_sim > 0 without --classifier: clear error
    assert main(args + ['--lambda-sim', '0']) == 0
    assert (out / 'encoder.pt').exists() and (out / 'offsets.png').exists() and (out / 'last.pt').exists()
    E = e4e.load_encoder(out / 'encoder.pt', G=G)
    assert E.cfg.widths == (8, 16, 16, 32) and E.cfg.max_steps == 3
    assert main(args + ['--lambda-sim', '0']) == 2                         # existing run without --resume
    assert main(args + ['--lambda-sim', '0', '--steps', '4', '--resume']) == 2          # other max_steps = other schedule: refused
    assert main(args + ['--lambda-sim', '0', '--resume']) == 0
    out2 = tmp_path / 'ft'
    assert main(['train-encoder', '--generator', str(tmp_path / 'G.pt'), '--data', 'phantoms:cxr', '--n', '16', '--out', str(out2),
                 '--steps', '2', '--batch-size', '4', '--lambda-sim', '0', '--init', str(out / 'encoder.pt'), '--no-progressive', '--device', 'cpu']) == 0
    assert json.loads((out2 / 'history.json').read_text())[-1]['stage'] == G.num_ws - 1

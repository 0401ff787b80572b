"""PTI: projector schedule, locality codes, batched == sequential, the shared G is never modified, early stop, num_ws from G, result save/load, CLI, bad input."""
import copy, json
import pytest
import torch

from spruce_nb import pti
from spruce_nb.core import seed_everything
from spruce_nb.stylegan2 import tiny_config, export_generator
from spruce_nb.e4e import E4EConfig, build_encoder, save_encoder
from spruce_nb.cli import main


@pytest.fixture(scope='module')
def G():
    seed_everything(0)
    G = tiny_config(32).make_generator().eval().requires_grad_(False)
    with torch.no_grad():
        for n, p in G.synthesis.named_parameters():
            if n.endswith('noise_strength'): p.fill_(0.2)             # make the constant noise matter
    return G


@pytest.fixture(scope='module')
def x():
    from spruce_nb.data import make_phantoms
    return make_phantoms('cxr', 3, size=32, split='test').images


def _snap(G): return {k: v.clone() for k, v in G.state_dict().items()}


def test_projector_lr_schedule_and_noise_reg():
    vals = [pti.projector_lr(s, 450) for s in (0, 1, 45, 337, 338, 449)]
    assert vals[0] == 0 and abs(vals[1] - 4.444e-4) < 1e-7 and vals[2] == pytest.approx(0.01) and vals[3] == pytest.approx(0.01)
    assert abs(vals[4] - 0.0099995) < 1e-7 and abs(vals[5] - 1.949e-6) < 1e-9
    assert pti.PTIConfig().w_lr == 0.01                                  # effective peak, not first_inv_lr = 5e-3
    white, smooth = torch.randn(4, 1, 64, 64), torch.nn.functional.interpolate(torch.randn(4, 1, 8, 8), size=64)
    assert (pti._noise_reg(white) < 0.01).all() and (pti._noise_reg(smooth) > 0.05).all()


def test_locality_codes_radius(G):
    wp = torch.randn(G.num_ws, G.w_dim)
    wr = pti.locality_codes(G, wp, torch.randn(6, G.z_dim), alpha=30.0, psi=0.5)
    assert wr.shape == (6, G.num_ws, G.w_dim)
    assert torch.allclose((wr - wp).flatten(1).norm(dim=1), torch.full((6,), 30.0), rtol=1e-4)


def test_adam_update_matches_torch():
    p, gs = torch.randn(5, 4), [torch.randn(5, 4) for _ in range(3)]
    q = p.clone().requires_grad_(True); opt = torch.optim.Adam([q], lr=0.01)
    m = v = torch.zeros_like(p); r = p
    for t, g in enumerate(gs, 1):
        q.grad = g.clone(); opt.step()
        r, m, v = pti._adam_update(r, g, m, v, t, 0.01)
    assert torch.allclose(r, q.detach(), atol=1e-7)


def test_batched_equals_sequential_and_shared_G_untouched(G, x):
    before = _snap(G)
    ws = G.mapping(torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(1))).detach()
    cfg = pti.PTIConfig(steps=5, lr=1e-3)
    rb = pti.pivotal_tuning(G, x, ws_pivot=ws, cfg=cfg)
    rs = pti.pivotal_tuning(G, x, ws_pivot=ws, cfg=cfg.replace(batched=False))
    assert all(torch.equal(before[k], v) for k, v in G.state_dict().items())
    rec_b, rec_s = rb.reconstructions(), rs.reconstructions()
    assert (rec_b - rec_s).abs().max() < 2e-3
    assert (rec_b - G.synthesis(ws, noise_mode='const')).abs().max() > 2e-2     # tuning did change the images
    for n in rb.params:                                                         # every tuned tensor agrees (up to ±lr float noise)
        assert (rb.params[n] - rs.params[n]).abs().max() < 5e-4, n
    assert torch.equal(rb.steps, torch.tensor([5, 5, 5])) and torch.equal(rs.steps, rb.steps)
    # chunking does not change the result
    rc = pti.pivotal_tuning(G, x, ws_pivot=ws, cfg=cfg.replace(chunk=2))
    assert (rc.reconstructions() - rec_b).abs().max() < 2e-3


def test_only_synthesis_parameters_change(G, x):
    ws = G.mapping(torch.randn(1, G.z_dim)).detach()
    Gi, _ = pti.tune_one(G, x[0], ws[0], pti.PTIConfig(steps=3, lr=1e-3))
    changed = [k for (k, a), b in zip(G.state_dict().items(), Gi.state_dict().values()) if not torch.equal(a, b)]
    assert changed and all(k.startswith('synthesis.') and 'noise_const' not in k and 'resample_filter' not in k for k in changed)
    res = pti.pivotal_tuning(G, x[:1], ws_pivot=ws, cfg=pti.PTIConfig(steps=3, lr=1e-3))
    assert set(res.params) == {n for n, _ in G.synthesis.named_parameters()}


def test_early_stop_and_zero_lr(G, x):
    ws = G.mapping(torch.randn(3, G.z_dim)).detach()
    res = pti.pivotal_tuning(G, x, ws_pivot=ws, cfg=pti.PTIConfig(steps=4, lpips_threshold=10.0))
    assert torch.equal(res.steps, torch.zeros(3, dtype=res.steps.dtype))
    assert torch.allclose(res.reconstructions(), G.synthesis(ws, noise_mode='const'), atol=1e-5)
    res0 = pti.pivotal_tuning(G, x, ws_pivot=ws, cfg=pti.PTIConfig(steps=2, lr=0.0, locality=False))
    assert torch.allclose(res0.reconstructions(), G.synthesis(ws, noise_mode='const'), atol=1e-5)
    # a threshold between the images' LPIPS values: some stop at 0, the others keep going (per-image early stop)
    lp = pti._lpips(pti.PTIConfig().lpips_net, 'cpu')(G.synthesis(ws, noise_mode='const'), x)
    thr = float(lp.median())
    rm = pti.pivotal_tuning(G, x, ws_pivot=ws, cfg=pti.PTIConfig(steps=3, lpips_threshold=thr))
    assert (rm.steps == 0).sum() >= 1 and (rm.steps > 0).sum() >= 1
    rs = pti.pivotal_tuning(G, x, ws_pivot=ws, cfg=pti.PTIConfig(steps=3, lpips_threshold=thr, batched=False))
    assert torch.equal(rm.steps, rs.steps)


def test_num_ws_from_generator_and_w_pivot():
    G16 = tiny_config(16).make_generator().eval()                             # num_ws = 6, not 18 (PTI#53)
    from spruce_nb.data import make_phantoms
    x = torch.nn.functional.interpolate(make_phantoms('cxr', 2, size=32).images, size=16, mode='bilinear', antialias=True).clamp(-1, 1)
    with pytest.raises(ValueError, match='AlexNet'): pti.pivotal_tuning(G16, x, cfg=pti.PTIConfig(pivot='w', w_steps=4, steps=2))
    res = pti.pivotal_tuning(G16, x, cfg=pti.PTIConfig(pivot='w', w_steps=4, steps=2, lpips_net='vgg'))   # AlexNet's stride-4 stem needs >= 32 px
    assert res.ws.shape == (2, 6, G16.w_dim) and torch.allclose(res.ws, res.ws[:, :1].expand_as(res.ws))
    with pytest.raises(ValueError, match='num_ws'): pti.pivotal_tuning(G16, x, ws_pivot=torch.zeros(2, 18, G16.w_dim), cfg=pti.PTIConfig(lpips_net='vgg'))


def test_e4e_pivot_and_bad_input(G, x):
    E = build_encoder(G, E4EConfig(resolution=32, widths=(8, 16, 16, 32), units=(1, 1, 1, 1), fpn_channels=16)).eval()
    res = pti.pivotal_tuning(G, x[:2], encoder=E, cfg=pti.PTIConfig(steps=1))
    from spruce_nb.e4e import invert
    assert torch.allclose(res.ws, invert(E, x[:2]))
    with pytest.raises(ValueError, match='needs encoder'): pti.pivotal_tuning(G, x)
    with pytest.raises(ValueError, match='spatial size'): pti.pivotal_tuning(G, x[:, :, :16, :16], encoder=E)
    with pytest.raises(ValueError, match=r'\[-1, 1\]'): pti.pivotal_tuning(G, x * 5, encoder=E)
    with pytest.raises(ValueError, match="'e4e' or 'w'"): pti.PTIConfig(pivot='w+')


def test_result_generator_save_load_and_locality(G, x, tmp_path):
    ws = G.mapping(torch.randn(2, G.z_dim)).detach()
    res = pti.pivotal_tuning(G, x[:2], ws_pivot=ws, cfg=pti.PTIConfig(steps=4, lr=1e-3))
    G1 = res.generator(1)
    assert torch.allclose(G1.synthesis(ws[1:2], noise_mode='const'), res.reconstructions()[1:2], atol=1e-5)
    with pytest.raises(IndexError): res.generator(5)
    many = res.synthesis(ws[:, None].repeat(1, 3, 1, 1))                      # [N, K, ...] codes per image
    assert many.shape == (2, 3, 3, 32, 32)
    w = ws.clone().requires_grad_(True)
    res.synthesis(w).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0                      # differentiable w.r.t. codes (for the CF optimiser)
    res.save(tmp_path / 'pti.pt')
    r2 = pti.load_pti(tmp_path / 'pti.pt', G)
    assert torch.allclose(r2.reconstructions(), res.reconstructions())
    with pytest.raises(ValueError, match='another generator'): pti.load_pti(tmp_path / 'pti.pt', tiny_config(32).make_generator())
    loc = pti.locality_change(res, n=4)
    assert loc['random_lpips'].shape == (2,) and (loc['random_lpips'] < loc['pivot_lpips']).all()


def test_cli_pti(G, tmp_path):
    export_generator(G, tmp_path / 'G.pt')
    E = build_encoder(G, E4EConfig(resolution=32, widths=(8, 16, 16, 32), units=(1, 1, 1, 1), fpn_channels=16))
    save_encoder(E, tmp_path / 'enc.pt', G=G)
    out = tmp_path / 'out'
    args = ['pti', '--generator', str(tmp_path / 'G.pt'), '--data', 'phantoms:cxr', '--n', '2', '--steps', '2', '--out', str(out), '--device', 'cpu']
    assert main(args + ['--encoder', str(tmp_path / 'enc.pt')]) == 0
    m = json.loads((out / 'metrics.json').read_text())
    assert set(m) >= {'pivot', 'pti', 'steps'} and (out / 'inversions.png').exists() and (out / 'pti.pt').exists()
    assert main(args + ['--encoder', str(tmp_path / 'enc.pt')]) == 2                    # exists, no --overwrite
    assert main(args + ['--w-steps', '2', '--overwrite', '--sequential']) == 0         # W projector pivot
    assert json.loads((out / 'metrics.json').read_text())['config']['pivot'] == 'w'

def test_early_stop_only_with_the_real_lpips_trunk():
    "No early stop by default (the reference's 0.07 stops 64-px phantoms at step 0); an explicit threshold is kept (with a warning on the random trunk)."
    from spruce_nb.perceptual import lpips_pretrained
    from spruce_nb.pti import _stop_threshold, PTIConfig, PTI_LPIPS_THRESHOLD
    cfg = PTIConfig()
    assert cfg.lpips_net == 'alex' and _stop_threshold(cfg) == 0.0 and PTI_LPIPS_THRESHOLD == 0.07
    assert _stop_threshold(cfg.replace(lpips_threshold=0.0)) == 0.0
    if lpips_pretrained('alex'): assert _stop_threshold(cfg.replace(lpips_threshold=0.2)) == 0.2
    else:
        with pytest.warns(UserWarning, match='spruce weights install'): assert _stop_threshold(cfg.replace(lpips_threshold=0.2)) == 0.2

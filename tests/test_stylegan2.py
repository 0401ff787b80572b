"""StyleGAN2: generator contract, discriminator, training steps, resume/config checks, export/load, CLI, bad input."""
import json, math
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from spruce_nb import stylegan2 as sg
from spruce_nb.core import seed_everything
from spruce_nb.cli import main


def _ds(n=16, res=32, ch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.rand(n, ch, res, res, generator=g) * 2 - 1, torch.zeros(n, dtype=torch.long))


def _cfg(**kw):
    return sg.tiny_config(32, batch=8, **kw)


@pytest.fixture
def G():
    seed_everything(0)
    G = sg.tiny_config(32).make_generator().eval()
    with torch.no_grad():
        for m in G.modules():
            if isinstance(m, sg.SynthesisLayer): m.noise_strength.fill_(0.3)   # make noise matter
    return G


def test_demodulated_weights_unit_norm_and_modconv_paths():
    w, s = torch.randn(12, 6, 3, 3), torch.randn(5, 6) * 3
    norms = sg.demodulated_weights(w, s).square().sum(dim=[2, 3, 4]).sqrt()
    assert torch.allclose(norms, torch.ones(5, 12), atol=1e-5)
    x = torch.randn(5, 6, 8, 8)
    a = sg.modulated_conv2d(x, w, s, padding=1, fused_modconv=True)
    b = sg.modulated_conv2d(x, w, s, padding=1, fused_modconv=False)
    assert torch.allclose(a, b, atol=1e-4)
    # each output channel of a demodulated conv has unit-variance response to unit white noise (on average)
    xs = torch.randn(64, 6, 16, 16)
    y = sg.modulated_conv2d(xs, w, torch.ones(64, 6), padding=1, fused_modconv=False)[..., 1:-1, 1:-1]
    assert abs(y.var().item() - 1) < 0.1


def test_fir_filter_and_resampling():
    f = sg.setup_filter()
    assert torch.allclose(f * 64, torch.outer(torch.tensor([1., 3, 3, 1]), torch.tensor([1., 3, 3, 1])))
    x = torch.full((1, 1, 8, 8), 0.5)
    assert torch.allclose(sg.upsample2d(x, f)[..., 4:-4, 4:-4], torch.tensor(0.5))
    assert sg.downsample2d(x, f).shape == (1, 1, 4, 4)


def test_mapping_truncation_and_w_avg():
    seed_everything(0)
    G = sg.tiny_config(32).make_generator()
    z = torch.randn(4, G.z_dim)
    ws = G.mapping(z)
    assert ws.shape == (4, G.num_ws, G.w_dim) and G.mapping.w_avg.shape == (G.w_dim,)
    assert torch.equal(G.mapping.w_avg, torch.zeros(G.w_dim))            # not updated without update_emas
    G.mapping(z, update_emas=True)
    assert G.mapping.w_avg.abs().sum() > 0
    w0 = G.mapping(z, truncation_psi=0)
    assert torch.allclose(w0, G.mapping.w_avg.expand_as(w0))
    wc = G.mapping(z, truncation_psi=0, truncation_cutoff=2)
    assert torch.allclose(wc[:, :2], w0[:, :2]) and torch.allclose(wc[:, 2:], ws[:, 2:])


def test_deterministic_without_noise_and_W_vs_Wplus(G):
    ws = G.mapping(torch.randn(2, G.z_dim))
    for mode in ('none', 'const'):
        assert torch.equal(G.synthesis(ws, noise_mode=mode), G.synthesis(ws, noise_mode=mode))
    assert not torch.equal(G.synthesis(ws, noise_mode='random'), G.synthesis(ws, noise_mode='random'))
    assert torch.allclose(G.synthesis(ws[:, 0], noise_mode='const'), G.synthesis(ws, noise_mode='const'), atol=1e-6)
    img = G(torch.randn(3, G.z_dim), truncation_psi=0.7, noise_mode='const')
    assert img.shape == (3, 3, 32, 32) and torch.isfinite(img).all()
    with pytest.raises(ValueError, match='must have shape'): G.synthesis(torch.randn(2, G.num_ws + 1, G.w_dim))
    with pytest.raises(ValueError, match='noise_mode'): G.synthesis(ws, noise_mode='fixed')


def test_gradients_reach_ws(G):
    ws = G.mapping(torch.randn(2, G.z_dim)).detach().requires_grad_(True)
    G.synthesis(ws, noise_mode='const').square().mean().backward()
    assert ws.grad is not None and torch.isfinite(ws.grad).all()
    assert (ws.grad.abs().sum(dim=2) > 0).all()      # every layer's w influences the image


def test_discriminator_shape_mbstd_and_freeze():
    D = _cfg().make_discriminator()
    assert D(torch.randn(8, 3, 32, 32)).shape == (8, 1)
    with pytest.raises(ValueError, match='expected images'): D(torch.randn(8, 3, 64, 64))
    with pytest.raises(ValueError, match='divisible'): D(torch.randn(6, 3, 32, 32))
    names = D.freeze_layers(5)
    assert names == ['b32.fromrgb', 'b32.conv0', 'b32.conv1', 'b32.skip', 'b16.conv0']
    D.requires_grad_(True)
    assert not D.b16.conv0.weight.requires_grad and D.b16.conv1.weight.requires_grad
    assert [n for n, _ in D.blocks_in_order()] == ['b32', 'b16', 'b8', 'b4']
    with pytest.raises(ValueError): D.freeze_layers(99)


def test_bad_resolution_and_channels():
    for r in (48, 100, 2):
        with pytest.raises(ValueError, match='power of two'): sg.Generator(img_resolution=r)
        with pytest.raises(ValueError, match='power of two'): sg.tiny_config(r)
    with pytest.raises(ValueError, match='batch'): sg.tiny_config(32, batch=6)
    with pytest.raises(ValueError, match='unknown StyleGAN2 config'): sg.get_config('big', 64)
    with pytest.raises(ValueError, match='--res 32'): sg.train_stylegan2(sg.tiny_config(64, batch=8), _ds(), None, kimg=0.008)
    with pytest.raises(ValueError, match=r'\(3, 32, 32\)'): sg.train_stylegan2(_cfg(), _ds(ch=1), None, kimg=0.008)


def test_1024_constructs():
    G = sg.Generator(img_resolution=1024, z_dim=8, w_dim=8, mapping_layers=1, channel_base=2048, channel_max=4)
    assert G.num_ws == 18
    D = sg.Discriminator(1024, channel_base=2048, channel_max=4)
    assert len(D.blocks_in_order()) == 9


class CountingAug(nn.Module):
    def __init__(self):
        super().__init__(); self.calls = 0; self.register_buffer('p', torch.zeros([]))
    def forward(self, x):
        self.calls += 1
        return x.flip(3) * 1.0


def test_training_steps_finite_regularisers_and_aug_hook(tmp_path):
    seed_everything(0)
    cfg = _cfg(r1_interval=2, pl_interval=2, freeze_d=2)
    aug = CountingAug()
    tr = sg.make_trainer(cfg, _ds(), tmp_path / 'run', kimg=4 * 8 / 1000, augment_pipe=aug, log_every=1, snap_kimg=0.016)
    D = tr.unwrap('D')
    frozen0 = D.b32.fromrgb.weight.detach().clone(); free0 = D.b16.conv1.weight.detach().clone()
    G0 = tr.ema['G'].module.synthesis.b32.conv1.weight.detach().clone()
    hist = tr.fit()
    assert all(math.isfinite(v) for h in hist for v in h.values() if isinstance(v, float))
    assert any('D_r1_penalty' in h for h in hist) and any('G_pl_penalty' in h for h in hist)
    # per step: Gmain 1, Dmain 2 (fake, real), + R1 1 every 2nd step -> 4 steps: 4 + 8 + 2
    assert aug.calls == 14
    assert torch.equal(D.b32.fromrgb.weight, frozen0) and not torch.equal(D.b16.conv1.weight, free0)   # Freeze-D
    assert not torch.equal(tr.ema['G'].module.synthesis.b32.conv1.weight, G0)                           # G_ema moved
    st = tr.state
    assert st['cur_nimg'] == 32 and st['batch_idx'] == 4 and st['pl_mean'] > 0
    assert st['ada_stats']['n'] == 4 * 8 + 2 * 8
    assert [g['lr'] for g in tr.optimizers['G'].param_groups] == [pytest.approx(0.0025 * 2 / 3)]


def test_resume_is_exact_and_checks_config(tmp_path):
    seed_everything(0)
    full = sg.train_stylegan2(_cfg(), _ds(), tmp_path / 'a', kimg=4 * 8 / 1000, metric_kimg=0)
    sg.train_stylegan2(_cfg(), _ds(), tmp_path / 'b', kimg=2 * 8 / 1000, metric_kimg=0)
    part = sg.train_stylegan2(_cfg(), _ds(), tmp_path / 'b', kimg=4 * 8 / 1000, metric_kimg=0, resume=True)
    a, b = full.ema['G'].module.state_dict(), part.ema['G'].module.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)                  # no lost progress, bit-exact on CPU
    assert part.state['cur_nimg'] == 32
    with pytest.raises(FileExistsError): sg.train_stylegan2(_cfg(), _ds(), tmp_path / 'b', kimg=0.008)
    with pytest.raises(ValueError, match='279'):
        sg.train_stylegan2(_cfg(map=3), _ds(), tmp_path / 'b', kimg=0.064, resume=True)


def test_export_and_load_generator(tmp_path, G):
    sg.export_generator(G, tmp_path / 'g.pt')
    G2 = sg.load_generator(tmp_path / 'g.pt', device='cpu')
    ws = G.mapping(torch.randn(2, G.z_dim))
    assert torch.equal(G.synthesis(ws, noise_mode='const'), G2.synthesis(ws, noise_mode='const'))
    assert (G2.z_dim, G2.w_dim, G2.num_ws, G2.img_resolution) == (G.z_dim, G.w_dim, G.num_ws, G.img_resolution)
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(Exception, match='checkpoint'): sg.load_generator(tmp_path / 'junk.pt')


def test_nvlabs_state_dict_names():
    G, D = sg.tiny_config(64).make_generator(), sg.tiny_config(64).make_discriminator()
    gk, dk = set(G.state_dict()), set(D.state_dict())
    for k in ['mapping.fc0.weight', 'mapping.fc1.bias', 'mapping.w_avg', 'synthesis.b4.const', 'synthesis.b4.conv1.affine.weight',
              'synthesis.b4.conv1.noise_strength', 'synthesis.b4.conv1.noise_const', 'synthesis.b8.torgb.weight',
              'synthesis.b64.conv0.weight', 'synthesis.b64.torgb.affine.bias', 'synthesis.b8.resample_filter']:
        assert k in gk, k
    for k in ['b64.fromrgb.weight', 'b64.conv0.weight', 'b64.conv1.bias', 'b64.skip.weight', 'b4.conv.weight', 'b4.fc.weight', 'b4.out.bias']:
        assert k in dk, k
    assert 'b32.fromrgb.weight' not in dk


def test_frechet_distance():
    x = torch.rand(200, 3, 16, 16) * 2 - 1
    assert abs(sg.frechet_distance(x, x)) < 1e-3
    y = x + 0.5
    assert sg.frechet_distance(x, y) == pytest.approx(sg.frechet_distance(y, x), rel=1e-4)
    assert sg.frechet_distance(x, y) == pytest.approx(0.25 * 192, rel=1e-3)   # shift of 0.5 in 192 pooled dims


def test_cli_train_gan(tmp_path, capsys):
    out = tmp_path / 'run'
    args = ['train-gan', '--data', 'phantoms:cxr:cardiomegaly-vs-normal', '--n', '16', '--res', '32', '--kimg', '0.016',
            '--batch', '8', '--out', str(out), '--metric-kimg', '0']
    assert main(args) == 0
    assert (out / 'G_ema.pt').exists() and json.loads((out / 'config.json').read_text())['name'] == 'tiny'
    assert main(args) == 2 and 'resume' in capsys.readouterr().err          # refuses to overwrite a run
    assert main(args + ['--gamma', '5', '--resume']) == 2                    # config mismatch on resume
    assert main(['train-gan', '--data', 'phantoms:cxr', '--res', '48', '--out', str(tmp_path / 'x')]) == 2
    G = sg.load_generator(out / 'G_ema.pt')
    assert G(torch.randn(1, G.z_dim)).shape == (1, 3, 32, 32)


def test_fp16_blocks_path(monkeypatch):
    "The CUDA mixed-precision path (fp16 in the num_fp16_res top blocks), forced on the CPU."
    monkeypatch.setattr(sg, '_block_dtype', lambda use_fp16, x, force_fp32=False: torch.float16 if use_fp16 and not force_fp32 else torch.float32)
    seed_everything(0)
    cfg = _cfg()
    G, D = cfg.make_generator(), cfg.make_discriminator()
    assert [getattr(G.synthesis, f'b{r}').use_fp16 for r in G.synthesis.block_resolutions] == [False, True, True, True]
    img = G(torch.randn(8, G.z_dim))
    assert img.dtype == torch.float32 and torch.isfinite(img).all()
    logits = D(img)
    assert logits.dtype == torch.float32 and logits.shape == (8, 1)
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in G.parameters() if p.grad is not None)
    G.eval(); z = torch.randn(2, G.z_dim)
    with torch.no_grad():
        assert (G(z, noise_mode='const') - G(z, noise_mode='const', force_fp32=True)).abs().max() < 0.1

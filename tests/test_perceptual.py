"Integration and reliability tests for spruce_nb.perceptual (LPIPS without downloads)."
import socket, warnings
import pytest
import torch

import spruce_nb.perceptual as P


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    "Empty LPIPS cache, no real weights anywhere (empty hub dir), no network; restored afterwards."
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    for v in P.TRUNK_ENV.values(): monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv('SPRUCE_WEIGHTS_DIR', str(tmp_path / 'no_weights'))  # not the installed spruce weights cache either
    def no_net(*a, **k): raise OSError('network access attempted in a test')
    monkeypatch.setattr(socket.socket, 'connect', no_net)
    P.clear_lpips_cache(); warned = set(P._WARNED); P._WARNED.clear()
    yield tmp_path
    P.clear_lpips_cache(); P._WARNED.clear(); P._WARNED.update(warned)


def _pair(n=3, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, 3, size, size, generator=g) * 2 - 1
    return a, (a + 0.3 * torch.randn(a.shape, generator=g)).clamp(-1, 1)


import functools

@functools.lru_cache(maxsize=None)
def _reference_cached(net):
    return _reference(net, cached=False)


def _reference(net, pnet_rand=True, cached=True):
    "The lpips package's own module built the plain way (pnet_rand: random trunk; callers overwrite its weights)."
    if pnet_rand and cached: return _reference_cached(net)
    import lpips
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return lpips.LPIPS(net=net, pnet_rand=pnet_rand, verbose=False).eval()


def test_random_fallback_warns_once_and_is_deterministic(fresh):
    with pytest.warns(UserWarning, match='RANDOM') as rec:
        m = P.lpips_model('vgg', 'cpu')
    assert any('SPRUCE_VGG16_WEIGHTS' in str(r.message) for r in rec)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    assert P.lpips_pretrained('vgg') is False and 'random' in P.lpips_info('vgg')['trunk']
    a, b = _pair()
    d1 = P.lpips_distance(a, b)
    P.clear_lpips_cache()
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # a second build must not warn again
        d2 = P.lpips_distance(a, b)
    assert torch.equal(d1, d2)  # the seeded random trunk is the same on every build


def test_equals_lpips_package_same_network(fresh):
    a, b = _pair()
    ours = P.lpips_distance(a, b, net='vgg')
    ref = _reference('vgg'); ref.load_state_dict(P.lpips_model('vgg', 'cpu').state_dict())
    with torch.no_grad():
        torch.testing.assert_close(ref(a, b).flatten(), ours, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(ref((a + 1) / 2, (b + 1) / 2, normalize=True).flatten(), ours, rtol=1e-5, atol=1e-6)


def test_trunk_from_env_file_matches_package(fresh, monkeypatch):
    "A torchvision-format VGG16 state dict named by $SPRUCE_VGG16_WEIGHTS is used, and gives the package's value for that trunk."
    torch.manual_seed(1)
    feats = P._features_only('vgg').features
    sd = {f'features.{k}': v for k, v in feats.state_dict().items()}
    path = fresh / 'vgg16-local.pth'; torch.save(sd, path)
    monkeypatch.setenv('SPRUCE_VGG16_WEIGHTS', str(path))
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # real weights: no warning
        m = P.lpips_model('vgg', 'cpu')
    assert P.lpips_pretrained('vgg') and str(path) in P.lpips_info('vgg')['trunk']
    ref = _reference('vgg')
    with torch.no_grad():
        for name, p in ref.net.named_parameters(): p.copy_(sd['features.' + name.split('.', 1)[1]])
    a, b = _pair(seed=2)
    with torch.no_grad(): torch.testing.assert_close(ref(a, b).flatten(), P.lpips_distance(a, b), rtol=1e-6, atol=1e-7)
    assert torch.equal(m.net.slice1[0].weight, sd['features.0.weight'])


def test_trunk_from_hub_cache_matches_package_pretrained(fresh):
    "With torchvision's file in the hub cache, lpips.LPIPS(pretrained trunk) and lpips_model agree (squeeze: a 5 MB file)."
    import torchvision
    torch.manual_seed(3)
    ckdir = fresh / 'torch_home' / 'hub' / 'checkpoints'; ckdir.mkdir(parents=True)
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), ckdir / P.TRUNK_FILES['squeeze'])
    assert P.trunk_weights_path('squeeze') == ckdir / P.TRUNK_FILES['squeeze']
    ref = _reference('squeeze', pnet_rand=False)  # the package loads the trunk through torchvision from the cache
    a, b = _pair(seed=4, size=48)
    with torch.no_grad(): torch.testing.assert_close(ref(a, b).flatten(), P.lpips_distance(a, b, net='squeeze'), rtol=1e-6, atol=1e-7)
    assert P.lpips_pretrained('squeeze')


def test_never_downloads(fresh):
    with P.no_downloads(), pytest.raises(RuntimeError, match='refuses to download'):
        torch.hub.load_state_dict_from_url('https://download.pytorch.org/models/vgg16-397923af.pth', model_dir=str(fresh / 'x'))
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for net in P.LPIPS_NETS: P.lpips_model(net, 'cpu')  # socket.connect raises if anything tries the network


def test_bad_inputs(fresh, monkeypatch):
    a, b = _pair()
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        with pytest.raises(ValueError, match='same shape'): P.lpips_distance(a, b[:2])
        with pytest.raises(ValueError, match=r'\[-1, 1\]'): P.lpips_distance(a * 3, b)
        with pytest.raises(ValueError, match='too small'): P.lpips_distance(a[..., :8, :8], b[..., :8, :8])
        with pytest.raises(ValueError, match='not supported'): P.lpips_model('resnet')
        assert P.lpips_distance(a[:, :1], b[:, :1]).shape == (3,)
        assert P.lpips_distance(a[:0], b[:0]).shape == (0,)
    P.clear_lpips_cache()
    monkeypatch.setenv('SPRUCE_VGG16_WEIGHTS', str(fresh / 'missing.pth'))
    with pytest.raises(FileNotFoundError, match='SPRUCE_VGG16_WEIGHTS'): P.lpips_model('vgg', 'cpu')
    bad = fresh / 'bad.pth'; torch.save({'foo': torch.zeros(1)}, bad)
    monkeypatch.setenv('SPRUCE_VGG16_WEIGHTS', str(bad)); P.clear_lpips_cache()
    with pytest.raises(ValueError, match='not a torchvision vgg'): P.lpips_model('vgg', 'cpu')

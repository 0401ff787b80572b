"Acceptance, peer and reliability tests for spruce_nb.metrics (FID, CMMD, per-image CF metrics, ground-truth edit metrics)."
import inspect, warnings
import numpy as np
import pytest
import torch

import spruce_nb.metrics as M
from spruce_nb.data import make_phantoms, phantom_counterfactuals


def _feats(seed=0, n=3000, d=64):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(d, d)) / np.sqrt(d)
    X = rng.normal(size=(n, d)) @ A
    Y = rng.normal(0.2, 1.0, size=(n, d)) @ (A + 0.1 * rng.normal(size=(d, d)) / np.sqrt(d))
    return X, Y


# ---------------------------------------------------------------- FID
def test_fid_matches_pytorch_fid():
    fs = pytest.importorskip('pytorch_fid.fid_score', reason='pytorch-fid not installed (dev requirement)')
    X, Y = _feats()
    try: ref = fs.calculate_frechet_distance(X.mean(0), np.cov(X, rowvar=False), Y.mean(0), np.cov(Y, rowvar=False))
    except TypeError as e:  # SciPy >= 1.18 removed sqrtm(disp=...), which pytorch-fid 0.3.0 passes
        pytest.skip(f'pytorch-fid incompatible with this SciPy: {e}')
    ours = M.frechet_distance(torch.tensor(X), torch.tensor(Y))
    assert abs(ours - ref) <= 1e-6 * abs(ref), (ours, ref)
    # from statistics too
    assert abs(M.frechet_distance_from_stats(X.mean(0), np.cov(X, rowvar=False), Y.mean(0), np.cov(Y, rowvar=False)) - ref) <= 1e-6 * ref


def test_fid_population_cov_and_self():
    X, Y = _feats(1, n=500, d=16)
    n = len(X)
    s1, s2 = np.cov(X, rowvar=False) * (n - 1) / n, np.cov(Y, rowvar=False) * (n - 1) / n
    from scipy import linalg
    ref = ((X.mean(0) - Y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)
    assert abs(M.frechet_distance(X, Y, population_cov=True) - ref) <= 1e-8 * ref
    assert M.frechet_distance(X, Y, population_cov=True) < M.frechet_distance(X, Y)  # 1/N shrinks both traces here
    assert M.frechet_distance(X, X) == pytest.approx(0, abs=1e-9)
    assert M.frechet_distance(X[:10], Y[:10]) >= 0  # N < D: singular covariances do not raise


def test_fid_bad_inputs():
    X, Y = _feats(2, n=50, d=8)
    with pytest.raises(ValueError, match='dimensions differ'): M.frechet_distance(X, Y[:, :4])
    with pytest.raises(ValueError, match='at least 2'): M.frechet_distance(X[:1], Y)
    Z = X.copy(); Z[0, 0] = np.nan
    with pytest.raises(ValueError, match='NaN'): M.frechet_distance(Z, Y)
    with pytest.raises(ValueError, match=r'\[N, D\]'): M.frechet_distance(X[0], Y)


# ---------------------------------------------------------------- CMMD
def _emb(seed, n, d=32, shift=0.0):
    rng = np.random.default_rng(seed)
    E = rng.normal(shift, 1, size=(n, d)); return torch.tensor(E / np.linalg.norm(E, axis=1, keepdims=True))


def _cmmd_official(x, y, sigma=10.0, scale=1000.0):
    "google-research cmmd/distance.py mmd(), re-derived in numpy (biased: full-matrix means)."
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    g = 1 / (2 * sigma ** 2); xs, ys = (x * x).sum(1), (y * y).sum(1)
    kxx = np.mean(np.exp(-g * (-2 * x @ x.T + xs[:, None] + xs[None, :])))
    kxy = np.mean(np.exp(-g * (-2 * x @ y.T + xs[:, None] + ys[None, :])))
    kyy = np.mean(np.exp(-g * (-2 * y @ y.T + ys[:, None] + ys[None, :])))
    return scale * (kxx + kyy - 2 * kxy)


def test_cmmd_official_symmetric_self_zero():
    a, b = _emb(0, 120), _emb(1, 90, shift=0.3)
    v = M.cmmd_from_embeddings(a, b)
    assert v == pytest.approx(_cmmd_official(a, b), rel=1e-9)
    assert v == pytest.approx(M.cmmd_from_embeddings(b, a), rel=1e-12)
    assert M.cmmd_from_embeddings(a, a) == pytest.approx(0, abs=1e-9)
    assert v > 0


def test_cmmd_unbiased_formula_and_gap():
    a, b = _emb(2, 40), _emb(3, 30, shift=0.2)
    g = 1 / 200
    k = lambda u, w: float(np.exp(-g * ((np.asarray(u) - np.asarray(w)) ** 2).sum()))
    m, n = len(a), len(b)
    sxx = sum(k(a[i], a[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    syy = sum(k(b[i], b[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    sxy = sum(k(a[i], b[j]) for i in range(m) for j in range(n)) / (m * n)
    assert M.cmmd_from_embeddings(a, b, unbiased=True) == pytest.approx(1000 * (sxx + syy - 2 * sxy), abs=1e-7)
    assert M.cmmd_from_embeddings(a, b) > M.cmmd_from_embeddings(a, b, unbiased=True)  # V-statistic >= U-statistic here
    # two independent samples of the same distribution: the unbiased estimate is near 0, the biased one is not
    pairs = [(_emb(10 + 2 * i, 100), _emb(11 + 2 * i, 100)) for i in range(10)]
    u = np.mean([M.cmmd_from_embeddings(c, d, unbiased=True) for c, d in pairs])
    b = np.mean([M.cmmd_from_embeddings(c, d) for c, d in pairs])
    assert abs(u) < 0.3 * b, (u, b)


def test_cmmd_images_with_extractor_and_no_silent_default():
    ims = make_phantoms('cxr', n=8, size=64, seed=0).images
    ex = M.RandomConvFeatures(dim=16)
    v = M.cmmd(ims[:4], ims[4:], ex)
    fa, fb = ex(ims[:4]), ex(ims[4:])
    fa, fb = fa.double(), fb.double(); fa, fb = fa / fa.norm(dim=1, keepdim=True), fb / fb.norm(dim=1, keepdim=True)
    assert v == pytest.approx(M.cmmd_from_embeddings(fa, fb), rel=1e-9)
    assert M.cmmd(ims, ims, ex) == pytest.approx(0, abs=1e-9)
    with pytest.raises(ValueError, match='no silent default'): M.fid(ims, ims, None)
    with pytest.raises(ValueError, match='no silent default'): M.cmmd(ims, ims, 'random')


# ---------------------------------------------------------------- extractors
def test_inception_features_need_local_file(monkeypatch, tmp_path):
    pytest.importorskip('pytorch_fid')
    monkeypatch.setenv('TORCH_HOME', str(tmp_path))
    monkeypatch.setenv('SPRUCE_WEIGHTS_DIR', str(tmp_path / 'empty'))
    monkeypatch.delenv('SPRUCE_FID_INCEPTION_WEIGHTS', raising=False)
    with pytest.raises(RuntimeError, match='spruce weights install --only fid'): M.InceptionFeatures()
    monkeypatch.setenv('SPRUCE_FID_INCEPTION_WEIGHTS', str(tmp_path / 'nope.pth'))
    with pytest.raises(FileNotFoundError, match='does not exist'): M.InceptionFeatures()


def test_real_fid_inception(real_weights):
    "Real FID-Inception: 2048-d; FID(X, X) = 0; our Fréchet distance equals pytorch-fid's on the same features; real vs held-out real is far below real vs GAN samples."
    from pytorch_fid.fid_score import calculate_frechet_distance
    from spruce_nb.stylegan2 import load_generator
    from pathlib import Path
    ex = M.InceptionFeatures(device='cpu')
    assert ex.name.startswith('fid-inception-v3-pool3') and ex.weights_info['sha256']
    real = make_phantoms('cxr', n=64, size=64, seed=0).images
    held = make_phantoms('cxr', n=64, size=64, seed=1).images
    G = load_generator(Path(M.__file__).parent / 'zoo' / 'cxr64' / 'generator.pt').eval()
    with torch.no_grad(): fake = G(torch.randn(64, G.z_dim, generator=torch.Generator().manual_seed(0)), truncation_psi=1.0).clamp(-1, 1)
    fr, fh, ff = ex(real), ex(held), ex(fake.expand(-1, 3, -1, -1))
    assert fr.shape == (64, 2048)
    assert M.frechet_distance(fr, fr) == pytest.approx(0, abs=1e-6)
    mu1, mu2 = fr.double().mean(0).numpy(), fh.double().mean(0).numpy()
    s1, s2 = np.cov(fr.double().numpy(), rowvar=False), np.cov(fh.double().numpy(), rowvar=False)
    ref = calculate_frechet_distance(mu1, s1, mu2, s2)
    assert M.frechet_distance(fr, fh) == pytest.approx(ref, rel=1e-3)
    d_held, d_gan = M.frechet_distance(fr, fh), M.frechet_distance(fr, ff)
    assert d_held < 0.5 * d_gan, (d_held, d_gan)
    m = M.realism_metrics(real, held, [ex])
    assert set(m) == {'fid', 'kid'} and m['fid'] == pytest.approx(d_held, rel=1e-6)


def test_kid_equals_torch_fidelity():
    tf = pytest.importorskip('torch_fidelity.metric_kid')
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(120, 32, generator=g), torch.randn(90, 32, generator=g) + 0.3
    ref = tf.kid_features_to_metric(a.double(), b.double(), kid_subsets=10, kid_subset_size=50, kid_degree=3, kid_gamma=None, kid_coef0=1, rng_seed=2020, verbose=False)
    mean, std = M.kid_from_features(a, b, subsets=10, subset_size=50)
    assert mean == pytest.approx(ref['kernel_inception_distance_mean'], rel=1e-6)
    assert std == pytest.approx(ref['kernel_inception_distance_std'], rel=1e-6)


def test_effnet_embedding_and_names(real_weights):
    ex = M.EfficientNetFeatures(device='cpu')
    ims = make_phantoms('cxr', n=6, size=64, seed=0).images
    e = ex(ims)
    assert e.shape == (6, 1280) and torch.allclose(e.norm(dim=1), torch.ones(6), atol=1e-5)
    m = M.realism_metrics(ims[:3], ims[3:], [ex, M.RandomConvFeatures()])
    assert set(m) == {'mmd_effnet', 'fd_random', 'mmd_random'}    # never 'cmmd' or 'fid' on these features


def test_inception_features_equal_pytorch_fid_pipeline(monkeypatch, tmp_path):
    "Same (random) FID-Inception weights from a local file: our [-1,1] pipeline equals pytorch-fid's own [0,1] pipeline."
    pfi = pytest.importorskip('pytorch_fid.inception')
    torch.manual_seed(0)
    # a weights file in the format of pt_inception-2015-12-05: the state of pytorch-fid's bare FID inception (random here)
    monkeypatch.setattr(pfi, 'load_state_dict_from_url', lambda *a, **k: inspect.currentframe().f_back.f_locals['inception'].state_dict())
    path = tmp_path / M.FID_INCEPTION_FILE
    torch.save(pfi.fid_inception_v3().state_dict(), path)
    monkeypatch.setattr(pfi, 'load_state_dict_from_url', lambda *a, **k: torch.load(path, weights_only=True))
    ref = pfi.InceptionV3([3], resize_input=True, normalize_input=True, use_fid_inception=True).eval()
    monkeypatch.undo()
    ex = M.InceptionFeatures(weights=path, device='cpu')
    assert ex.name.startswith('fid-inception-v3-pool3')
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad(): want = ref((x + 1) / 2)[0].flatten(1)
    got = ex(x)
    assert got.shape == (2, 2048)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_classifier_features_fid_gradcam():
    from spruce_nb.classifier import Classifier
    torch.manual_seed(0)
    clf = Classifier('convnext_micro', 2, ['normal', 'cardiomegaly'], image_size=64).eval()
    ims = make_phantoms('cxr', n=8, size=64, seed=0).images
    v = M.fid(ims[:4], ims[4:], clf)
    with torch.no_grad(): fa, fb = clf.features(ims[:4]), clf.features(ims[4:])
    assert v == pytest.approx(M.frechet_distance(fa, fb), rel=1e-6)
    assert M.get_extractor(clf).name == 'classifier-features:convnext_micro'
    cam = M.grad_cam(clf, ims[:2], 1)
    assert cam.shape == (2, 64, 64) and float(cam.min()) >= 0 and float(cam.max()) <= 1 + 1e-6
    x_cf = ims[:2].flip(-1)
    r = M.delta_log_odds_vs_gradcam(clf, ims[:2], x_cf, 1, fraction=0.2)
    assert set(r) == {'cf_saliency', 'grad_cam', 'difference'} and r['difference'].shape == (2,)
    torch.testing.assert_close(r['difference'], r['cf_saliency'] - r['grad_cam'])
    # fraction 1.0 pastes the whole counterfactual: equals the plain Δlog-odds
    full = M.saliency_delta_log_odds(clf, ims[:2], x_cf, 1, M.cf_saliency(ims[:2], x_cf), fraction=1.0)
    with torch.no_grad(): torch.testing.assert_close(full, M.delta_log_odds(clf(ims[:2]), clf(x_cf), 1))


# ---------------------------------------------------------------- per-image metrics
def test_lpips_metric_equals_lpips_package():
    import lpips
    from spruce_nb.perceptual import lpips_model
    g = torch.Generator().manual_seed(0)
    a = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1; b = (a + 0.2 * torch.randn(a.shape, generator=g)).clamp(-1, 1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        ours = M.lpips(a, b)
        ref = lpips.LPIPS(net='vgg', pnet_rand=True, verbose=False).eval()
    ref.load_state_dict(lpips_model('vgg', 'cpu').state_dict())
    with torch.no_grad(): torch.testing.assert_close(ours, ref(a, b).flatten(), rtol=1e-6, atol=1e-7)


def test_pixel_and_classifier_metrics():
    x = torch.zeros(2, 3, 8, 8); y = x.clone(); y[0] = 1.0; y[1, :, :2, :4] = -1.0
    torch.testing.assert_close(M.l1_per_pixel(x, y), torch.tensor([0.5, 0.5 * 8 / 64]))
    torch.testing.assert_close(M.mse(x, y), torch.tensor([0.25, 0.25 * 8 / 64]))
    torch.testing.assert_close(M.concentration(x, y), torch.tensor([1.0, 8 / 64]))
    z = x.clone(); z[0, 0, 0, 0] = 0.5; z[0, 0, 7, 7] = 0.5   # two far-apart pixels: 'all' spans the image, 'largest' is one pixel
    assert float(M.concentration(x, z)[0]) == 1.0 and float(M.concentration(x, z, mode='largest')[0]) == pytest.approx(1 / 64)
    assert float(M.concentration(x, x + 0.04)[0]) == 0.0  # 0.02 in [0,1] units: below the 0.05 threshold
    with pytest.raises(ValueError, match='mode'): M.concentration(x, y, mode='box')
    with pytest.raises(ValueError, match='same shape'): M.mse(x, y[:1])
    logits = torch.tensor([[1.0, 2.0, 0.5], [3.0, 0.0, 0.0]])
    assert M.flip_ratio(logits, 1) == 0.5
    p = logits.softmax(-1)
    torch.testing.assert_close(M.target_confidence(logits, torch.tensor([1, 0])), torch.stack([p[0, 1], p[1, 0]]))
    torch.testing.assert_close(M.log_odds(logits, 1), torch.log(p[:, 1] / (1 - p[:, 1])), rtol=1e-5, atol=1e-6)
    g_logits = torch.tensor([[0.0, 0.0, 0.0], [3.0, 0.0, 0.0]])
    torch.testing.assert_close(M.classifier_discrepancy(logits, g_logits, 1), (p[:, 1] - g_logits.softmax(-1)[:, 1]).abs())
    torch.testing.assert_close(M.classifier_discrepancy(logits, logits, 2), torch.zeros(2))


# ---------------------------------------------------------------- ground truth on phantoms
@pytest.fixture(scope='module')
def phantom_gt():
    pb = make_phantoms('cxr', n=4, size=64, seed=5, labels=[0] * 4)
    gt = phantom_counterfactuals('cxr', pb.seeds, 'normal', 'cardiomegaly', size=64)
    path, ts = M.phantom_cf_path('cxr', pb.seeds, 'normal', 'cardiomegaly', ts=torch.linspace(0, 1.5, 16))
    return gt, path, ts


def test_edit_metrics_invariants(phantom_gt):
    gt, path, ts = phantom_gt
    xf, xcf, mask = gt['images'], gt['counterfactuals'], gt['masks']
    none = M.edit_metrics(xf, xf, xf, xcf, mask)
    torch.testing.assert_close(none['edit_err'], torch.ones(4)); torch.testing.assert_close(none['in_mask'], torch.zeros(4))
    torch.testing.assert_close(none['edit_cos'], torch.zeros(4)); torch.testing.assert_close(none['leak'], torch.zeros(4))
    true = M.edit_metrics(xcf, xf, xf, xcf, mask)
    torch.testing.assert_close(true['edit_err'], torch.zeros(4)); torch.testing.assert_close(true['in_mask'], torch.ones(4))
    torch.testing.assert_close(true['edit_cos'], torch.ones(4)); torch.testing.assert_close(true['leak'], torch.zeros(4))
    # an inversion error shared by x_ref and x_g is not counted as edit error
    e = 0.05 * torch.randn(xf.shape, generator=torch.Generator().manual_seed(0))
    inv = M.edit_metrics((xcf + e).clamp(-1, 1), (xf + e).clamp(-1, 1), xf, xcf, mask)
    assert float(inv['edit_err'].max()) < 0.05 and float(inv['in_mask'].min()) > 0.95
    # a global change scores badly: energy mostly outside the mask, large leak
    glob = M.edit_metrics((xf * 0.9 + 0.1), xf, xf, xcf, mask)
    assert float(glob['in_mask'].max()) < 0.5 and float(glob['leak'].min()) > 0.01
    with pytest.raises(ValueError, match='mask shape'): M.edit_metrics(xf, xf, xf, xcf, mask[:, :32])


def test_path_position(phantom_gt):
    gt, path, ts = phantom_gt
    xf, xcf = gt['images'], gt['counterfactuals']
    torch.testing.assert_close(path[0], xf); torch.testing.assert_close(path[10], xcf)
    r = M.path_position(xcf, xf, path, ts)
    torch.testing.assert_close(r['t_star'], torch.ones(4)); assert float(r['residual'].max()) < 1e-6
    half = M.path_position(path[5], xf, path, ts, mask=gt['masks'])
    torch.testing.assert_close(half['t_star'], torch.full((4,), float(ts[5])))
    assert float(M.path_position(xf, xf, path, ts)['t_star'].max()) == 0.0


def test_oracle_change(phantom_gt):
    gt, path, ts = phantom_gt
    xf, xcf = gt['images'], gt['counterfactuals']
    measure = lambda im: torch.stack([im.mean((1, 2, 3)), im.std((1, 2, 3))], 1)
    r = M.oracle_change(measure, xf, xcf, names=['mean', 'std'])
    torch.testing.assert_close(r['mean']['delta'], measure(xcf)[:, 0] - measure(xf)[:, 0])
    from spruce_nb.data import fit_oracle
    oracle = fit_oracle('cxr', n=300, size=64, n_test=50)
    r = M.oracle_change(oracle, xf, xcf)
    assert set(r) == set(oracle.causal_names)
    assert float(r['ctr']['delta'].mean()) > 0  # normal -> cardiomegaly enlarges the measured CTR

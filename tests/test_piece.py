"""spruce_nb.piece: batched GMM fit, per-class feature statistics, PIECE's exceptional features, CLI, bad input."""
import math, warnings
import numpy as np
import pytest
import torch
from torch import nn

from spruce_nb.piece import (GMM1D, fit_gmm_1d, collect_features, fit_feature_gmms, fit_feature_hurdles, FeatureGMMs, FeatureHurdles,
                             exceptional_features, choose_target, partial_counterfactual_features, semifactual_features,
                             classifier_identity, CollectedFeatures)


def _balance_head(clf, feats):
    "Set S's bias so that the predicted classes split at the median logit difference (a random net otherwise predicts one class)."
    with torch.no_grad():
        d = feats @ (clf.head.weight[1] - clf.head.weight[0])
        clf.head.bias.copy_(torch.tensor([0., -float(d.median())]))
    return clf


@pytest.fixture(scope='module')
def phantom_setup():
    from spruce_nb.data import dataset_from_spec
    from spruce_nb.classifier import Classifier
    torch.manual_seed(0)
    ds = dataset_from_spec('phantoms:cxr', split='train', n=192, size=64)
    clf = Classifier('convnext_micro', num_classes=2, classes=ds.classes, image_size=64).eval()
    f0 = collect_features(clf, ds)
    _balance_head(clf, f0.features)
    feats = collect_features(clf, ds)
    return clf, ds, feats


class StandIn(nn.Module):
    "A small classifier with the BRIEF interface (features / head / classes); ReLU features for the hurdle model."
    def __init__(self, d=6, relu=True):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, d))
        self.act = nn.ReLU() if relu else nn.GELU()
        self.head = nn.Linear(d, 2)
        self.classes = ['normal', 'cardiomegaly']
        self.arch = 'standin'
    def features(self, x): return self.act(self.body(x))
    def forward(self, x): return self.head(self.features(x))


# ---------------------------------------------------------------- fit_gmm_1d

def test_recovers_known_mixtures():
    g = torch.Generator().manual_seed(1)
    true = GMM1D(torch.tensor([[.3, .7], [.5, .5], [.8, .2]]), torch.tensor([[-2., 2.], [10., 14.], [0.001, 0.003]]),
                 torch.tensor([[.5, 1.], [1., .5], [2e-4, 2e-4]]))
    x = true.sample(30000, generator=g)
    fit = fit_gmm_1d(x, k=2, tol=1e-6, max_iter=1000, refine_iter=100)
    o = fit.means.argsort(-1)
    torch.testing.assert_close(fit.weights.gather(1, o), true.weights, atol=0.015, rtol=0)
    torch.testing.assert_close(fit.means.gather(1, o) / true.stds, true.means / true.stds, atol=0.05, rtol=0)   # within 0.05 σ
    torch.testing.assert_close(fit.stds.gather(1, o) / true.stds, torch.ones_like(true.stds), atol=0.05, rtol=0)
    torch.testing.assert_close(fit.expected(), true.expected(), atol=0.02, rtol=1e-3)
    # the fitted log-likelihood is at least the true parameters' (it is the maximum)
    assert (fit.log_likelihood(x) >= true.log_likelihood(x) - 1e-4).all()


def test_cdf_sf_expected_against_scipy():
    from scipy import stats
    g = GMM1D(torch.tensor([[.2, .3, .5]]), torch.tensor([[-1., 0., 4.]]), torch.tensor([[.3, 1., 2.]]))
    v = torch.tensor([[-2.], [0.3], [9.], [20.]])
    ref = (np.array([.2, .3, .5]) * stats.norm.cdf(v.numpy(), [-1, 0, 4], [.3, 1, 2])).sum(1)
    np.testing.assert_allclose(g.cdf(v)[:, 0].numpy(), ref, atol=1e-6)
    refsf = (np.array([.2, .3, .5]) * stats.norm.sf(v.numpy(), [-1, 0, 4], [.3, 1, 2])).sum(1)
    np.testing.assert_allclose(g.sf(v)[:, 0].numpy(), refsf, rtol=1e-4)       # far tail (x=20: 8σ, 1 - F rounds to 0 in float32)
    assert g.sf(v)[3, 0] > 0 and 1 - g.cdf(v)[3, 0] == 0
    assert abs(float(g.expected()) - (.2 * -1 + .5 * 4)) < 1e-6


def test_ll_matches_sklearn_on_network_features(phantom_setup):
    from sklearn.mixture import GaussianMixture
    _, _, feats = phantom_setup
    X = feats.features
    cols = list(range(0, X.shape[1], 8))                           # 16 of convnext_micro's 128 features
    ours = fit_gmm_1d(X[:, cols]).log_likelihood(X[:, cols]).double().numpy()
    sk = np.array([GaussianMixture(5, random_state=0).fit(X[:, [j]].double().numpy()).score(X[:, [j]].double().numpy()) for j in cols])
    assert np.isfinite(ours).all()
    assert (ours >= sk - 0.1).all(), (ours - sk)                   # no feature much worse
    assert ours.mean() >= sk.mean() - 0.005 * abs(sk.mean()), (ours.mean(), sk.mean())


def test_grouped_matches_exact_em():
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(3000, 8, generator=g), torch.randn(2000, 8, generator=g) * 0.3 + 3])
    a = fit_gmm_1d(x, k=3).log_likelihood(x)
    b = fit_gmm_1d(x, k=3, n_groups=0).log_likelihood(x)
    assert (a >= b - 0.01).all(), (a - b)


def test_bad_samples():
    with pytest.raises(ValueError, match='no samples'): fit_gmm_1d(torch.zeros(0, 3))
    x = torch.randn(40, 6); x[0, 2] = float('nan'); x[5, 2] = float('nan'); x[9, 5] = float('inf')
    with pytest.raises(ValueError, match=r'2 NaN and 1 infinite values in 2 of 6 features \(features \[2, 5\]'): fit_gmm_1d(x)
    with pytest.raises(ValueError, match='expected samples'): fit_gmm_1d(torch.zeros(3, 4, 5))
    with pytest.warns(UserWarning, match='only 5 samples'):
        g = fit_gmm_1d(torch.randn(5, 2), k=5)
    assert g.k == 2 and torch.isfinite(g.stds).all()
    gc = fit_gmm_1d(torch.full((50, 2), -7.0))                     # constant columns: variance floor
    assert torch.isfinite(gc.stds).all() and (gc.stds > 0).all()
    assert torch.allclose(gc.expected(), torch.full((2,), -7.0))
    assert torch.isfinite(gc.log_likelihood(torch.full((50, 2), -7.0))).all()


def test_gmm1d_save_load(tmp_path):
    g = fit_gmm_1d(torch.randn(300, 4))
    g.save(tmp_path / 'g.pt')
    h = GMM1D.load(tmp_path / 'g.pt')
    torch.testing.assert_close(h.means, g.means)
    assert h[1:3].num_features == 2


# ---------------------------------------------------------------- per-class statistics

def test_fit_feature_gmms_save_load_identity(phantom_setup, tmp_path):
    from spruce_nb.classifier import Classifier
    clf, ds, feats = phantom_setup
    st = fit_feature_gmms(clf, feats)
    assert st.weights.shape == (2, 128, 5) and st.counts.sum() == len(ds)
    assert st.counts.tolist() == torch.bincount(feats.predictions, minlength=2).tolist()
    torch.testing.assert_close(st.weights.sum(-1), torch.ones(2, 128))
    st.save(tmp_path / 's.pt')
    st2 = FeatureGMMs.load(tmp_path / 's.pt', classifier=clf)
    torch.testing.assert_close(st2.stds, st.stds)
    assert st2.classifier_sha256 == classifier_identity(clf)['classifier_sha256']
    other = Classifier('convnext_micro', num_classes=2, classes=ds.classes, image_size=64)
    with pytest.raises(ValueError, match='weights sha256'): st2.check_classifier(other)
    renamed = Classifier('convnext_micro', num_classes=2, classes=['a', 'b'], image_size=64)
    renamed.load_state_dict(clf.state_dict())
    with pytest.raises(ValueError, match='classes'): st2.check_classifier(renamed)
    with pytest.raises(Exception, match="expected 'feature_hurdles'"): FeatureHurdles.load(tmp_path / 's.pt')


def test_fit_from_dataset_equals_from_features(phantom_setup):
    clf, ds, feats = phantom_setup
    sub = torch.utils.data.Subset(ds, range(64))
    a = fit_feature_gmms(clf, sub, batch_size=16)
    b = fit_feature_gmms(clf, CollectedFeatures(feats.features[:64], feats.predictions[:64], None))
    torch.testing.assert_close(a.means, b.means, atol=1e-4, rtol=1e-4)


def test_empty_class_is_a_clear_error():
    m = StandIn(d=4)
    with torch.no_grad(): m.head.weight.zero_(); m.head.bias.copy_(torch.tensor([1., 0.]))
    with pytest.raises(ValueError, match=r"no images were predicted as class\(es\) \['cardiomegaly'\]"):
        fit_feature_gmms(m, torch.rand(20, 3, 16, 16) * 2 - 1)


# ---------------------------------------------------------------- exceptional features

def test_exceptional_to_expected_raises_target_logit(phantom_setup):
    from spruce_nb.data import dataset_from_spec
    clf, _, feats = phantom_setup
    st = fit_feature_gmms(clf, feats)
    ims, _ = dataset_from_spec('phantoms:cxr', split='test', n=24, size=64).tensors()
    with torch.no_grad(): x = clf.features(ims)
    for t in (0.01, 0.05, 0.2):
        r = exceptional_features(x, 'second', st, t=t)
        assert r.x_cf.shape == x.shape and (r.mask <= r.exceptional).all()
        with torch.no_grad(): l0, l1 = clf.head(r.x), clf.head(r.x_cf)
        i = torch.arange(len(x))
        gain = l1[i, r.target] - l0[i, r.target]
        assert (gain >= -1e-5).all()
        moved = r.n_changed > 0
        assert moved.any()
        assert (gain[moved] > 0).all()
        # unchanged features are untouched, changed ones sit at E[X_c'i]
        assert torch.equal(r.x_cf[~r.mask], x[~r.mask])
        torch.testing.assert_close(r.x_cf[r.mask], st.expected(r.target)[r.mask])
        # probabilities are the two-tailed min(F, 1 - F) of the target class
        torch.testing.assert_close(r.prob, torch.minimum(st.cdf(x, r.target), st.sf(x, r.target)))
    # more permissive threshold -> superset of exceptional features
    a, b = exceptional_features(x, 'second', st, t=0.01), exceptional_features(x, 'second', st, t=0.1)
    assert (a.exceptional <= b.exceptional).all()


def test_partial_and_semifactual(phantom_setup):
    clf, _, feats = phantom_setup
    st = fit_feature_gmms(clf, feats)
    x = feats.features[:16]
    r = exceptional_features(x, 'second', st, t=0.1)
    assert torch.equal(partial_counterfactual_features(r, fraction=0.0), r.x)
    assert torch.equal(partial_counterfactual_features(r, fraction=1.0), r.x_cf)
    p1 = partial_counterfactual_features(r, n=1)
    for i in range(len(x)):
        ch = (p1[i] != r.x[i]).nonzero().flatten().tolist()
        if r.n_changed[i] > 0 and r.expected[i, r.order[i, 0]] != r.x[i, r.order[i, 0]]:
            assert ch == [int(r.order[i, 0])]
            assert r.prob[i, r.order[i, 0]] == r.prob[i][r.mask[i]].min()
    # partial changes are nested: more changes never lower the target logit
    i = torch.arange(len(x))
    with torch.no_grad():
        lg = [clf.head(partial_counterfactual_features(r, fraction=f))[i, r.target] for f in (0, .25, .5, .75, 1)]
    for a, b in zip(lg, lg[1:]): assert (b >= a - 1e-5).all()
    xs, n = semifactual_features(r, clf)
    with torch.no_grad(): pred = clf.head(xs).argmax(-1)
    assert (pred != r.target).all()                                # a semifactual never reaches c'
    assert (n <= r.n_changed).all()
    with pytest.raises(ValueError, match='exactly one'): partial_counterfactual_features(r)


def test_choose_target_rules():
    S = nn.Linear(2, 3)
    with torch.no_grad():
        S.weight.copy_(torch.tensor([[0., 0.], [-1., 0.5], [0., -2.]])); S.bias.copy_(torch.tensor([1., 0.6, 0.]))
    x = torch.zeros(4, 2)
    assert choose_target(x, S, 'second').tolist() == [1] * 4
    assert choose_target(x, S, 'piece').tolist() == [2] * 4
    assert choose_target(x, S, 'second', true_label=[0, 2, 0, 1]).tolist() == [1, 2, 1, 1]
    with pytest.raises(ValueError, match='unknown target rule'): choose_target(x, S, 'third')


def test_exceptional_bad_input(phantom_setup):
    clf, _, feats = phantom_setup
    st = fit_feature_gmms(clf, feats)
    x = feats.features[:3]
    with pytest.raises(ValueError, match=r'expected \[N, 128\]'): exceptional_features(x[:, :10], 1, st)
    with pytest.raises(ValueError, match='class indices'): exceptional_features(x, 5, st)
    with pytest.raises(ValueError, match='threshold t'): exceptional_features(x, 1, st, t=0.0)
    with pytest.raises(ValueError, match='non-finite'): exceptional_features(torch.full_like(x, float('nan')), 1, st)
    with pytest.raises(ValueError, match='head weight has shape'): exceptional_features(x, 1, st, weight=torch.zeros(3, 128))
    r = exceptional_features(x[0], 1, st)                          # a single [D] vector is one row
    assert r.x_cf.shape == (1, 128)


# ---------------------------------------------------------------- PIECE hurdle model

def test_hurdle_model_on_relu_features():
    torch.manual_seed(0)
    m = StandIn(d=5).eval()
    ims = torch.rand(120, 3, 16, 16) * 2 - 1
    f = collect_features(m, ims).features
    _balance_head(m, f)
    st = fit_feature_hurdles(m, ims)
    assert st.bern.shape == (2, 5) and ((st.bern >= 0) & (st.bern <= 1)).all()
    assert set(st.dist.unique().tolist()) <= {0, 1, 2, 3}
    x = f[:8]
    r = exceptional_features(x, 'second', st, t=0.05)
    assert r.model == 'hurdle'
    with torch.no_grad(): l0, l1 = m.head(r.x), m.head(r.x_cf)
    assert r.prob.shape == x.shape and (r.prob >= 0).all()
    # PIECE's probability: 1 - θ at zero
    th = st.bern[r.target]
    z = x == 0
    torch.testing.assert_close(r.prob[z], (1 - th)[z])
    with pytest.raises(ValueError, match='non-negative'):
        g = StandIn(d=5, relu=False); _balance_head(g, collect_features(g, ims).features); fit_feature_hurdles(g, ims)


# ---------------------------------------------------------------- CLI

def test_cli_fit_gmms(phantom_setup, tmp_path, capsys):
    from spruce_nb.cli import main
    from spruce_nb.classifier import save_classifier
    clf, _, _ = phantom_setup
    ck = tmp_path / 'classifier.pt'
    save_classifier(clf, ck)
    out = tmp_path / 'gmms.pt'
    args = ['fit-gmms', '--model', str(ck), '--data', 'phantoms:cxr', '--n', '96', '--out', str(out), '--device', 'cpu']
    assert main(args) == 0
    assert 'wrote' in capsys.readouterr().out
    st = FeatureGMMs.load(out, classifier=clf)
    assert st.num_classes == 2 and st.feature_dim == 128
    assert main(args) == 2                                          # refuses to overwrite
    assert 'exists' in capsys.readouterr().err
    assert main(args + ['--overwrite']) == 0
    capsys.readouterr()
    assert main(['fit-gmms', '--model', str(tmp_path / 'nope.pt'), '--out', str(tmp_path / 'x.pt')]) == 2
    assert 'not found' in capsys.readouterr().err


def test_progress_bars_obey_spruce_progress(monkeypatch, capsys):
    "Outside tests (is_tiny() false) collect_features shows a bar, which SPRUCE_PROGRESS=0 must silence (spruce fit-gmms)."
    import spruce_nb.piece as piece
    monkeypatch.setattr(piece, 'is_tiny', lambda: False)
    m = StandIn(d=3).eval(); ims = torch.rand(8, 3, 16, 16) * 2 - 1
    monkeypatch.setenv('SPRUCE_PROGRESS', '1'); capsys.readouterr()
    collect_features(m, ims, batch_size=4)
    assert 'features' in capsys.readouterr().err                    # the bar is there when allowed...
    monkeypatch.setenv('SPRUCE_PROGRESS', '0')
    collect_features(m, ims, batch_size=4)
    assert 'features' not in capsys.readouterr().err                # ...and gone when switched off

"""Classifier adapters (issue 27): any nn.Module ending in a linear head, wrapped as a spruce_nb Classifier, saved as an
architecture spec + weights (never a pickle), reloaded by every command; and the bad-input errors. Tiny models, 32 px, CPU."""
import sys, textwrap
import pytest, torch, torchvision, timm
from torch import nn
import torch.nn.functional as F

from spruce_nb.core import CheckpointError, save_checkpoint, save_image, to_unit
from spruce_nb.classifier import (Classifier, WrappedClassifier, ClassifierConfig, build_from_spec, check_spec, spec_name,
                                  save_classifier, load_classifier, predict, IMAGENET_MEAN, IMAGENET_STD)
from spruce_nb.piece import classifier_identity, FeatureGMMs
from spruce_nb.cli import main

S = 32
TV = {'library': 'torchvision', 'arch': 'resnet18', 'kwargs': {'num_classes': 2}}
CLASSES = ['normal', 'cardiomegaly']

def _x(n=3, s=S, seed=0):
    return torch.rand(n, 3, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1

def _tv(**kw): torch.manual_seed(0); return torchvision.models.resnet18(num_classes=2, **kw)


def _cases():
    "(name, make wrapped classifier) for the round trips: torchvision, timm (spec inferred), timm 1-channel, custom normalisation."
    return {
        'torchvision-resnet18': lambda: Classifier.wrap(_tv(), head='fc', classes=CLASSES, image_size=S, spec=TV),
        'timm-resnet10t': lambda: Classifier.wrap(timm.create_model('resnet10t', num_classes=2), classes=CLASSES, image_size=S),
        'timm-resnet10t-gray': lambda: Classifier.wrap(timm.create_model('resnet10t', num_classes=3, in_chans=1), image_size=S,
                                                       normalise=((0.5,), (0.25,))),
        'torchvision-mobilenet-01': lambda: Classifier.wrap(torchvision.models.mobilenet_v3_small(num_classes=2), head='classifier.3', image_size=S,
                                                            normalise=None, spec={'library': 'torchvision', 'arch': 'mobilenet_v3_small', 'kwargs': {'num_classes': 2}}),
    }

@pytest.mark.parametrize('name', list(_cases()))
def test_round_trip_identical_logits_and_identity(name, tmp_path):
    w = _cases()[name]().eval()
    x = _x()
    assert torch.equal(w.head(w.features(x)), w(x))                      # F = S∘C exactly
    p = tmp_path / 'wrapped.pt'
    save_classifier(w, p, metadata={'data': 'phantoms:cxr:cardiomegaly-vs-normal'})
    w2 = load_classifier(p, device='cpu')
    assert isinstance(w2, WrappedClassifier) and isinstance(w2, Classifier) and not w2.training
    assert torch.equal(w2(x), w(x)) and torch.equal(w2.features(x), w.features(x))
    assert classifier_identity(w2) == classifier_identity(w)            # GMMs / DISC models / evaluations stay tied to it
    assert (w2.arch, w2.classes, w2.image_size, w2.in_chans, w2.head_name, w2.normalisation) == \
           (w.arch, w.classes, w.image_size, w.in_chans, w.head_name, w.normalisation)
    assert w2.checkpoint.metadata['data'] == 'phantoms:cxr:cardiomegaly-vs-normal'
    raw = torch.load(p, weights_only=True)                                # plain data + tensors: no pickled module
    assert set(raw['state']) == {'model', 'adapter'} and isinstance(raw['state']['adapter'], dict)

@pytest.mark.parametrize('arch,head', [('densenet121', 'classifier'), ('efficientnet_b0', 'classifier.1'), ('convnext_tiny', 'classifier.2')])
def test_torchvision_families(arch, head, tmp_path):
    m = torchvision.models.get_model(arch, weights=None, num_classes=2).eval()
    w = Classifier.wrap(m, head=head, image_size=S, spec={'library': 'torchvision', 'arch': arch, 'kwargs': {'num_classes': 2}})
    assert Classifier.wrap(m, image_size=S).head_name == head             # the default finds it too (the last nn.Linear)
    save_classifier(w, tmp_path / 'a.pt')
    x = _x(1)                                                             # batch of 1: BatchNorm must be in eval mode
    assert torch.equal(load_classifier(tmp_path / 'a.pt', device='cpu')(x), w(x))

def test_wrapping_keeps_the_models_modes():
    m = _tv().eval()
    assert not Classifier.wrap(m, image_size=S, spec=TV).training and not any(x.training for x in m.modules())
    m.train(); m.layer1[0].bn1.eval()                                     # mixed modes, e.g. a frozen BatchNorm
    w = Classifier.wrap(m, image_size=S, spec=TV)
    assert w.training and m.training and not m.layer1[0].bn1.training and m.layer2[0].bn1.training

def test_logits_are_the_models_own_on_normalised_pixels():
    m = _tv().eval(); w = Classifier.wrap(m, head='fc', image_size=S, spec=TV)
    x = _x()
    ref = m((to_unit(x) - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
    assert torch.allclose(w(x), ref, atol=1e-5)
    assert w.head is m.fc and w.feature_dim == 512 and w.arch == 'torchvision:resnet18' and w.classes == ['0', '1']

def test_grayscale_model_gets_the_channel_mean():
    m = timm.create_model('resnet10t', num_classes=2, in_chans=1).eval()
    w = Classifier.wrap(m, image_size=S, normalise=((0.5,), (0.25,)))
    assert w.in_chans == 1 and w.head_name == 'fc' and w.spec == {'library': 'timm', 'arch': 'resnet10t', 'kwargs': {'num_classes': 2, 'in_chans': 1}}
    x = _x()
    assert torch.allclose(w(x), m((to_unit(x).mean(1, keepdim=True) - 0.5) / 0.25), atol=1e-5)

def test_timm_wrap_matches_native_classifier():
    native = Classifier('resnet10t', 2, image_size=S).eval()
    w = Classifier.wrap(native.model, image_size=S)                     # the same timm module, wrapped
    x = _x()
    assert w.head_name == 'fc' and torch.equal(w.features(x), native.features(x)) and torch.equal(w(x), native(x))

def test_features_differentiable_and_train_mode():
    w = Classifier.wrap(_tv(), head='fc', image_size=S, spec=TV)
    x = _x().requires_grad_()
    w.train(); w(x)[:, 1].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in w.parameters())
    assert not w.head._forward_pre_hooks and not w.head._forward_hooks      # hooks removed after use

def test_wrap_holds_the_users_model_and_predict_works():
    m = _tv(); w = Classifier.wrap(m, head='fc', classes=CLASSES, image_size=S, spec=TV)
    assert w.model is m and isinstance(m.fc, nn.Linear)                  # nothing replaced in the user's model
    logits, y = predict(w, (_x(4), torch.tensor([0, 1, 0, 1])))
    assert logits.shape == (4, 2) and w.predict_proba(_x(2)).sum(-1).allclose(torch.ones(2))


# ----- bad input -----

class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__(); self.body = nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, 8)); self.fc = nn.Linear(8, 8); self.unused = nn.Linear(8, 2)
    def forward(self, x): return self.fc(self.fc(self.body(x)))

class _TokenHead(nn.Module):
    def __init__(self):
        super().__init__(); self.conv = nn.Conv2d(3, 8, 3, padding=1); self.fc = nn.Linear(8, 2)
    def forward(self, x): return self.fc(self.conv(x).permute(0, 2, 3, 1)).mean((1, 2))   # linear on every pixel, then pooled

class _Tuple(nn.Module):
    def __init__(self):
        super().__init__(); self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, 2))
    def forward(self, x): return self.net(x), x

def test_bad_head_names_and_kinds():
    m = _tv()
    with pytest.raises(ValueError, match=r"no submodule 'fc2'.*'fc'"): Classifier.wrap(m, head='fc2', image_size=S)
    mob = torchvision.models.mobilenet_v3_small(num_classes=2)
    with pytest.raises(ValueError, match=r"not nn.Linear.*head='classifier.3'"): Classifier.wrap(mob, head='classifier', image_size=S)
    with pytest.raises(ValueError, match='not nn.Linear'): Classifier.wrap(m, head='layer1', image_size=S)
    with pytest.raises(ValueError, match='no nn.Linear layer'): Classifier.wrap(nn.Sequential(nn.Conv2d(3, 2, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()), image_size=S)
    with pytest.raises(ValueError, match='at least 2 classes'): Classifier.wrap(nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, 1)), image_size=S)
    with pytest.raises(ValueError, match='3 class names'): Classifier.wrap(m, head='fc', image_size=S, classes=['a', 'b', 'c'])

def test_output_must_be_head_of_features():
    m = _tv()
    with pytest.raises(ValueError, match='something runs after the head'): Classifier.wrap(nn.Sequential(m, nn.Softmax(-1)), head='0.fc', image_size=S)
    with pytest.raises(ValueError, match='something runs after the head'): Classifier.wrap(nn.Sequential(m, nn.ReLU(), nn.Linear(2, 2)), head='0.fc', image_size=S)
    mob = torchvision.models.mobilenet_v3_small(num_classes=2)
    with pytest.raises(ValueError, match='something runs after the head'): Classifier.wrap(mob, head='classifier.0', image_size=S)
    with pytest.raises(ValueError, match='never called'): Classifier.wrap(_TwoHeads(), head='unused', image_size=S)
    with pytest.raises(ValueError, match='called 2 times'): Classifier.wrap(_TwoHeads(), head='fc', image_size=S)
    with pytest.raises(ValueError, match=r'not a feature vector \[N, D\]'): Classifier.wrap(_TokenHead(), head='fc', image_size=S)
    with pytest.raises(ValueError, match='not a logits tensor'): Classifier.wrap(_Tuple(), head='net.1', image_size=S)

def test_declared_size_and_channels_are_checked():
    with pytest.raises(ValueError, match=r'declared size and channels.*\[2, 1, 32, 32\].*in_chans'): Classifier.wrap(_tv(), head='fc', image_size=S, in_chans=1)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(3 * S * S, 16), nn.ReLU(), nn.Linear(16, 2))
    assert Classifier.wrap(mlp, image_size=S).feature_dim == 16
    with pytest.raises(ValueError, match=r'declared size and channels.*image_size'): Classifier.wrap(mlp, image_size=64)
    with pytest.raises(ValueError, match='in_chans=2'): Classifier.wrap(_tv(), image_size=S, in_chans=2)
    with pytest.raises(ValueError, match="normalise='mnist'"): Classifier.wrap(_tv(), image_size=S, normalise='mnist')
    with pytest.raises(ValueError, match='one value per input channel'): Classifier.wrap(_tv(), image_size=S, normalise=((0.5, 0.5), (0.2, 0.2)))
    w = Classifier.wrap(_tv(), image_size=S, spec=TV)
    with pytest.raises(ValueError, match='built for 32x32'): w(_x(s=64))

def test_specs_validated():
    assert spec_name(TV) == 'torchvision:resnet18' and spec_name({'builder': 'a.b:c'}) == 'builder:a.b:c'
    with pytest.raises(ValueError, match='does not build this model'):
        Classifier.wrap(_tv(), image_size=S, spec={**TV, 'kwargs': {'num_classes': 3}})
    with pytest.raises(ValueError, match='download or read weights'): check_spec({**TV, 'kwargs': {'weights': 'DEFAULT'}})
    with pytest.raises(ValueError, match='download or read weights'): check_spec({'library': 'timm', 'arch': 'resnet10t', 'kwargs': {'pretrained': True}})
    with pytest.raises(ValueError, match="unknown library 'keras'"): build_from_spec({'library': 'keras', 'arch': 'resnet18'})
    with pytest.raises(ValueError, match=r"no classification model 'resnet19'.*close names"): build_from_spec({'library': 'torchvision', 'arch': 'resnet19'})
    with pytest.raises(ValueError, match="timm .* has no model 'resnet10x'"): build_from_spec({'library': 'timm', 'arch': 'resnet10x'})
    with pytest.raises(ValueError, match="unknown key"): check_spec({**TV, 'module': 'x'})
    with pytest.raises(ValueError, match="package.module:function"): check_spec({'builder': 'os.system'})
    with pytest.raises(ValueError, match="not both"): check_spec({**TV, 'builder': 'a:b'})

def test_unsaveable_wraps_refuse_to_pickle(tmp_path):
    with pytest.raises(ValueError, match=r"no architecture spec.*spec="): save_classifier(Classifier.wrap(_tv(), image_size=S), tmp_path / 'a.pt')
    w = Classifier.wrap(_tv(), image_size=S, spec=TV, normalise=lambda u: u * 2 - 1)
    assert torch.isfinite(w(_x())).all()
    with pytest.raises(ValueError, match='callable normalisation cannot be saved'): save_classifier(w, tmp_path / 'b.pt')
    assert not list(tmp_path.iterdir())

def _forged(tmp_path, adapter, weights=None):
    "A classifier checkpoint whose adapter is `adapter` (as a crafted or future file might hold)."
    w = Classifier.wrap(_tv(), head='fc', image_size=S, spec=TV)
    a = {**w.adapter(), **adapter}
    p = tmp_path / 'forged.pt'
    from spruce_nb.classifier import classifier_config_of
    save_checkpoint(p, {'model': weights if weights is not None else w.model.state_dict(), 'adapter': a}, kind='classifier', config=classifier_config_of(w))
    return p

def test_loading_unknown_library_arch_or_mismatched_weights(tmp_path):
    with pytest.raises(ValueError, match=r"forged.pt: cannot rebuild.*unknown library 'keras'"): load_classifier(_forged(tmp_path, {'library': 'keras'}), device='cpu')
    with pytest.raises(ValueError, match=r"forged.pt: cannot rebuild.*no classification model 'resnet19'"): load_classifier(_forged(tmp_path, {'arch': 'resnet19'}), device='cpu')
    with pytest.raises(CheckpointError, match='weights do not fit the torchvision:resnet34'): load_classifier(_forged(tmp_path, {'arch': 'resnet34'}), device='cpu')
    with pytest.raises(CheckpointError, match='adapter format'): load_classifier(_forged(tmp_path, {'format': 99}), device='cpu')
    with pytest.raises(ValueError, match='download or read weights'): load_classifier(_forged(tmp_path, {'kwargs': {'num_classes': 2, 'weights': 'DEFAULT'}}), device='cpu')


# ----- a user's own module through a builder -----

@pytest.fixture
def builder_module(tmp_path, monkeypatch):
    "An importable module `mynets_spruce_test` whose import leaves a marker file (to prove it was not imported)."
    pkg = tmp_path / 'src'; pkg.mkdir()
    marker = tmp_path / 'imported.txt'
    (pkg / 'mynets_spruce_test.py').write_text(textwrap.dedent(f"""
        import torch.nn as nn
        open({str(marker)!r}, 'a').write('imported\\n')
        class Net(nn.Module):
            def __init__(self, width=8, classes=2):
                super().__init__()
                self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
                self.out = nn.Linear(width, classes)
            def forward(self, x): return self.out(self.body(x))
        def make_net(width=8, classes=2): return Net(width, classes)
        """))
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.delenv('SPRUCE_TRUST_BUILDER', raising=False)
    yield marker
    sys.modules.pop('mynets_spruce_test', None)

def test_builder_spec_needs_trust(builder_module, tmp_path, monkeypatch):
    spec = {'builder': 'mynets_spruce_test:make_net', 'kwargs': {'width': 8, 'classes': 2}}
    w = WrappedClassifier.from_spec(spec, trust_builder=True, image_size=S, normalise=None).eval()
    assert w.in_chans == 1 and w.head_name == 'out' and w.arch == 'builder:mynets_spruce_test:make_net'
    p = tmp_path / 'own.pt'; save_classifier(w, p)
    sys.modules.pop('mynets_spruce_test'); builder_module.unlink()
    with pytest.raises(CheckpointError, match=r"builder 'mynets_spruce_test:make_net'.*runs its code.*trust_builder=True.*SPRUCE_TRUST_BUILDER=mynets_spruce_test:make_net"):
        load_classifier(p, device='cpu')
    assert not builder_module.exists() and 'mynets_spruce_test' not in sys.modules     # refused before importing anything
    assert main(['fit-gmms', '--model', str(p), '--n', '8', '--k', '2', '--out', str(tmp_path / 'g.pt')]) == 2   # the CLI refuses too
    with pytest.raises(CheckpointError, match='trust_builder'): load_classifier(p, device='cpu', trust_builder='other.module:fn')
    x = _x()
    assert torch.equal(load_classifier(p, device='cpu', trust_builder=True)(x), w(x))
    assert torch.equal(load_classifier(p, device='cpu', trust_builder='mynets_spruce_test:make_net')(x), w(x))
    monkeypatch.setenv('SPRUCE_TRUST_BUILDER', 'something:else, mynets_spruce_test:make_net')
    assert classifier_identity(load_classifier(p, device='cpu')) == classifier_identity(w)
    with pytest.raises(ValueError, match='cannot be imported'): build_from_spec({'builder': 'no_such_module_xyz:f'}, trust_builder=True)


# ----- the commands, unchanged -----

@pytest.fixture(scope='module')
def trained_wrapped(tmp_path_factory):
    "A torchvision ResNet-18 wrapped at 32 px, trained briefly on cxr phantoms (BatchNorm statistics re-estimated), saved."
    from spruce_nb.data import dataset_from_spec
    ds = dataset_from_spec('phantoms:cxr:cardiomegaly-vs-normal', split='train', size=S, n=32)
    x, y = ds.tensors()
    w = Classifier.wrap(_tv(), head='fc', classes=ds.classes, image_size=S, spec=TV)
    opt = torch.optim.Adam(w.parameters(), lr=1e-3); w.train()
    for _ in range(6): opt.zero_grad(); F.cross_entropy(w(x), y).backward(); opt.step()
    with torch.no_grad():
        for m in w.modules():
            if isinstance(m, nn.BatchNorm2d): m.reset_running_stats(); m.momentum = None
        w(x)
    w.eval()
    assert len(set(w(x).argmax(-1).tolist())) == 2
    p = tmp_path_factory.mktemp('wrapped') / 'resnet18.pt'
    save_classifier(w, p, metadata={'data': 'phantoms:cxr:cardiomegaly-vs-normal'})
    return w, p

def test_cli_fit_gmms_and_evaluate_classifier_with_wrapped(trained_wrapped, tmp_path, capsys):
    w, p = trained_wrapped
    out = tmp_path / 'gmms.pt'
    assert main(['fit-gmms', '--model', str(p), '--data', 'phantoms:cxr:cardiomegaly-vs-normal', '--n', '32', '--k', '2', '--out', str(out)]) == 0
    gm = FeatureGMMs.load(out)
    gm.check_classifier(load_classifier(p, device='cpu'))               # tied to the wrapped classifier's identity
    assert gm.arch == 'torchvision:resnet18' and gm.feature_dim == 512
    assert main(['evaluate-classifier', '--ckpt', str(p), '--data', 'phantoms:cxr:cardiomegaly-vs-normal', '--n', '16']) == 0
    assert '"accuracy"' in capsys.readouterr().out

def test_cli_explain_and_evaluate_with_wrapped(trained_wrapped, tmp_path, capsys):
    from spruce_nb.evaluate import tiny_model_dir
    from spruce_nb.data import PhantomDataset
    w, p = trained_wrapped
    md = tiny_model_dir(tmp_path / 'models')                              # G, E (and a ConvNeXt + its GMMs we do not use)
    (md / 'resnet18.pt').write_bytes(p.read_bytes())
    assert main(['fit-gmms', '--model', str(md / 'resnet18.pt'), '--n', '32', '--k', '2', '--out', str(md / 'gmms_resnet18.pt')]) == 0
    (md / 'classifier.pt').unlink(); (md / 'gmms.pt').unlink()
    (md / 'classifier.pt').write_bytes(p.read_bytes()); (md / 'gmms.pt').write_bytes((md / 'gmms_resnet18.pt').read_bytes())
    q = tmp_path / 'q.png'; save_image(PhantomDataset('cxr', n=4, size=S, classes=('normal', 'cardiomegaly'))[0][0], q)
    assert main(['explain', str(q), '--model-dir', str(md), '--out', str(tmp_path / 'ex'), '--steps', '2', '--no-pti']) == 0
    for s in ('_original.png', '_counterfactual.png', '.json'): assert (tmp_path / 'ex' / f'q{s}').exists()
    assert main(['evaluate', '--model-dir', str(md), '--classifier', 'resnet18.pt', '--gmms', 'gmms_resnet18.pt', '--n', '2', '--out', str(tmp_path / 'ev'),
                 '--no-pti', '--steps', '1', '--data-n', '48', '--n-real', '8', '--batch-size', '2', '--extractor', 'classifier']) == 0

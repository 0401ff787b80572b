"""Integration, CLI and bad-input tests of spruce_nb.classifier (tiny models, CPU, a few seconds each)."""
import json
import pytest, torch
import torch.nn.functional as F
from spruce_nb.core import load_checkpoint
from spruce_nb.classifier import (Classifier, ClassifierConfig, BatchAugment, class_weights, load_classifier, save_classifier,
                                  load_classifier_weights, train_classifier, evaluate_classifier, create_backbone)
from spruce_nb.data import dataset_from_spec
from spruce_nb.training import Callback
from spruce_nb.cli import main


def _x(n=3, s=32): return torch.rand(n, 3, s, s) * 2 - 1


@pytest.mark.parametrize('arch', ['convnext_micro', 'convnext_atto', 'resnet18'])
def test_split_is_exact_and_differentiable(arch):
    clf = Classifier(arch, 3, image_size=32).eval()
    x = _x()
    assert torch.equal(clf.head(clf.features(x)), clf(x))
    assert isinstance(clf.head, torch.nn.Linear) and clf.head.weight.shape == (3, clf.feature_dim)
    xg = x.clone().requires_grad_()
    clf(xg)[:, 0].sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_normalisation_inside_forward():
    clf = Classifier('convnext_micro', 2, image_size=32).eval()
    x = _x()
    ref = clf.model(((x + 1) / 2 - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))
    torch.testing.assert_close(clf(x), ref)


def test_bad_inputs():
    clf = Classifier('convnext_micro', 2, image_size=32)
    with pytest.raises(ValueError, match='32x32'): clf(_x(s=64))
    with pytest.raises(ValueError, match='expects \\[-1, 1\\]'): clf.predict_proba(_x() * 10)
    with pytest.raises(ValueError, match='class names'): Classifier('convnext_micro', 3, classes=['a', 'b'])
    with pytest.raises(ValueError, match='labels must be in'): evaluate_classifier(clf, (_x(), torch.tensor([0, 1, 2])))
    with pytest.raises(ValueError, match='no training images'): class_weights([1, 1, 1], 2)
    with pytest.raises(ValueError, match='unknown architecture'): Classifier('convnext_nonexistent')


def test_imagenet_weights_need_a_local_file(tmp_path):
    with pytest.raises(ValueError, match='local file') as e: Classifier('convnext_atto', 2, pretrained=True)
    assert 'torch.save' in str(e.value) and '--pretrained' in str(e.value)
    with pytest.raises(FileNotFoundError, match='not found'): Classifier('convnext_atto', 2, pretrained=tmp_path / 'missing.pth')
    with pytest.raises(ValueError, match='no ImageNet weights'): Classifier('convnext_micro', 2, pretrained=tmp_path / 'x.pth')
    src = create_backbone('convnext_atto', 1000); torch.save(src.state_dict(), tmp_path / 'w.pth')
    clf = Classifier('convnext_atto', 2, image_size=32, pretrained=tmp_path / 'w.pth')
    assert torch.equal(clf.model.stem[0].weight, src.stem[0].weight) and clf.head.out_features == 2
    torch.save(create_backbone('resnet18', 1000).state_dict(), tmp_path / 'r.pth')
    with pytest.raises(ValueError, match='does not hold weights'): Classifier('convnext_atto', 2, pretrained=tmp_path / 'r.pth')


def test_checkpoint_roundtrip_and_mismatch(tmp_path):
    clf = Classifier('convnext_micro', 2, classes=['normal', 'cardiomegaly'], image_size=32).eval()
    p = tmp_path / 'c.pt'
    save_classifier(clf, p, ClassifierConfig(), metadata={'test': {'accuracy': 0.5}})
    ck = load_checkpoint(p, kind='classifier')
    assert ck.config['arch'] == 'convnext_micro' and ck.config['image_size'] == 32 and ck.metadata['test']['accuracy'] == 0.5
    back = load_classifier(p, device='cpu'); x = _x()
    assert torch.equal(back(x), clf(x)) and back.classes == ['normal', 'cardiomegaly']
    with pytest.raises(ValueError, match="arch='resnet18'"): load_classifier(p, arch='resnet18')
    with pytest.raises(ValueError, match='num_classes=3'): load_classifier(p, num_classes=3)
    with pytest.raises(ValueError, match='does not match'): load_classifier_weights(Classifier('convnext_mini', 2, image_size=32), p)
    save_classifier(clf, tmp_path / 'h.pt', half=True)
    assert load_checkpoint(tmp_path / 'h.pt').state['model']['head.fc.weight'].dtype == torch.float16
    torch.testing.assert_close(load_classifier(tmp_path / 'h.pt', device='cpu')(x), clf(x), atol=2e-2, rtol=0)


def test_augment_batched_properties():
    x = _x(4)
    ident = BatchAugment((1, 1), 0, 0, 0, (1, 1), 0, 0, 0, ratio=(1, 1))
    torch.testing.assert_close(ident(x), x, atol=1e-5, rtol=0)
    flip = BatchAugment((1, 1), 1, 0, 0, (1, 1), 0, 0, 0, ratio=(1, 1))
    torch.testing.assert_close(flip(x), x.flip(-1), atol=1e-5, rtol=0)
    a = BatchAugment()
    y1, y2 = a(x, torch.Generator().manual_seed(0)), a(x, torch.Generator().manual_seed(0))
    assert torch.equal(y1, y2) and y1.shape == x.shape and y1.min() >= -1 and y1.max() <= 1 and not torch.equal(y1, x)


def _phantoms(n, split):
    return dataset_from_spec('phantoms:cxr', split=split, n=n, size=32)


def test_training_resumes_exactly(tmp_path):
    tr, va = _phantoms(48, 'train'), _phantoms(16, 'val')
    cfg = ClassifierConfig.phantom_preset(image_size=32, batch_size=16, epochs=2, warmup_epochs=1, classes=tr.classes)
    full, hist = train_classifier(cfg, tr, va, tmp_path / 'full')
    assert any('val_loss' in h for h in hist)
    class Crash(Callback):
        def after_step(self, trainer):
            if trainer.step == 5: raise KeyboardInterrupt('simulated kill')
    with pytest.raises(KeyboardInterrupt):                                  # killed at step 5 of 6; last.pt is from step 3
        train_classifier(cfg, tr, va, tmp_path / 'cut', callbacks=[Crash()])
    assert load_checkpoint(tmp_path / 'cut' / 'last.pt').metadata['step'] == 3
    with pytest.raises(FileExistsError, match='resume'): train_classifier(cfg, tr, va, tmp_path / 'cut')
    resumed, _ = train_classifier(cfg, tr, va, tmp_path / 'cut', resume=True)
    for (k, a), b in zip(full.state_dict().items(), resumed.state_dict().values()): assert torch.equal(a, b), k
    with pytest.raises(ValueError, match='different configuration'):
        train_classifier(cfg.replace(lr=1e-3), tr, va, tmp_path / 'cut', resume=True)


def test_training_rejects_bad_data():
    tr = _phantoms(32, 'train')
    cfg = ClassifierConfig.phantom_preset(image_size=64, batch_size=16, epochs=1, classes=tr.classes)
    with pytest.raises(ValueError, match='spatial size'): train_classifier(cfg, tr, max_steps=1)
    bad = torch.utils.data.TensorDataset(torch.rand(32, 3, 32, 32) * 2 - 1, torch.arange(32) % 3)
    with pytest.raises(ValueError, match='labels must be in'): train_classifier(cfg.replace(image_size=32), bad, max_steps=1)


def test_cli_train_and_evaluate(tmp_path, capsys):
    out = tmp_path / 'run'
    args = ['train-classifier', '--data', 'phantoms:cxr', '--image-size', '32', '--n-train', '32', '--n-val', '16', '--n-test', '16',
            '--epochs', '1', '--batch-size', '16', '--out', str(out)]
    assert main(args) == 0
    assert {'classifier.pt', 'confusion.png', 'report.json', 'last.pt', 'history.json'} <= {p.name for p in out.iterdir()}
    meta = load_checkpoint(out / 'classifier.pt').metadata
    assert set(meta['test']) >= {'accuracy', 'precision', 'recall', 'f1', 'confusion', 'report'}
    assert main(args) == 2                                                # exists: refuses to overwrite
    assert 'exists' in capsys.readouterr().err
    assert main(['evaluate-classifier', '--ckpt', str(out / 'classifier.pt'), '--n', '16', '--out', str(tmp_path / 'ev')]) == 0
    rep = json.loads((tmp_path / 'ev' / 'report.json').read_text())
    assert rep['n'] == 16 and len(rep['confusion']) == 2
    before = (out / 'report.json').read_bytes()                             # pointed at the training run: its report is kept
    assert main(['evaluate-classifier', '--ckpt', str(out / 'classifier.pt'), '--n', '16', '--out', str(out)]) == 2
    assert (out / 'report.json').read_bytes() == before and 'overwrite' in capsys.readouterr().err
    assert main(['evaluate-classifier', '--ckpt', str(out / 'classifier.pt'), '--n', '16', '--out', str(tmp_path / 'ev'), '--overwrite']) == 0
    assert main(['train-classifier', '--out', str(tmp_path / 'x'), '--trades-eps', '300']) == 2
    assert main(['evaluate-classifier', '--ckpt', str(tmp_path / 'missing.pt')]) == 2

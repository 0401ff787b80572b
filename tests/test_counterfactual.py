"""SPRUCE counterfactuals: the objective, the batched optimiser, the Spruce pipeline on small real components, the CLI,
and bad input. Small models (32 px) keep this file fast on one CPU core."""
import json, math, warnings
from pathlib import Path
import pytest, torch
import numpy as np
from torch import nn

from spruce_nb.core import seed_everything, save_image
from spruce_nb.counterfactual import (CounterfactualConfig, spruce_loss_terms, spruce_objective, optimise_latents,
                                      Explanation, Spruce)

RES = 32
ZERO_LPIPS = lambda a, b: torch.zeros(len(a))

def _fit_briefly(clf, ds, steps=25):
    "A few full-batch Adam steps so the classifier predicts every class (GMMs are fitted per predicted class)."
    x = torch.stack([ds[i][0] for i in range(len(ds))]); y = torch.as_tensor([ds[i][1] for i in range(len(ds))])
    opt = torch.optim.Adam(clf.parameters(), lr=3e-3); clf.train()
    for _ in range(steps):
        opt.zero_grad(); nn.functional.cross_entropy(clf(x), y).backward(); opt.step()
    clf.eval()
    assert len(set(clf(x).argmax(-1).tolist())) == len(ds.classes), 'briefly trained classifier still predicts one class only'
    return clf

@pytest.fixture(scope='module')
def parts():
    "A tiny classifier, generator, encoder and GMMs on 32-px chest phantoms (untrained G/E: structure, not quality)."
    from spruce_nb.classifier import Classifier
    from spruce_nb.stylegan2 import tiny_config
    from spruce_nb.e4e import build_encoder, E4EConfig
    from spruce_nb.piece import fit_feature_gmms
    from spruce_nb.data import PhantomDataset
    seed_everything(0)
    ds = PhantomDataset('cxr', n=64, size=RES, classes=('normal', 'cardiomegaly'))
    clf = _fit_briefly(Classifier('convnext_micro', num_classes=2, classes=ds.classes, image_size=RES), ds)
    G = tiny_config(RES).make_generator().eval()
    E = build_encoder(G, E4EConfig(resolution=RES)).eval()
    gm = fit_feature_gmms(clf, ds, k=2)
    imgs = torch.stack([ds[i][0] for i in range(4)])
    return clf, G, E, gm, ds, imgs

def test_terms_are_per_image_and_sum_reduced():
    a, b = torch.zeros(2, 3, 8, 8), torch.ones(2, 3, 8, 8) * 0.5
    ws, wp = torch.ones(2, 4, 5), torch.zeros(2, 4, 5)
    t = spruce_loss_terms(a, torch.zeros(2, 3), torch.ones(2, 3), b, ws, wp, lpips_fn=ZERO_LPIPS)
    assert t['piece'].tolist() == [3.0, 3.0] and t['latent'].tolist() == [20.0, 20.0] and t['image'].tolist() == [96.0, 96.0]
    cfg = CounterfactualConfig(lambda_perc=1, lambda_latent=0.5, lambda_image=0.25)
    assert spruce_objective(t, cfg).tolist() == [3 + 10 + 24.0] * 2

def test_scaling_keeps_the_balance():
    c = CounterfactualConfig()
    s = c.scaled_to(64, 10 * 64)
    # the image term for a 64-px image with the scaled λ equals that of a 256-px image with the thesis λ (same mean |diff|)
    assert math.isclose(s.lambda_image * 3 * 64 * 64, c.lambda_image * 3 * 256 * 256)
    assert math.isclose(s.lambda_latent * 640, c.lambda_latent * 14 * 512)

def test_batching_equals_one_by_one(parts):
    "Per-image losses and per-image clipping make a batched optimisation identical to separate ones."
    clf, G, E, gm, ds, imgs = parts
    render = lambda ws: G.synthesis(ws, noise_mode='const')
    ws_p = G.mapping(torch.randn(3, G.z_dim)).detach()
    x_t = torch.randn(3, clf.feature_dim)
    tgt = torch.tensor([0, 1, 1])
    cfg = CounterfactualConfig(steps=4, lr=0.05, grad_clip=0.5)
    with torch.no_grad(): I = render(ws_p)
    full = optimise_latents(render, clf, I, ws_p, x_t, tgt, cfg, lpips_fn=ZERO_LPIPS, show_progress=False)
    for i in range(3):
        one = optimise_latents(render, clf, I[i:i+1], ws_p[i:i+1], x_t[i:i+1], tgt[i:i+1], cfg, lpips_fn=ZERO_LPIPS, show_progress=False)
        # Batched and single convolutions round differently (~1e-7); Adam divides by sqrt(v), so in a latent element whose gradient
        # is nearly zero that rounding can move a step by a visible fraction of lr (seen: 3e-4 in 1 of 512 elements). Coupling
        # between images (a batch-level norm, a loss mixed across images) moves every element by O(lr) per step, far above this bound.
        torch.testing.assert_close(one.ws[0], full.ws[i], rtol=1e-3, atol=0.1 * cfg.lr)
        assert (one.ws[0] - full.ws[i]).abs().mean() < 1e-4, 'more than rounding: the images of a batch influence each other'
        torch.testing.assert_close(one.probs[:, 0], full.probs[:, i], rtol=1e-3, atol=1e-4)

def test_feature_term_pulls_features_to_target(parts):
    clf, G, E, gm, ds, imgs = parts
    render = lambda ws: G.synthesis(ws, noise_mode='const')
    ws_p = G.mapping(torch.randn(2, G.z_dim)).detach()
    with torch.no_grad(): I = render(ws_p); x0 = clf.features(I)
    x_t = x0 + torch.randn_like(x0)
    tr = optimise_latents(render, clf, I, ws_p, x_t, torch.tensor([1, 0]), CounterfactualConfig(steps=30, lr=0.05, lambda_perc=0),
                          lpips_fn=ZERO_LPIPS, show_progress=False)
    assert (tr.losses['piece'][-1] < tr.losses['piece'][0]).all()
    assert tr.ws_path.shape[0] == tr.probs.shape[0] == 31 and tr.ws_path.dtype == torch.float16

def test_nan_loss_stops_only_that_image(parts):
    clf, G, E, gm, ds, imgs = parts
    render = lambda ws: G.synthesis(ws, noise_mode='const')
    ws_p = G.mapping(torch.randn(2, G.z_dim)).detach()
    with torch.no_grad(): I = render(ws_p)
    x_t = torch.zeros(2, clf.feature_dim); x_t[1] = float('nan')
    with pytest.warns(UserWarning, match='non-finite'):
        tr = optimise_latents(render, clf, I, ws_p, x_t, torch.tensor([1, 1]), CounterfactualConfig(steps=5), lpips_fn=ZERO_LPIPS, show_progress=False)
    assert tr.status == ['ok', 'nan']
    assert torch.equal(tr.ws[1], ws_p[1]) and not torch.equal(tr.ws[0], ws_p[0])

def test_explain_end_to_end_without_pti(parts, tmp_path):
    clf, G, E, gm, ds, imgs = parts
    sp = Spruce(clf, G, E, gm, config=CounterfactualConfig(steps=3), use_pti=False, lpips_fn=ZERO_LPIPS)
    pred = clf(imgs).argmax(-1)
    tgt = 1 - pred
    ex = sp.explain(imgs, target=tgt, show_progress=False)
    assert isinstance(ex, Explanation) and len(ex) == 4
    assert ex.counterfactual.shape == imgs.shape and ex.probs.shape == (4, 4, 2)
    assert torch.equal(ex.target, tgt) and torch.equal(ex.source, pred)
    assert ex.counterfactual.min() >= -1 and ex.counterfactual.max() <= 1
    s = ex.summary(0)
    assert set(s) >= {'source', 'target', 'flipped', 'confidence', 'crossing_step', 'trajectory', 'l1'} and len(s['trajectory']) == 4
    files = ex.save(tmp_path)
    assert all(f.exists() for f in files) and json.loads((tmp_path / '0000.json').read_text())['target'] == s['target']
    with pytest.raises(FileExistsError, match='overwrite'): ex.save(tmp_path)
    fig = ex.show(0); assert len(fig.axes) >= 6

def test_explain_accepts_names_and_rejects_bad_targets(parts):
    clf, G, E, gm, ds, imgs = parts
    sp = Spruce(clf, G, E, gm, config=CounterfactualConfig(steps=1), use_pti=False, lpips_fn=ZERO_LPIPS)
    pred = clf(imgs[:1]).argmax(-1).item()
    other = ds.classes[1 - pred]
    ex = sp.explain(imgs[:1], target=other, show_progress=False)
    assert ex.classes[int(ex.target[0])] == other
    with pytest.raises(ValueError, match='unknown class'): sp.explain(imgs[:1], target='pneumothorax')
    with pytest.raises(ValueError, match='already predicted'): sp.explain(imgs[:1], target=ds.classes[pred])
    with pytest.raises(ValueError, match='px'): sp.explain(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match='expects \\[-1, 1\\]'): sp.explain(imgs[:1] * 5)
    # a misclassified image takes its true label as target (PIECE)
    ex = sp.explain(imgs[:1], target=other, true_label=[1 - pred], show_progress=False)
    assert int(ex.target[0]) == 1 - pred

def test_any_timm_classifier_with_features_and_head(parts):
    "Not only ConvNeXt: a timm ResNet works through the same features/head interface."
    from spruce_nb.classifier import Classifier
    from spruce_nb.piece import fit_feature_gmms
    _, G, E, _, ds, imgs = parts
    clf = _fit_briefly(Classifier('resnet10t', num_classes=2, classes=ds.classes, image_size=RES), ds)
    gm = fit_feature_gmms(clf, ds, k=2)
    sp = Spruce(clf, G, E, gm, config=CounterfactualConfig(steps=2), use_pti=False, lpips_fn=ZERO_LPIPS)
    ex = sp.explain(imgs[:2], show_progress=False)
    assert ex.probs.shape == (3, 2, 2) and (ex.target != ex.source).all()

def test_multiclass_any_to_any(parts):
    from spruce_nb.classifier import Classifier
    from spruce_nb.piece import fit_feature_gmms
    from spruce_nb.data import PhantomDataset
    _, G, E, _, _, _ = parts
    ds3 = PhantomDataset('cxr', n=48, size=RES, classes=('normal', 'cardiomegaly', 'opacity'))
    clf = _fit_briefly(Classifier('convnext_micro', num_classes=3, classes=ds3.classes, image_size=RES), ds3, steps=40)
    gm = fit_feature_gmms(clf, ds3, k=2)
    imgs = torch.stack([ds3[i][0] for i in range(3)])
    pred = clf(imgs).argmax(-1)
    tgt = (pred + torch.tensor([1, 2, 1])) % 3
    ex = Spruce(clf, G, E, gm, config=CounterfactualConfig(steps=2), use_pti=False, lpips_fn=ZERO_LPIPS).explain(imgs, target=tgt, show_progress=False)
    assert torch.equal(ex.target, tgt) and ex.probs.shape[-1] == 3

def test_cli_explain_writes_outputs_and_refuses_overwrite(parts, tmp_path, capsys):
    from spruce_nb.classifier import save_classifier
    from spruce_nb.stylegan2 import export_generator
    from spruce_nb.e4e import save_encoder
    from spruce_nb.cli import main
    clf, G, E, gm, ds, imgs = parts
    md = tmp_path / 'models'; md.mkdir()
    save_classifier(clf, md / 'classifier.pt'); export_generator(G, md / "generator.pt"); save_encoder(E, md / 'encoder.pt', G=G); gm.save(md / 'gmms.pt')
    files = []
    for i in range(2):
        f = tmp_path / f'img{i}.png'; save_image(imgs[i], f); files.append(str(f))
    out = tmp_path / 'out'
    assert main(['explain', *files, '--model-dir', str(md), '--out', str(out), '--steps', '2', '--no-pti']) == 0
    for i in range(2):
        for s in ('_original.png', '_counterfactual.png', '_diff.png', '.json'): assert (out / f'img{i}{s}').exists()
    assert 'flipped' in capsys.readouterr().out
    stamp = {f: f.stat().st_mtime_ns for f in out.iterdir()}
    assert main(['explain', *files, '--model-dir', str(md), '--out', str(out), '--steps', '2', '--no-pti']) == 0   # resume: nothing to do
    assert 'nothing to do' in capsys.readouterr().out and stamp == {f: f.stat().st_mtime_ns for f in out.iterdir()}
    other = tmp_path / 'other'; other.mkdir(); save_image(imgs[2], other / 'img0.png')                    # same name, another image
    assert main(['explain', str(other / 'img0.png'), '--model-dir', str(md), '--out', str(out), '--steps', '2', '--no-pti']) == 2
    assert 'another image' in capsys.readouterr().err and stamp == {f: f.stat().st_mtime_ns for f in out.iterdir()}
    (out / 'img1.json').unlink()                                                  # explain's own set without its record (a killed run): redone
    assert main(['explain', *files, '--model-dir', str(md), '--out', str(out), '--steps', '2', '--no-pti']) == 0
    assert '1 already done' in capsys.readouterr().out and (out / 'img1.json').exists()
    (out / 'img1.json').unlink(); (out / '.spruce-outputs.json').unlink()        # files without record or marker: nobody's known set, refused
    assert main(['explain', *files, '--model-dir', str(md), '--out', str(out), '--steps', '2', '--no-pti']) == 2
    assert 'no record' in capsys.readouterr().err
    assert main(['explain', *files, '--model-dir', str(md), '--out', str(out), '--steps', '2', '--no-pti', '--overwrite']) == 0
    inp = tmp_path / 'inp'; inp.mkdir(); save_image(imgs[0], inp / 'foo.png'); save_image(imgs[1], inp / 'foo_original.png')
    before = (inp / 'foo_original.png').read_bytes()
    assert main(['explain', str(inp / 'foo.png'), str(inp / 'foo_original.png'), '--model-dir', str(md), '--out', str(inp), '--no-pti', '--overwrite']) == 2
    assert 'input file' in capsys.readouterr().err and (inp / 'foo_original.png').read_bytes() == before
    from PIL import Image
    a = np.zeros((64, 64), np.float32); a[3, 5] = np.nan
    Image.fromarray(a, mode='F').save(tmp_path / 'nan.tif')
    assert main(['explain', str(tmp_path / 'nan.tif'), '--model-dir', str(md), '--out', str(tmp_path / 'o2'), '--no-pti']) == 2
    assert 'nan.tif' in capsys.readouterr().err and not (tmp_path / 'o2').exists()
    save_image(torch.zeros(3, 4, 4), tmp_path / 'tiny.png')
    assert main(['explain', str(tmp_path / 'tiny.png'), '--model-dir', str(md), '--out', str(tmp_path / 'o3'), '--no-pti']) == 2
    assert 'too small' in capsys.readouterr().err
    src = int(clf(imgs[:1]).argmax())
    assert main(['explain', *files, '--model-dir', str(md), '--out', str(tmp_path / 'o4'), '--no-pti', '--target', clf.classes[src]]) == 2
    err = capsys.readouterr().err
    assert 'already predicted' in err and 'img0.png' in err and not (tmp_path / 'o4').exists()
    assert main(['explain', str(tmp_path / 'nope.png'), '--model-dir', str(md), '--out', str(out)]) == 2
    bad = tmp_path / 'bad'
    for flags in (['--steps', '0'], ['--lambda-perc', 'nan'], ['--lambda-image', '-1'], ['--batch-size', '0'], ['--pti-lr', '0'],
                  ['--target', 'pneumothorax'], ['--target', '7'], ['--no-pti', '--pti-steps', '5']):
        assert main(['explain', *files, '--model-dir', str(md), '--out', str(bad), *flags]) == 2, flags
        assert not bad.exists() or not any(bad.iterdir()), flags                       # refused before any work
    by_index = tmp_path / 'by_index'
    tgt = 1 - int(clf(imgs[:1]).argmax())
    assert main(['explain', files[0], '--model-dir', str(md), '--out', str(by_index), '--steps', '2', '--no-pti', '--target', str(tgt)]) == 0
    assert json.loads((by_index / 'img0.json').read_text())['target'] == clf.classes[tgt]
    anim = tmp_path / 'anim'
    assert main(['explain', *files, '--model-dir', str(md), '--out', str(anim), '--steps', '3', '--no-pti', '--animate']) == 0
    from PIL import Image
    for i in range(2):
        with Image.open(anim / f'img{i}_path.gif') as g: assert g.n_frames == 4 and g.is_animated   # steps 0..3
    assert main(['explain', *files, '--model-dir', str(tmp_path), '--out', str(tmp_path / 'o5')]) == 2  # missing models

def test_inversion_is_reusable_across_classifiers(parts):
    "The inversion (pivots, tuned generators) does not depend on the classifier: explain() can reuse it."
    clf, G, E, gm, ds, imgs = parts
    sp = Spruce(clf, G, E, gm, config=CounterfactualConfig(steps=2), use_pti=False, lpips_fn=ZERO_LPIPS)
    inv = sp.invert(imgs[:2])
    a = sp.explain(imgs[:2], inversion=inv, show_progress=False)
    b = sp.explain(imgs[:2], show_progress=False)
    torch.testing.assert_close(a.counterfactual, b.counterfactual)
    with pytest.raises(ValueError, match='other images'): sp.explain(imgs[2:4], inversion=inv)

def test_explain_with_pti_uses_tuned_generators(parts):
    "With PTI the reconstruction comes from the per-image tuned generators and is closer to the input than G's."
    from spruce_nb.pti import PTIConfig
    clf, G, E, gm, ds, imgs = parts
    sp = Spruce(clf, G, E, gm, config=CounterfactualConfig(steps=2), use_pti=True,
                pti_config=PTIConfig(steps=15, lr=3e-3, locality=False, lpips_threshold=0.0), lpips_fn=ZERO_LPIPS)
    inv = sp.invert(imgs[:2])
    with torch.no_grad(): plain = G.synthesis(inv.ws_pivot, noise_mode='const'); tuned = inv.render(inv.ws_pivot)
    x = sp._prepare(imgs[:2])
    assert ((tuned - x) ** 2).mean() < ((plain - x) ** 2).mean()
    ex = sp.explain(imgs[:2], inversion=inv, show_progress=False)
    torch.testing.assert_close(ex.reconstruction, tuned.clamp(-1, 1))
    path = ex.path_images([0, 2])                     # the path is drawn with each image's tuned generator (fp16 latents)
    torch.testing.assert_close(path[0], ex.reconstruction, atol=2e-2, rtol=0)
    torch.testing.assert_close(path[1], ex.counterfactual, atol=2e-2, rtol=0)

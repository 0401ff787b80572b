"""spruce_nb.data: phantom determinism, exact counterfactuals, learnability, CLI round trip, loaders and bad input."""
import csv, itertools, json, warnings
from pathlib import Path
import numpy as np, pytest, torch
from PIL import Image
from spruce_nb.data import (PHANTOM_CLASSES, CAUSAL_VARIABLES, make_phantoms, phantom_counterfactuals, phantom_seeds,
                            label_from_causal, PhantomDataset, dataset_from_spec, phantom_task, parse_phantom_task,
                            ImageFolderDataset, MedMNISTDataset, load_image, stratified_split, write_phantom_folder, fit_oracle)
from spruce_nb.cli import main
from spruce_nb.anatomy import has_template

NEEDS_NILEARN = pytest.mark.skipif(not has_template(), reason="'mri-anatomy' reads the MNI ICBM152 template inside nilearn: pip install nilearn")
MODS = [pytest.param(m, marks=NEEDS_NILEARN) if m == 'mri-anatomy' else m for m in PHANTOM_CLASSES]

@pytest.mark.parametrize('mod', MODS)
def test_determinism(mod):
    cl = PHANTOM_CLASSES[mod]
    a = make_phantoms(mod, 8, 32, seed=5, classes=cl)
    b = make_phantoms(mod, 8, 32, seed=5, classes=cl)
    assert a.images.numpy().tobytes() == b.images.numpy().tobytes()
    assert torch.equal(a.causal, b.causal) and torch.equal(a.seeds, b.seeds)
    c = make_phantoms(mod, 8, 32, seed=6, classes=cl)
    assert all(not torch.equal(a.images[i], c.images[i]) for i in range(8))     # different seeds differ
    assert not torch.equal(a.images[0], a.images[len(cl)])                     # different patients, same class differ
    # an item does not depend on what it is batched with
    d = make_phantoms(mod, 3, 32, seed=5, classes=cl, start=5)
    assert torch.equal(d.images, a.images[5:])

@pytest.mark.parametrize('mod', MODS)
def test_counterfactual_only_inside_mask(mod):
    cl = PHANTOM_CLASSES[mod]
    seeds = phantom_seeds(6, 11)
    for src, tgt in itertools.product(cl, cl):
        r = phantom_counterfactuals(mod, seeds, src, tgt, size=64)
        diff = (r['images'] - r['counterfactuals']).abs().amax(1)
        assert diff[~r['masks']].max().item() == 0 if (~r['masks']).any() else True, (src, tgt)
        assert label_from_causal(mod, r['cf_causal']) == [tgt] * 6, (src, tgt)
        assert label_from_causal(mod, r['causal']) == [src] * 6
        if src == tgt: assert not r['masks'].any() and torch.equal(r['images'], r['counterfactuals'])
        else: assert r['masks'].any(1).any(1).all() and (diff > 0).any(1).any(1).all(), (src, tgt)   # the edit is real

def test_dataset_api():
    ds = PhantomDataset('cxr', n=10, size=32, seed=0)
    x, y = ds[1]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and -1 <= x.min() and x.max() <= 1 and y == 1
    assert ds.classes == ('normal', 'cardiomegaly') and ds.task == 'cxr:cardiomegaly-vs-normal'
    cv = ds.causal_variables(1); assert set(cv) == {'ctr', 'opacity'} and cv['ctr'] > 0.5
    cf, m = ds.counterfactual(1, 'normal'), ds.mask(1, 'normal')
    assert cf.shape == x.shape and m.shape == (32, 32) and m.dtype == torch.bool
    assert ((cf - x).abs().amax(0)[~m] == 0).all() and (cf != x).any()
    assert ds.ground_truth(1, 0)['cf_causal']['ctr'] < 0.5
    with pytest.raises(IndexError): ds[10]
    assert torch.equal(ds[-1][0], ds[9][0])
    tr, va = PhantomDataset('cxr', 50, 32, split='train'), PhantomDataset('cxr', 50, 32, split='val')
    assert not set(tr.seeds.tolist()) & set(va.seeds.tolist())

def test_learnable_above_chance():
    from sklearn.linear_model import LogisticRegression
    feats = lambda b: torch.nn.functional.adaptive_avg_pool2d(b.images[:, :1], 16).flatten(1).numpy()
    tr, te = make_phantoms('cxr', 300, 64, 0, split='train'), make_phantoms('cxr', 200, 64, 0, split='test')
    acc = LogisticRegression(C=0.05, max_iter=300).fit(feats(tr), tr.labels.numpy()).score(feats(te), te.labels.numpy())
    assert acc > 0.8, acc
    for mod in ('oct', 'mri'):
        tr, te = make_phantoms(mod, 200, 64, 0, split='train'), make_phantoms(mod, 120, 64, 0, split='test')
        acc = LogisticRegression(C=0.05, max_iter=300).fit(feats(tr), tr.labels.numpy()).score(feats(te), te.labels.numpy())
        assert acc > 0.25 + 0.15, (mod, acc)

def test_oracle_reads_ctr():
    o = fit_oracle('cxr', n=400, n_test=100)
    assert o.error['ctr'] < 0.04, o.error

def test_cli_round_trip(tmp_path):
    out = tmp_path / 'ph'
    assert main(['phantoms', '--modality', 'cxr', '--n', '20', '--size', '32', '--seed', '3', '--out', str(out)]) == 0
    rows = list(csv.DictReader(open(out / 'labels.csv')))
    assert len(rows) == 20 and set(rows[0]) >= {'file', 'label', 'class', 'seed', 'ctr', 'opacity'}
    ds = ImageFolderDataset(out)
    ref = make_phantoms('cxr', 20, 32, seed=3)
    bylabel = {r['file']: int(r['label']) for r in rows}
    for f, l in zip(ds.files, ds.labels.tolist()):
        assert bylabel[str(f.relative_to(out))] == l
    idx = [int(f.stem.split('_')[-1]) for f in ds.files]
    assert torch.equal(ds.labels, ref.labels[idx])
    assert torch.equal(torch.stack([ds[i][0] for i in range(len(ds))]), ref.images[idx])
    # refuses to overwrite a non-empty folder; --overwrite replaces one it wrote; never deletes a foreign folder
    assert main(['phantoms', '--n', '4', '--size', '32', '--out', str(out)]) == 2
    assert main(['phantoms', '--n', '4', '--size', '32', '--out', str(out), '--overwrite']) == 0
    assert len(ImageFolderDataset(out)) == 4
    (tmp_path / 'mine').mkdir(); (tmp_path / 'mine' / 'thesis.txt').write_text('precious')     # the output policy: beside a user's file, never over it
    assert main(['phantoms', '--n', '4', '--size', '32', '--out', str(tmp_path / 'mine'), '--overwrite']) == 0
    assert main(['phantoms', '--n', '6', '--size', '32', '--out', str(tmp_path / 'mine'), '--overwrite']) == 0
    assert (tmp_path / 'mine' / 'thesis.txt').read_text() == 'precious' and len(ImageFolderDataset(tmp_path / 'mine')) == 6
    (tmp_path / 'mine2').mkdir(); (tmp_path / 'mine2' / 'labels.csv').write_text('my labels')   # a colliding file is refused, even with --overwrite
    assert main(['phantoms', '--n', '4', '--size', '32', '--out', str(tmp_path / 'mine2'), '--overwrite']) == 2
    assert sorted(p.name for p in (tmp_path / 'mine2').iterdir()) == ['labels.csv'] and (tmp_path / 'mine2' / 'labels.csv').read_text() == 'my labels'
    # the other modalities export too
    assert main(['phantoms', '--modality', 'oct', '--n', '8', '--size', '32', '--out', str(tmp_path / 'oct')]) == 0
    assert ImageFolderDataset(tmp_path / 'oct').classes == PHANTOM_CLASSES['oct']

def test_spec_parser(tmp_path):
    ds = dataset_from_spec('phantoms:cxr:normal,opacity', split='test', size=32, n=6)
    assert isinstance(ds, PhantomDataset) and ds.classes == ('normal', 'opacity') and ds.split == 'test'
    assert parse_phantom_task('phantoms:cxr'.split(':', 1)[1]) == ('cxr', ('normal', 'cardiomegaly'))
    assert parse_phantom_task(phantom_task('mri', PHANTOM_CLASSES['mri'])) == ('mri', PHANTOM_CLASSES['mri'])
    write_phantom_folder(tmp_path / 'f', n=20, size=32)
    tr = dataset_from_spec(str(tmp_path / 'f'), split='train', size=None)
    te = dataset_from_spec(f'folder:{tmp_path / "f"}', split='test', size=None)
    assert isinstance(tr, ImageFolderDataset) and len(tr) == 16 and len(te) == 2
    assert not set(tr.files) & set(te.files)
    with pytest.raises(ValueError, match='phantoms:cxr'): dataset_from_spec('no/such/thing')

def test_split_file_is_reused(tmp_path):
    write_phantom_folder(tmp_path / 'f', n=40, size=32)
    a = ImageFolderDataset(tmp_path / 'f', split='val', seed=0)
    assert a.split_file == tmp_path / 'f' / 'splits.json'
    b = ImageFolderDataset(tmp_path / 'f', split='val', seed=123)          # the saved split wins over a new seed
    assert a.files == b.files
    d = json.loads((tmp_path / 'f' / 'splits.json').read_text())
    assert sum(len(v) for v in d['splits'].values()) == 40
    Path(tmp_path / 'f' / d['splits']['val'][0]).unlink()
    with pytest.raises(ValueError, match='delete the split file'): ImageFolderDataset(tmp_path / 'f', split='val')
    sp = stratified_split([0] * 100 + [1] * 20)
    assert [len(sp[k]) for k in ('train', 'val', 'test')] == [96, 12, 12]

def _png(path, arr, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True); Image.fromarray(arr, mode=mode).save(path)

def test_image_formats(tmp_path):
    g8 = (np.arange(64 * 48).reshape(48, 64) % 256).astype(np.uint8)
    _png(tmp_path / 'g8.png', g8)
    g16 = (g8.astype(np.uint16) * 257)
    Image.fromarray(g16).save(tmp_path / 'g16.png')
    rgba = np.dstack([g8, g8, g8, np.full_like(g8, 128)])
    _png(tmp_path / 'rgba.png', rgba)
    ref = load_image(tmp_path / 'g8.png')
    assert ref.shape == (3, 48, 64) and ref.min() >= -1 and ref.max() <= 1
    for f in ('g16.png', 'rgba.png'):
        x = load_image(tmp_path / f)
        assert x.shape == (3, 48, 64) and (x - ref).abs().max() < 1e-2, f
    assert load_image(tmp_path / 'g8.png', 32, 'center_crop').shape == (3, 32, 32)
    assert load_image(tmp_path / 'g8.png', 32).shape == (3, 32, 32)

def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match='accepted: cxr, oct, mri'): make_phantoms('ct', 2)
    with pytest.raises(ValueError, match='accepted: normal, cnv, dme, drusen'): PhantomDataset('oct', 4, classes=('normal', 'amd'))
    for s in (48, 16, 100, 64.0):
        with pytest.raises(ValueError, match='power of two'): make_phantoms('cxr', 2, size=s)
    with pytest.raises(ValueError, match='unknown phantom task'): dataset_from_spec('phantoms:xray')
    # empty folder / missing folder
    (tmp_path / 'empty' / 'normal').mkdir(parents=True)
    with pytest.raises(ValueError, match='no images found'): ImageFolderDataset(tmp_path / 'empty')
    with pytest.raises(FileNotFoundError, match='not found'): ImageFolderDataset(tmp_path / 'nope')
    # mixed sizes without a resize
    _png(tmp_path / 'mixed' / 'a' / '1.png', np.zeros((32, 32), np.uint8))
    _png(tmp_path / 'mixed' / 'b' / '2.png', np.zeros((64, 64), np.uint8))
    with pytest.raises(ValueError, match='different sizes.*size='): ImageFolderDataset(tmp_path / 'mixed')
    assert len(ImageFolderDataset(tmp_path / 'mixed', size=32)) == 2
    # a corrupt file among good ones: an error naming it, or skipped and reported when asked
    root = tmp_path / 'corrupt'
    for i in range(6): _png(root / ('a' if i % 2 else 'b') / f'{i}.png', np.full((32, 32), 20 * i, np.uint8))
    (root / 'a' / 'bad.png').write_bytes(b'\x89PNG not really')
    trunc = (root / 'b' / '0.png').read_bytes()
    (root / 'b' / 'trunc.png').write_bytes(trunc[:len(trunc) // 2])
    with pytest.raises(ValueError, match='bad.png'): ImageFolderDataset(root)
    with pytest.warns(UserWarning, match='skipped 2 unreadable'):
        ds = ImageFolderDataset(root, on_error='skip')
    assert len(ds) == 6 and {Path(p).name for p, _ in ds.skipped} == {'bad.png', 'trunc.png'}
    with pytest.raises(ValueError, match="on_error"): ImageFolderDataset(root, on_error='ignore')
    with pytest.raises(ValueError, match='cannot read image .*x.png'):
        (tmp_path / 'x.png').write_bytes(b'nope'); load_image(tmp_path / 'x.png')
    # MedMNIST: a missing file says how to get it; a wrong file says what it expected
    with pytest.raises(FileNotFoundError, match='never downloads'): MedMNISTDataset(tmp_path / 'octmnist.npz')
    np.savez(tmp_path / 'junk.npz', a=np.zeros(3))
    with pytest.raises(ValueError, match='train_images'): MedMNISTDataset(tmp_path / 'junk.npz')

def test_medmnist_npz(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / 'octmnist_28.npz', **{f'{s}_images': rng.integers(0, 255, (n, 28, 28), dtype=np.uint8) for s, n in
             (('train', 10), ('val', 3), ('test', 4))}, **{f'{s}_labels': rng.integers(0, 4, (n, 1)) for s, n in
             (('train', 10), ('val', 3), ('test', 4))})
    ds = dataset_from_spec(f'medmnist:{tmp_path / "octmnist_28.npz"}', split='val', size=32)
    assert len(ds) == 3 and ds.classes == ('cnv', 'dme', 'drusen', 'normal')
    x, y = ds[0]
    assert x.shape == (3, 32, 32) and -1 <= x.min() and x.max() <= 1 and 0 <= y < 4

def test_spurious_marker():
    from spruce_nb.data import marker_mask
    b = make_phantoms('cxr', 64, 32, spurious=1.0)
    assert torch.equal(b.markers, b.labels > 0)                                  # perfectly correlated
    mm = marker_mask(32)
    assert (b.images[b.markers][:, 0][:, mm] > 0.9).all()
    assert not (b.images[~b.markers][:, 0][:, mm] > 0.9).all()                     # unmarked images show anatomy there
    assert make_phantoms('cxr', 64, 32).markers.sum() == 0
    r = phantom_counterfactuals('cxr', b.seeds, 'cardiomegaly', 'normal', 32, markers=b.markers)
    assert not (r['masks'] & mm).any()
    assert torch.equal(r['counterfactuals'][:, :, mm], r['images'][:, :, mm])
    with pytest.raises(ValueError, match=r'\[-1, 1\]'): make_phantoms('cxr', 4, 32, spurious=2.0)


@NEEDS_NILEARN
def test_mri_anatomy_interfaces(tmp_path):
    from sklearn.linear_model import LogisticRegression
    cl = PHANTOM_CLASSES['mri-anatomy']
    assert parse_phantom_task('mri-anatomy-4stage') == parse_phantom_task('mri-anatomy') == ('mri-anatomy', cl)
    assert parse_phantom_task('mri-anatomy:moderate-vs-no_dementia') == ('mri-anatomy', ('no_dementia', 'moderate'))
    ds = dataset_from_spec('phantoms:mri-anatomy:moderate-vs-no_dementia', split='val', size=32, n=4)
    assert isinstance(ds, PhantomDataset) and ds.task == 'mri-anatomy:moderate-vs-no_dementia'
    gt = ds.ground_truth(0, 'moderate')                      # item 0 is no_dementia
    assert gt['causal']['atrophy'] <= 0.2 and gt['cf_causal']['atrophy'] >= 0.8
    assert ((gt['counterfactual'] - gt['image']).abs().amax(0)[~gt['mask']] == 0).all() and (gt['counterfactual'] != gt['image']).any()
    # the CLI writes the same images as make_phantoms, with the atrophy column
    out = tmp_path / 'a'
    assert main(['phantoms', '--modality', 'mri-anatomy', '--n', '8', '--size', '32', '--out', str(out)]) == 0
    rows = list(csv.DictReader(open(out / 'labels.csv')))
    back, ref = ImageFolderDataset(out), make_phantoms('mri-anatomy', 8, 32)
    idx = [int(f.stem.split('_')[-1]) for f in back.files]
    assert back.classes == cl and 'atrophy' in rows[0] and torch.equal(torch.stack([back[i][0] for i in range(8)]), ref.images[idx])
    # a small classifier separates the four stages well above chance (0.25), and the oracle reads atrophy back
    feats = lambda b: torch.nn.functional.adaptive_avg_pool2d(b.images[:, :1], 16).flatten(1).numpy()
    tr, te = make_phantoms('mri-anatomy', 400, 64, 0, split='train'), make_phantoms('mri-anatomy', 200, 64, 0, split='test')
    acc = LogisticRegression(C=0.05, max_iter=500).fit(feats(tr), tr.labels.numpy()).score(feats(te), te.labels.numpy())
    assert acc > 0.4, acc
    o = fit_oracle('mri-anatomy', n=600, n_test=200, nuisance=False)
    assert o.error['atrophy'] < 0.15 and o.accuracy > 0.5, (o.error, o.accuracy)

def test_mri_anatomy_without_nilearn(monkeypatch, tmp_path, capsys):
    import importlib.util
    from spruce_nb.data import phantom_modalities
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a, **k: None if name == 'nilearn' else real(name, *a, **k))
    assert 'mri-anatomy' not in phantom_modalities() and 'mri' in phantom_modalities()
    with pytest.raises(ModuleNotFoundError, match='pip install nilearn'): make_phantoms('mri-anatomy', 2, 32)
    with pytest.raises(ModuleNotFoundError, match='pip install nilearn'): PhantomDataset('mri-anatomy', 2, 32)
    with pytest.raises(ModuleNotFoundError, match='pip install nilearn'): dataset_from_spec('phantoms:mri-anatomy', n=2, size=32)
    assert main(['phantoms', '--modality', 'mri-anatomy', '--n', '2', '--size', '32', '--out', str(tmp_path / 'x')]) == 2
    assert 'pip install nilearn' in capsys.readouterr().err and not (tmp_path / 'x').exists()
    make_phantoms('mri', 2, 32)                               # the other modalities do not need it

def test_phantom_folder_cleans_a_killed_runs_temp_and_respects_umask(tmp_path):
    "A killed `spruce phantoms` leaves `.NAME.*`; the next run removes it (its marker's process is gone). Folders follow the umask."
    import os
    from spruce_nb.data import write_phantom_folder
    stale = tmp_path / '.ph.killed'; stale.mkdir(); (stale / '.spruce_phantoms_tmp').write_text('4194000')   # above Linux's pid_max
    foreign = tmp_path / '.ph.someone'; foreign.mkdir()                                                  # no marker: not ours, kept
    old = os.umask(0o027)
    try: out = write_phantom_folder(tmp_path / 'ph', 'cxr', n=4, size=32)
    finally: os.umask(old)
    assert not stale.exists() and foreign.exists()
    assert (out.stat().st_mode & 0o777) == 0o750 and not (out / '.spruce_phantoms_tmp').exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ['.ph.someone', 'ph']

def test_image_limits_are_checked_before_decoding(tmp_path, monkeypatch):
    import spruce_nb.data as D
    from PIL import Image, PngImagePlugin
    f = tmp_path / 'big.png'; Image.new('L', (64, 48)).save(f)
    monkeypatch.setattr(D, 'MAX_IMAGE_PIXELS', 1000)
    with pytest.raises(ValueError, match=r'big\.png: 64x48 px'): load_image(f)
    monkeypatch.setattr(D, 'MAX_IMAGE_PIXELS', 64 * 2 ** 20); monkeypatch.setattr(D, 'MAX_IMAGE_BYTES', 10)
    with pytest.raises(ValueError, match=r'big\.png: .*MB is larger'): load_image(f)
    monkeypatch.setattr(D, 'MAX_IMAGE_BYTES', 256 * 2 ** 20)
    info = PngImagePlugin.PngInfo(); info.add_text('comment', 'a' * (4 * 2 ** 20), zip=True)   # a decompression bomb in a text chunk
    bomb = tmp_path / 'bomb.png'; Image.new('L', (8, 8)).save(bomb, pnginfo=info)
    with pytest.raises(ValueError, match=r'bomb\.png'): load_image(bomb)

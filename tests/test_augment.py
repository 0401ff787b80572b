"""ADA augment pipe, the AdaptiveP controller on the shared Trainer (exact resume), Freeze-D, and the NVlabs pickle importer (no code execution)."""
import sys, types, pickle, collections, contextlib, io
import pytest
import torch
from torch import nn
import torch.nn.functional as F

from spruce_nb.augment import (AugmentPipe, AdaptiveP, GEOMETRIC_OPS, COLOR_OPS, ada_adjustment, freeze_discriminator,
                               read_nvlabs_pickle, load_nvlabs_pickle, load_transfer_weights, UnsafePickleError,
                               nvlabs_generator_kwargs, nvlabs_discriminator_kwargs, plot_ada_history)


# ---------------------------------------------------------------- augment pipe
def test_p0_is_exact_identity_and_p_is_checkpointed():
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    pipe = AugmentPipe()
    assert pipe(x) is x
    pipe.set_p(0.7)
    sd = pipe.state_dict()
    assert float(sd['p']) == pytest.approx(0.7)
    fresh = AugmentPipe(); fresh.load_state_dict(sd)
    assert float(fresh.p) == pytest.approx(0.7)


def test_images_that_draw_nothing_are_untouched():
    torch.manual_seed(0)
    x = torch.rand(256, 3, 8, 8) * 2 - 1
    y = AugmentPipe(p=0.05)(x)
    same = (y == x).flatten(1).all(1)
    # P(nothing applied) = (1-p/2)(1-3p/4)(1-p)^9(1-p/2) ~ 0.59 at p=0.05 (rotation counts once: P(pre or post) = p)
    assert 0.4 < same.float().mean() < 0.75
    assert not same.all()


def test_gradients_and_double_backward_through_pipe():
    pipe = AugmentPipe(p=1.)
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    D = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Softplus(), nn.Flatten(), nn.LazyLinear(1))
    logits = D(pipe(x))
    g, = torch.autograd.grad(logits.sum(), x, create_graph=True)   # R1
    assert g.abs().sum() > 0
    g.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_every_op_changes_an_image_at_p1_and_grayscale_works():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    x[:, 1] = x[:, 1] * 0.3   # a colour image, so hue and saturation act
    for op in GEOMETRIC_OPS + COLOR_OPS:
        pipe = AugmentPipe.from_spec('bgc', p=1., **{k: 0. for k in GEOMETRIC_OPS + COLOR_OPS if k != op})
        y = pipe(x, debug_percentile=0.8)
        assert (y - x).abs().max() > 1e-3, op
    assert AugmentPipe(p=1.)(x[:, :1]).shape == (2, 1, 16, 16)
    with pytest.raises(ValueError, match='unknown augmentation spec'): AugmentPipe.from_spec('bgcfnc')
    with pytest.raises(ValueError, match='1 or 3 channels'): AugmentPipe(p=1.)(torch.zeros(1, 2, 8, 8))


# ---------------------------------------------------------------- ADA controller on the real Trainer
class _ToyG(nn.Module):
    def __init__(self):
        super().__init__(); self.z_dim = 8; self.fc = nn.Linear(8, 3 * 8 * 8)
    def forward(self, z): return torch.tanh(self.fc(z)).view(-1, 3, 8, 8)


def _run(out_dir, total, resume=False, kimg=0.05):
    from spruce_nb.training import Trainer
    torch.manual_seed(0)
    G, D = _ToyG(), nn.Sequential(nn.Conv2d(3, 4, 3), nn.LeakyReLU(0.2), nn.Flatten(), nn.Linear(4 * 36, 1))
    pipe = AugmentPipe()
    ada = AdaptiveP(pipe, target=-2., kimg=kimg)   # r_t > target always: p climbs 0.32 per adjustment, the pipe gets busy
    oG, oD = torch.optim.Adam(G.parameters(), 1e-3), torch.optim.Adam(D.parameters(), 1e-3)
    def step(tr, batch):
        real = batch[0]
        fake = tr.modules['G'](torch.randn(real.shape[0], 8))
        lr_, lf = tr.modules['D'](pipe(real)), tr.modules['D'](pipe(fake.detach()))
        tr.backward(F.softplus(lf).mean() + F.softplus(-lr_).mean(), 'D')
        ada.report(tr, lr_)
        tr.backward(F.softplus(-tr.modules['D'](pipe(tr.modules['G'](torch.randn(real.shape[0], 8))))).mean(), 'G')
        return dict(**ada.logs(tr))
    data = torch.utils.data.TensorDataset(torch.rand(40, 3, 8, 8) * 2 - 1)
    tr = Trainer(dict(G=G, D=D, augment_pipe=pipe), dict(G=oG, D=oD), step, data, 4, total, out_dir, ckpt_every=4,
                 callbacks=[ada], amp='fp32', kind='ada-test', log_every=4)
    tr.fit(resume=resume)
    return tr, pipe


def test_adaptive_p_resume_is_exact(tmp_path):
    a, pa = _run(tmp_path / 'a', 16)
    _run(tmp_path / 'b', 8)
    b, pb = _run(tmp_path / 'b', 16, resume=True)
    ha, hb = a.state['ada']['history'], b.state['ada']['history']
    assert len(ha['p']) == 4 and ha == hb
    assert float(pa.p) == float(pb.p) == a.state['ada']['p']
    assert ha['p'] == pytest.approx([0.32, 0.64, 0.96, 1.0])
    fig = plot_ada_history(ha); assert fig is not None


def test_adaptive_p_clamps_and_warns_without_reports():
    fake = types.SimpleNamespace(state={}, batch_size=1000, step=0)
    pipe = AugmentPipe(); ada = AdaptiveP(pipe, kimg=0.5)   # dp = 8 per adjustment
    ada.before_fit(fake)
    for t in range(8):
        fake.step = t + 1; ada.before_step(fake); ada.report(fake, torch.ones(4, 1)); ada.after_step(fake)
    assert fake.state['ada']['p'] == 1.0 and float(pipe.p) == 1.0   # the reference would be at 16 (NVlabs issue 175)
    with pytest.warns(UserWarning, match='no real logits'):
        for t in range(4): ada.after_step(fake)
    assert ada_adjustment(0.9, 64, kimg=100) == pytest.approx(64 * 4 / 100_000)


# ---------------------------------------------------------------- NVlabs pickles
@contextlib.contextmanager
def _fake_nvlabs_modules():
    names = ('torch_utils', 'torch_utils.persistence', 'dnnlib', 'dnnlib.util')
    saved = {k: sys.modules.get(k) for k in names}
    tu, tp, dn, du = (types.ModuleType(n) for n in names)
    def rec(meta): raise RuntimeError('writer only')
    rec.__module__, rec.__qualname__ = 'torch_utils.persistence', '_reconstruct_persistent_obj'
    class EasyDict(dict): pass
    EasyDict.__module__, EasyDict.__qualname__ = 'dnnlib.util', 'EasyDict'
    tp._reconstruct_persistent_obj, du.EasyDict, tu.persistence, dn.util = rec, EasyDict, tp, du
    sys.modules.update(zip(names, (tu, tp, dn, du)))
    try: yield rec, EasyDict
    finally:
        for k, v in saved.items():
            if v is None: sys.modules.pop(k, None)
            else: sys.modules[k] = v


class _Persistent:
    "Pickles like an instance of an NVlabs torch_utils.persistence.persistent_class (its __reduce__ output)."
    def __init__(self, m, cls, src, kw, rec, ED): self.m, self.cls, self.src, self.kw, self.rec, self.ED = m, cls, src, kw, rec, ED
    def __reduce__(self):
        m = self.m
        kids = collections.OrderedDict((k, _Persistent(c, type(c).__name__, self.src, {}, self.rec, self.ED)) for k, c in m._modules.items())
        state = dict(training=False, _parameters=collections.OrderedDict(m._parameters), _buffers=collections.OrderedDict(m._buffers),
                     _non_persistent_buffers_set=set(), _backward_hooks=collections.OrderedDict(), _forward_hooks=collections.OrderedDict(),
                     _modules=kids, _init_args=(), _init_kwargs=self.ED(self.kw))
        return (self.rec, (dict(type='class', version=6, module_src=self.src, class_name=self.cls, state=state),))


def _write(path, nets, kwargs, src, tsk=None):
    with _fake_nvlabs_modules() as (rec, ED):
        data = dict(training_set_kwargs=tsk)
        for k, m in nets.items(): data[k] = None if m is None else _Persistent(m, kwargs[k][0], src, kwargs[k][1], rec, ED)
        path.write_bytes(pickle.dumps(data))


def _payload(marker): return f"open({str(marker)!r}, 'w').write('executed')\n"


def test_read_emulated_snapshot_without_running_module_src(tmp_path):
    marker = tmp_path / 'PWNED'
    nets = dict(G=nn.Linear(3, 2), D=nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 1)), G_ema=nn.Linear(3, 2), augment_pipe=AugmentPipe(p=0.125))
    kw = {k: (type(v).__name__, dict(z_dim=3, mapping_kwargs=dict(num_layers=1))) for k, v in nets.items()}
    _write(tmp_path / 's.pkl', nets, kw, _payload(marker), dict(path='data.zip'))
    snap = read_nvlabs_pickle(tmp_path / 's.pkl')
    assert not marker.exists()
    assert snap.augment_p == pytest.approx(0.125) and snap.training_set_kwargs == dict(path='data.zip')
    assert snap.kwargs('G') == dict(z_dim=3, mapping_kwargs=dict(num_layers=1))
    for k in ('G', 'D', 'G_ema'):
        sd = nets[k].state_dict()
        assert sorted(snap.state(k)) == sorted(sd) and all(torch.equal(snap.state(k)[n], sd[n]) for n in sd)
    assert 'torch_utils' not in sys.modules and 'dnnlib' not in sys.modules


@pytest.mark.parametrize('fn', [exec, eval, __import__('os').system])
def test_pickle_exploits_are_refused_and_run_nothing(tmp_path, fn):
    marker = tmp_path / 'PWNED'
    code = f"open({str(marker)!r}, 'w').write('x')" if fn is not __import__('os').system else f"touch {marker}"
    class Exploit:
        def __reduce__(self): return (fn, (code,))
    (tmp_path / 'e.pkl').write_bytes(pickle.dumps(dict(G=Exploit(), D=1, G_ema=2)))
    with pytest.raises(UnsafePickleError, match='not on the allowlist'):
        read_nvlabs_pickle(tmp_path / 'e.pkl')
    assert not marker.exists()


def test_exploit_hidden_in_a_storage_payload_is_refused(tmp_path):
    marker = tmp_path / 'PWNED'
    class Exploit:
        def __reduce__(self): return (exec, (f"open({str(marker)!r}, 'w').write('x')",))
    inner = pickle.dumps(Exploit())
    from spruce_nb.augment import _load_storage_from_bytes
    class Storage:  # pickles as torch.storage._load_from_bytes(<bytes that are themselves an exploit>)
        def __reduce__(self): return (torch.storage._load_from_bytes, (inner,))
    (tmp_path / 's.pkl').write_bytes(pickle.dumps(dict(G=Storage())))
    with pytest.raises(UnsafePickleError, match='weights_only'):
        read_nvlabs_pickle(tmp_path / 's.pkl')
    assert not marker.exists()


def test_other_files_are_rejected_clearly(tmp_path):
    (tmp_path / 'l.pkl').write_bytes(pickle.dumps({'G': 1}))
    with pytest.raises(ValueError, match='not a stylegan2-ada-pytorch network snapshot'): read_nvlabs_pickle(tmp_path / 'l.pkl')
    (tmp_path / 'j.pkl').write_bytes(b'not a pickle at all')
    with pytest.raises(ValueError, match='not a readable pickle'): read_nvlabs_pickle(tmp_path / 'j.pkl')
    with pytest.raises(FileNotFoundError): read_nvlabs_pickle(tmp_path / 'nope.pkl')
    (tmp_path / 'tf.pkl').write_bytes(b'\x80\x02cdnnlib.tflib.network\nNetwork\nq\x00.')
    with pytest.raises(UnsafePickleError, match='TensorFlow'): read_nvlabs_pickle(tmp_path / 'tf.pkl')


def test_import_into_spruce_stylegan2_and_freeze_d(tmp_path):
    sg2 = pytest.importorskip('spruce_nb.stylegan2')
    marker = tmp_path / 'PWNED'
    gkw = dict(z_dim=16, w_dim=16, c_dim=0, img_resolution=16, img_channels=3, mapping_kwargs=dict(num_layers=2),
               synthesis_kwargs=dict(channel_base=128, channel_max=16, num_fp16_res=0, conv_clamp=None))
    dkw = dict(c_dim=0, img_resolution=16, img_channels=3, channel_base=128, channel_max=16, block_kwargs=dict(freeze_layers=4),
               mapping_kwargs={}, epilogue_kwargs=dict(mbstd_group_size=4))
    torch.manual_seed(0)
    G, Ge = sg2.Generator(**nvlabs_generator_kwargs(gkw)), sg2.Generator(**nvlabs_generator_kwargs(gkw))
    D = sg2.Discriminator(**nvlabs_discriminator_kwargs(dkw)[0])
    with torch.no_grad(): Ge.mapping.w_avg.normal_()
    _write(tmp_path / 'n.pkl', dict(G=G, D=D, G_ema=Ge, augment_pipe=AugmentPipe(p=0.3)),
           dict(G=('Generator', gkw), D=('Discriminator', dkw), G_ema=('Generator', gkw), augment_pipe=('AugmentPipe', {})), _payload(marker))
    out = load_nvlabs_pickle(tmp_path / 'n.pkl')
    z, x = torch.randn(2, 16), torch.rand(4, 3, 16, 16) * 2 - 1
    assert torch.equal(out['G_ema'](z, noise_mode='const', truncation_psi=0.7), Ge.eval()(z, noise_mode='const', truncation_psi=0.7))
    assert torch.equal(out['D'](x), D.eval()(x))
    assert out['freezed'] == 4 and out['augment_p'] == pytest.approx(0.3) and not marker.exists()
    # transfer learning + Freeze-D
    G2, D2 = sg2.Generator(**nvlabs_generator_kwargs(gkw)), sg2.Discriminator(**nvlabs_discriminator_kwargs(dkw)[0])
    load_transfer_weights(tmp_path / 'n.pkl', G2, D2)
    assert torch.equal(D2.eval()(x), D.eval()(x))
    frozen = freeze_discriminator(D2, 4)
    assert frozen == ['b16.fromrgb', 'b16.conv0', 'b16.conv1', 'b16.skip']
    D2.requires_grad_(True)
    assert not any(p.requires_grad for p in D2.b16.parameters()) and all(p.requires_grad for p in D2.b8.parameters())
    wrong = sg2.Generator(**{**nvlabs_generator_kwargs(gkw), 'mapping_layers': 8})
    with pytest.raises(ValueError, match='do not fit'): load_transfer_weights(tmp_path / 'n.pkl', wrong)
    with pytest.raises(ValueError, match='conditional'): nvlabs_generator_kwargs({**gkw, 'c_dim': 10})


def test_adaptive_p_consumes_stylegan2_step_stats_and_measure_only_mode():
    for adjust in (True, False):
        fake = types.SimpleNamespace(state={}, batch_size=16, step=0)
        pipe = AugmentPipe(); ada = AdaptiveP(pipe, kimg=1, adjust=adjust)
        ada.before_fit(fake)
        for t in range(8):   # what StyleGAN2Step writes: 16 real logits per step, 14 positive -> r_t = 0.75
            fake.step = t + 1; ada.before_step(fake)
            st = fake.state.setdefault('ada_stats', {'signs_real_sum': 0.0, 'n': 0})
            st['signs_real_sum'] += 14 - 2; st['n'] += 16
            ada.after_step(fake)
        h = fake.state['ada']['history']
        assert h['rt'] == [0.75, 0.75] and fake.state['ada_stats'] == {'signs_real_sum': 0.0, 'n': 0}
        assert h['p'] == (pytest.approx([0.064, 0.128]) if adjust else [0.0, 0.0])   # dp = 16*4/1000 per adjustment
        assert float(pipe.p) == pytest.approx(h['p'][-1])


def _sg2_pickle(tmp_path, sg2, res=16, z=16, base=128, cmax=16):
    "An NVlabs-structured snapshot of a small G/D (res=32, z=64, base=1024, cmax=32 is the architecture of `--config tiny --res 32`)."
    gkw = dict(z_dim=z, w_dim=z, c_dim=0, img_resolution=res, img_channels=3, mapping_kwargs=dict(num_layers=2),
               synthesis_kwargs=dict(channel_base=base, channel_max=cmax, num_fp16_res=0, conv_clamp=None))
    torch.manual_seed(1)
    G = sg2.Generator(**nvlabs_generator_kwargs(gkw))
    with torch.no_grad(): G.mapping.w_avg.normal_()
    dkw = dict(c_dim=0, img_resolution=res, channel_base=base, channel_max=cmax, epilogue_kwargs=dict(mbstd_group_size=4))
    D = sg2.Discriminator(**nvlabs_discriminator_kwargs(dkw)[0])
    _write(tmp_path / 'n.pkl', dict(G=G, D=D, G_ema=G, augment_pipe=None), dict(G=('Generator', gkw), D=('Discriminator', dkw), G_ema=('Generator', gkw)),
           _payload(tmp_path / 'PWNED'))
    return G.eval(), D.eval(), gkw


def test_cli_import_nvlabs_roundtrip(tmp_path, capsys):
    sg2 = pytest.importorskip('spruce_nb.stylegan2')
    from spruce_nb.cli import main
    G, D, gkw = _sg2_pickle(tmp_path, sg2)
    assert main(['import-nvlabs', str(tmp_path / 'n.pkl'), '--out', str(tmp_path / 'G.pt')]) == 0
    G2 = sg2.load_generator(tmp_path / 'G.pt')
    z = torch.randn(3, 16)
    assert torch.equal(G2(z, noise_mode='const'), G(z, noise_mode='const'))
    assert main(['import-nvlabs', str(tmp_path / 'n.pkl'), '--out', str(tmp_path / 'G.pt')]) == 2   # exists, no --overwrite
    (tmp_path / 'evil.pkl').write_bytes(b'\x80\x02cos\nsystem\nq\x00X\x05\x00\x00\x00touchq\x01\x85q\x02Rq\x03.')
    assert main(['import-nvlabs', str(tmp_path / 'evil.pkl'), '--out', str(tmp_path / 'E.pt')]) == 2
    assert 'os.system' in capsys.readouterr().err and not (tmp_path / 'E.pt').exists() and not (tmp_path / 'PWNED').exists()


def test_transfer_from_spruce_checkpoints(tmp_path):
    sg2 = pytest.importorskip('spruce_nb.stylegan2')
    G, D, gkw = _sg2_pickle(tmp_path, sg2)
    sg2.export_generator(G, tmp_path / 'G_ema.pt')
    G2 = sg2.Generator(**nvlabs_generator_kwargs(gkw))
    load_transfer_weights(tmp_path / 'G_ema.pt', G2)
    z = torch.randn(2, 16)
    assert torch.equal(G2.eval()(z, noise_mode='const'), G(z, noise_mode='const'))
    with pytest.raises(ValueError, match='no discriminator'):
        load_transfer_weights(tmp_path / 'G_ema.pt', G2, sg2.Discriminator(img_resolution=16, channel_base=128, channel_max=16))
    # a training run's last.pt (Trainer format: modules / ema, 0-d tensors encoded)
    cfg = sg2.tiny_config(32, channel_base=256, channel_max=16, z_dim=16, w_dim=16)
    tr = sg2.make_trainer(cfg, torch.utils.data.TensorDataset(torch.rand(16, 3, 32, 32) * 2 - 1), None, 0.016, metric_kimg=0,
                          augment_pipe=AugmentPipe(p=0.5))
    tr.save(tmp_path / 'last.pt')
    G3, D3, Ge3 = cfg.make_generator(), cfg.make_discriminator(), cfg.make_generator()
    load_transfer_weights(tmp_path / 'last.pt', G3, D3, Ge3)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    assert torch.equal(D3.eval()(x), tr.modules['D'].eval()(x))
    assert torch.equal(Ge3.eval()(z, noise_mode='const'), tr.ema['G'].module.eval()(z, noise_mode='const'))


# ---------------------------------------------------------------- spruce train-gan --ada / --resume-from / --freezed
# 32-px runs (the smallest phantom size) of `--config tiny` with batch 4 and 2-16 steps: each CLI call takes a few seconds on one core.
_TG = ['train-gan', '--data', 'phantoms:cxr:cardiomegaly-vs-normal', '--n', '16', '--res', '32', '--config', 'tiny',
       '--batch', '4', '--metric-kimg', '0', '--device', 'cpu']


def _last_state(path):
    from spruce_nb.core import load_checkpoint
    return load_checkpoint(path).state


def test_cli_train_gan_ada_writes_history_and_p_follows_the_controller(tmp_path, capsys):
    pytest.importorskip('spruce_nb.stylegan2')
    import json
    from spruce_nb.cli import main
    # --target -1.5 < every possible r_t: each adjustment must raise p by B*4/(ada_kimg*1000) = 4*4/100 = 0.16
    assert main(_TG + ['--kimg', '0.064', '--out', str(tmp_path / 'r'), '--ada', '--ada-kimg', '0.1', '--target', '-1.5']) == 0
    h = json.loads((tmp_path / 'r' / 'ada_history.json').read_text())
    assert sorted(h) == ['kimg', 'p', 'rt', 'step'] and h['step'] == [4, 8, 12, 16]
    assert h['p'] == pytest.approx([0.16, 0.32, 0.48, 0.64]) and all(-1 <= r <= 1 for r in h['rt'])
    assert h['kimg'] == pytest.approx([0.016, 0.032, 0.048, 0.064])
    assert 'ada_kimg 0.1' in capsys.readouterr().out
    # the default target 0.6: p moves by +-0.16 as sign(r_t - 0.6) says, clamped to [0, 1]
    assert main(_TG + ['--kimg', '0.032', '--out', str(tmp_path / 's'), '--ada', '--ada-kimg', '0.1']) == 0
    h = json.loads((tmp_path / 's' / 'ada_history.json').read_text())
    p = 0.
    assert len(h['p']) == 2
    for rt, got in zip(h['rt'], h['p']):
        p = min(max(p + 0.16 * ((rt > 0.6) - (rt < 0.6)), 0.), 1.)
        assert got == pytest.approx(p)
    assert not (tmp_path / 'noada').exists()
    assert main(_TG + ['--kimg', '0.016', '--out', str(tmp_path / 'noada')]) == 0    # without --ada: no ADA history
    assert not (tmp_path / 'noada' / 'ada_history.json').exists() and 'augment_pipe' not in _last_state(tmp_path / 'noada' / 'last.pt')['modules']


def test_cli_train_gan_bad_ada_and_freezed_flags(tmp_path, capsys):
    pytest.importorskip('spruce_nb.stylegan2')
    from spruce_nb.cli import main
    assert main(_TG + ['--kimg', '0.016', '--out', str(tmp_path / 'a'), '--ada-kimg', '5']) == 2
    assert '--ada-kimg needs --ada' in capsys.readouterr().err
    assert main(_TG + ['--kimg', '0.016', '--out', str(tmp_path / 'b'), '--freezed', '99']) == 2
    err = capsys.readouterr().err
    assert 'must be in [0, ' in err and 'got 99' in err
    assert main(_TG + ['--kimg', '0.016', '--out', str(tmp_path / 'c'), '--resume-from', str(tmp_path / 'missing.pkl')]) == 2
    assert 'missing.pkl: no such file' in capsys.readouterr().err
    assert not (tmp_path / 'a' / 'last.pt').exists() and not (tmp_path / 'b' / 'last.pt').exists()


def test_cli_train_gan_resume_from_generator_only_checkpoint(tmp_path, capsys):
    sg2 = pytest.importorskip('spruce_nb.stylegan2')
    from spruce_nb.cli import main
    G, _, gkw = _sg2_pickle(tmp_path, sg2, res=32, z=64, base=1024, cmax=32)   # the architecture of --config tiny --res 32
    sg2.export_generator(G, tmp_path / 'G_ema.pt')
    assert main(_TG + ['--kimg', '0.008', '--out', str(tmp_path / 'r'), '--resume-from', str(tmp_path / 'G_ema.pt')]) == 0
    assert 'holds a generator only: D starts from scratch' in capsys.readouterr().out
    st = _last_state(tmp_path / 'r' / 'last.pt')
    cfg = sg2.get_config('tiny', 32, batch=4)
    G2, D2 = cfg.make_generator(), cfg.make_discriminator()
    load_transfer_weights(tmp_path / 'r' / 'last.pt', G2, D2)
    src, fresh = G.state_dict(), cfg.make_generator().state_dict()
    for k, v in G2.state_dict().items():    # 2 Adam steps (lr 0.0025) away from the source, far from a fresh init
        if k.endswith('.weight') or k.endswith('.const'):   # random at init (biases start at 0 or 1 in both)
            assert (v - src[k]).abs().max() < 0.05 * (1 + src[k].abs().max()), k
            assert (fresh[k] - src[k]).abs().max() > 0.1 * (1 + src[k].abs().max()), k
    # a wrong architecture is refused before training, with the fix in the message
    assert main(['train-gan'] + _TG[1:] + ['--kimg', '0.008', '--out', str(tmp_path / 'w'), '--res', '64',
                                           '--resume-from', str(tmp_path / 'G_ema.pt')]) == 2
    assert 'do not fit this architecture' in capsys.readouterr().err


def test_cli_train_gan_resume_from_nvlabs_pickle_with_freeze_d(tmp_path, capsys):
    sg2 = pytest.importorskip('spruce_nb.stylegan2')
    from spruce_nb.cli import main
    G, D, gkw = _sg2_pickle(tmp_path, sg2, res=32, z=64, base=1024, cmax=32)
    d0 = {k: v.clone() for k, v in D.state_dict().items()}
    assert main(_TG + ['--kimg', '0.016', '--out', str(tmp_path / 'r'), '--resume-from', str(tmp_path / 'n.pkl'),
                       '--freezed', '2', '--ada', '--ada-kimg', '1']) == 0
    out = capsys.readouterr().out
    assert 'transfer learning from' in out and "Freeze-D: ['b32.fromrgb', 'b32.conv0'] frozen" in out
    assert not (tmp_path / 'PWNED').exists()                                 # the pickle's module_src never ran
    D2 = sg2.get_config('tiny', 32, batch=4).make_discriminator()
    Gx = sg2.get_config('tiny', 32, batch=4).make_generator()
    load_transfer_weights(tmp_path / 'r' / 'last.pt', Gx, D2)
    d1 = D2.state_dict()
    for k in ('b32.fromrgb.weight', 'b32.fromrgb.bias', 'b32.conv0.weight', 'b32.conv0.bias'):
        assert torch.equal(d1[k], d0[k]), k                                  # frozen: exactly the pickle's weights
    assert not torch.equal(d1['b32.conv1.weight'], d0['b32.conv1.weight'])  # trained
    assert (d1['b32.conv1.weight'] - d0['b32.conv1.weight']).abs().max() < 0.1   # ... starting from the pickle's D


def test_crafted_snapshot_is_refused_before_any_network_is_built(tmp_path):
    "A small file whose stored init kwargs describe a 1024-px network: refused from the meta-device shapes, no memory spent."
    import resource
    sg2 = pytest.importorskip('spruce_nb.stylegan2')
    G, D, gkw = _sg2_pickle(tmp_path, sg2)
    big = {**gkw, 'img_resolution': 1024, 'z_dim': 512, 'w_dim': 512, 'mapping_kwargs': dict(num_layers=8),
           'synthesis_kwargs': dict(channel_base=32768, channel_max=512, num_fp16_res=0, conv_clamp=None)}
    dkw = dict(c_dim=0, img_resolution=16, channel_base=128, channel_max=16, epilogue_kwargs=dict(mbstd_group_size=4))
    _write(tmp_path / 'crafted.pkl', dict(G=G, D=D, G_ema=G, augment_pipe=None),
           dict(G=('Generator', big), D=('Discriminator', dkw), G_ema=('Generator', big)), _payload(tmp_path / 'PWNED'))
    with torch.device('meta'): sg2.Generator(**nvlabs_generator_kwargs(gkw))   # the meta device's one-time set-up (~150 MB) before measuring
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(ValueError, match='truncated or crafted'): load_nvlabs_pickle(tmp_path / 'crafted.pkl')
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 60_000      # kB: a real 1024-px G alone would take ~100 MB
    assert not (tmp_path / 'PWNED').exists()

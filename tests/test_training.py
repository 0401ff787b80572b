"""The training engine: bit-identical resume, strict resume checks, corrupt checkpoints, history files, early stopping,
gradient bookkeeping (accumulation, leaked gradients, clipping, fp16 scaler path) and DDP under torchrun (2 CPU processes, gloo)."""
import shutil
import os, sys, csv, json, socket, subprocess, textwrap, importlib.util
from pathlib import Path
import pytest, torch
from torch import nn
from torch.utils.data import TensorDataset

from spruce_nb.core import load_checkpoint, CheckpointError
from spruce_nb.training import (Trainer, EMA, Callback, CancelFit, EarlyStopping, epoch_batches, ema_beta, plot_history,
                                init_distributed)

ROOT = Path(__file__).resolve().parents[1]

def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    return TensorDataset(x, (x[:, :1] * 2 - x[:, 1:2]).sin() + 0.1 * torch.randn(n, 1, generator=g))

class Kill(Callback):
    "Simulates a crash: raises after step `at` (the last checkpoint is the multiple of ckpt_every before it)."
    def __init__(self, at): self.at = at
    def after_step(self, trainer):
        if trainer.step == self.at: raise RuntimeError(f'killed at {self.at}')

def _step(tr, batch):
    x, y = batch
    net = tr.modules['net']
    with tr.autocast():
        pred = net(x + 0.01 * torch.randn_like(x))           # consumes the global RNG (and dropout does too)
        loss = nn.functional.mse_loss(pred.float(), y)
    tr.backward(loss, 'net')
    tr.ema['net'].update(net)
    tr.state['seen'] = tr.state.get('seen', 0) + x.shape[0]
    return {'loss': loss.item(), 'noise': torch.rand(()).item()}

def _make(out, total=30, callbacks=(), config=None, seed=0, amp='fp32', batch_size=8, init_seed=0, **kw):
    torch.manual_seed(init_seed)
    net = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.2), nn.Tanh(), nn.Linear(16, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3)
    sch = torch.optim.lr_scheduler.StepLR(opt, 7, gamma=0.7)
    ev = lambda tr: {'val': float(tr.modules['net'](torch.zeros(1, 3)).detach().sum()) + torch.rand(()).item()}
    return Trainer({'net': net}, {'net': opt}, _step, _data(), batch_size, total, out, schedulers={'net': sch},
                   ema={'net': EMA(net, 0.9)}, ckpt_every=4, log_every=3, grad_clip=0.5, amp=amp, callbacks=callbacks,
                   config=config if config is not None else {'lr': 3e-3, 'net': {'width': 16}, 'betas': (0.9, 0.99)},
                   kind='test', device='cpu', seed=seed, eval_fn=ev, eval_every=5, **kw)

def _flat(d, p=''):
    if isinstance(d, dict): return {k: v for kk in d for k, v in _flat(d[kk], f'{p}/{kk}').items()}
    if isinstance(d, (list, tuple)): return {k: v for i, x in enumerate(d) for k, v in _flat(x, f'{p}[{i}]').items()}
    return {p: d}

def _assert_identical(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    for group in ('modules', 'optimizers', 'schedulers', 'scalers', 'ema', 'trainer_state', 'history', 'step', 'epoch'):
        fa, fb = _flat(sa[group]), _flat(sb[group])
        assert fa.keys() == fb.keys(), group
        for k in fa:
            if isinstance(fa[k], torch.Tensor): assert torch.equal(fa[k], fb[k]), f'{group}{k} differs'
            else: assert fa[k] == fb[k], f'{group}{k}: {fa[k]!r} != {fb[k]!r}'
    assert torch.equal(sa['rng'][0]['torch'], sb['rng'][0]['torch'])

@pytest.mark.parametrize('amp', ['fp32', 'fp16'])
def test_resume_is_bit_identical(tmp_path, amp):
    "N steps straight == killed at step 13 (last checkpoint at 12), then a fresh Trainer resumed to N."
    straight = _make(tmp_path / 'a', amp=amp); straight.fit()
    killed = _make(tmp_path / 'b', amp=amp, callbacks=[Kill(13)])
    with pytest.raises(RuntimeError, match='killed at 13'): killed.fit()
    assert load_checkpoint(tmp_path / 'b' / 'last.pt', kind='test').metadata['step'] == 12
    torch.manual_seed(999)                                  # a disturbed global RNG and a different init must not matter
    resumed = _make(tmp_path / 'b', amp=amp, init_seed=5); resumed.fit(resume=True)
    assert resumed.step == straight.step == 30
    _assert_identical(straight, resumed)
    for p, q in zip(straight.unwrap('net').parameters(), resumed.unwrap('net').parameters()): assert torch.equal(p, q)
    assert json.loads((tmp_path / 'a' / 'history.json').read_text()) == json.loads((tmp_path / 'b' / 'history.json').read_text())
    if amp == 'fp16': assert set(straight.scalers) == {'net'}

def test_resume_extends_and_auto(tmp_path):
    "A finished run can be extended (total_steps is not part of the config); resume='auto' starts fresh or continues."
    a = _make(tmp_path / 'a', total=15); a.fit(resume='auto')    # 15: a multiple of log_every and eval_every
    b = _make(tmp_path / 'a', total=30); b.fit(resume='auto')
    c = _make(tmp_path / 'c', total=30); c.fit()
    _assert_identical(b, c)

def test_resume_config_mismatch_lists_keys(tmp_path):
    _make(tmp_path, total=8).fit()
    t = _make(tmp_path, total=8, config={'lr': 1e-3, 'net': {'width': 32}, 'betas': [0.9, 0.99]})
    with pytest.raises(ValueError) as e: t.fit(resume=True)
    msg = str(e.value)
    assert 'lr: checkpoint 0.003, now 0.001' in msg and 'net.width: checkpoint 16, now 32' in msg and 'betas' not in msg
    assert 'fresh out_dir' in msg
    with pytest.raises(ValueError, match='trainer.batch_size: checkpoint 8, now 4'): _make(tmp_path, total=8, batch_size=4).fit(resume=True)
    with pytest.raises(ValueError, match='trainer.seed'): _make(tmp_path, total=8, seed=1).fit(resume=True)

def test_existing_run_without_resume_raises(tmp_path):
    _make(tmp_path, total=4).fit()
    with pytest.raises(FileExistsError, match='resume=True'): _make(tmp_path, total=4).fit()
    with pytest.raises(FileNotFoundError, match='does not exist'): _make(tmp_path / 'none', total=4).fit(resume=True)

def test_corrupt_or_wrong_checkpoint_fails_clearly(tmp_path):
    _make(tmp_path, total=4).fit()
    p = tmp_path / 'last.pt'; raw = p.read_bytes()
    p.write_bytes(raw[:len(raw) // 2])
    with pytest.raises(CheckpointError, match='cannot resume.*(truncated or corrupt)'): _make(tmp_path, total=8).fit(resume=True)
    p.write_bytes(b'not a checkpoint at all')
    with pytest.raises(CheckpointError, match='cannot resume'): _make(tmp_path, total=8).fit(resume=True)
    p.write_bytes(raw)
    t = _make(tmp_path, total=8); t.kind = 'classifier'
    with pytest.raises(CheckpointError, match="holds a 'test' checkpoint"): t.fit(resume=True)

def test_history_files(tmp_path):
    t = _make(tmp_path, total=11); h = t.fit()
    assert [r['step'] for r in h] == [3, 5, 6, 9, 10, 11]          # log every 3, eval every 5, and the last step
    assert json.loads((tmp_path / 'history.json').read_text()) == h
    rows = list(csv.DictReader((tmp_path / 'history.csv').open()))
    assert len(rows) == len(h) and {'step', 'epoch', 'loss', 'noise', 'val', 'lr_net'} <= set(rows[0])
    assert rows[1]['loss'] == '' and rows[1]['val'] != ''                 # step 5: eval only
    assert all(0 <= r['noise'] <= 1 for r in h if 'noise' in r)
    fig = plot_history(tmp_path / 'history.json', [('loss', 'val'), 'noise'])
    assert len(fig.axes) == 2

def test_early_stopping_and_best(tmp_path):
    vals = iter([5., 4., 3., 3.5, 3.2, 3.1, 1.0])
    lin = nn.Linear(1, 1)
    t = Trainer({'m': lin}, {'m': torch.optim.SGD(lin.parameters(), 0.1)}, lambda tr, b: {}, _data(), 8, 100, tmp_path,
                eval_fn=lambda tr: {'val_loss': next(vals)}, eval_every=2, callbacks=[EarlyStopping(patience=3)], kind='test', device='cpu')
    t.fit()
    assert t.step == 12 and 'early stopping' in t.stop_reason
    assert load_checkpoint(tmp_path / 'best.pt', kind='test').metadata['step'] == 6
    assert load_checkpoint(tmp_path / 'last.pt', kind='test').state['callbacks']['EarlyStopping.0'] == {'best': 3.0, 'best_step': 6, 'wait': 3}
    with pytest.raises(KeyError, match='no .acc.'):
        Trainer({'m': lin}, {'m': torch.optim.SGD(lin.parameters(), 0.1)}, lambda tr, b: {}, _data(), 8, 4,
                eval_fn=lambda tr: {'val_loss': 1.0}, eval_every=2, callbacks=[EarlyStopping('acc')], device='cpu').fit()

def _two_layer():
    torch.manual_seed(0); return nn.Linear(3, 2), nn.Linear(2, 1)

def test_accumulate_then_step_equals_summed_loss():
    "backward(step=False) twice + optimizer_step == one backward of the summed loss; leaked grads are dropped."
    ds = _data()
    x, y = ds.tensors[0][:8], ds.tensors[1][:8]
    def run(mode):
        a, b = _two_layer()
        oa, ob = torch.optim.SGD(a.parameters(), 0.1), torch.optim.SGD(b.parameters(), 0.1)
        def step(tr, batch):
            A, B = tr.modules['a'], tr.modules['b']
            tr.backward(B(A(x)).square().mean(), 'a')           # gradient leaks into B's parameters
            l1, l2 = (B(A(x).detach()) - y).square().mean(), B(A(x).detach()).abs().mean()
            if mode == 'acc': tr.backward(l1, 'b', step=False); tr.backward(l2, 'b', step=False); tr.optimizer_step('b')
            else: tr.backward(l1 + l2, 'b')
            return {}
        t = Trainer({'a': a, 'b': b}, {'a': oa, 'b': ob}, step, ds, 8, 1, device='cpu'); t.fit()
        assert all(p.grad is None for p in [*a.parameters(), *b.parameters()])
        return [p.detach().clone() for p in b.parameters()]
    for p, q in zip(run('acc'), run('sum')): torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

def test_grad_clip_global_norm():
    lin = nn.Linear(3, 1); w0 = [p.detach().clone() for p in lin.parameters()]
    def step(tr, batch):
        x, y = batch; loss = 1e3 * (tr.modules['m'](x) - y).square().mean(); tr.backward(loss, 'm'); return {}
    t = Trainer({'m': lin}, {'m': torch.optim.SGD(lin.parameters(), 1.0)}, step, _data(), 8, 1, grad_clip=0.25, device='cpu'); t.fit()
    assert float(t.grad_norms['m']) > 0.25                              # the norm before clipping is reported
    delta = torch.cat([(p.detach() - q).flatten() for p, q in zip(lin.parameters(), w0)])
    assert abs(delta.norm().item() - 0.25) < 1e-5                       # SGD lr=1: the step is the clipped gradient

def test_bad_arguments():
    lin = nn.Linear(3, 1)
    with pytest.raises(ValueError, match='too small'): Trainer({'m': lin}, {'m': torch.optim.SGD(lin.parameters(), 1.)}, lambda t, b: {}, _data(4), 8, 1, device='cpu')
    with pytest.raises(TypeError, match='dict of name'): Trainer(lin, {'m': torch.optim.SGD(lin.parameters(), 1.)}, lambda t, b: {}, _data(), 8, 1)
    t = Trainer({'m': lin}, {'m': torch.optim.SGD(lin.parameters(), 1.)}, lambda t, b: t.backward(lin(b[0]).sum(), 'G'), _data(), 8, 1, device='cpu')
    with pytest.raises(KeyError, match="no optimizer named 'G'"): t.fit()
    with pytest.raises(ValueError, match='resume=True\\) needs out_dir'): t.fit(resume=True)

def test_epoch_batches_split_and_ema_beta():
    n, b, W = 37, 3, 4
    one = epoch_batches(n, W * b, 7, 2)
    ranks = [epoch_batches(n, b, 7, 2, r, W) for r in range(W)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(one)
    for i, g in enumerate(one): assert sorted(sum((r[i] for r in ranks), [])) == sorted(g)
    assert abs(ema_beta(32, 10) - 0.5 ** (32 / 10000)) < 1e-12
    assert init_distributed() == (0, 1)                                   # not under torchrun: nothing to join

# --- DDP under torchrun -----------------------------------------------------------------------------
DDP_SCRIPT = textwrap.dedent('''
    import sys, torch
    from pathlib import Path
    from torch import nn
    import torch.distributed as dist
    from torch.utils.data import TensorDataset
    from spruce_nb.training import Trainer, EMA, init_distributed, cleanup_distributed

    def step(tr, batch):
        x, y = batch
        loss = (tr.modules['m'](x) - y).square().mean()      # mean loss: the average of rank gradients is the global-batch gradient
        tr.backward(loss, 'm')
        return {'loss': loss.item()}

    def run(out, batch_size, total, ddp='wrap'):
        torch.manual_seed(0)
        x = torch.randn(64, 5); y = x @ torch.randn(5, 2) + 0.1 * torch.randn(64, 2)
        m = nn.Linear(5, 2)
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.5)
        return Trainer({'m': m}, {'m': opt}, step, TensorDataset(x, y), batch_size, total, out, ckpt_every=5, log_every=5,
                       device='cpu', kind='ddp-toy', config={'lr': 0.05}, ddp=ddp)

    def gan_step(tr, batch):                                   # the patterns DDP wrapping cannot handle
        real, = batch
        G, D = tr.modules['G'], tr.modules['D']
        z = torch.randn(real.shape[0], 4)
        tr.unwrap('D').requires_grad_(False)
        tr.backward(nn.functional.softplus(-D(G(z))).mean(), 'G')
        tr.unwrap('D').requires_grad_(True)
        tr.backward(nn.functional.softplus(D(G(z).detach())).mean() + nn.functional.softplus(-D(real)).mean(), 'D')
        if tr.step % 2 == 0:
            x = real.detach().requires_grad_(True)
            g, = torch.autograd.grad(D(x).sum(), x, create_graph=True)
            tr.backward(g.square().sum(1).mean(), 'D')
        tr.ema['G'].update(G)
        return {}

    if __name__ == '__main__':
        torch.set_num_threads(1)
        rank, world = init_distributed()
        assert world == 2, world
        out, b = Path(sys.argv[1]), int(sys.argv[2])
        for ddp in ('wrap', 'allreduce'):
            t = run(out / ddp, b, 20, ddp)
            assert (type(t.modules['m']).__name__ == 'DistributedDataParallel') == (ddp == 'wrap')
            assert t.steps_per_epoch == 8 and t.global_batch_size == 2 * b
            t.fit()
            t = run(out / ddp, b, 24, ddp)                     # resume under DDP: every rank restores its own RNG state
            t.fit(resume=True)
        torch.manual_seed(rank)                                # different inits per rank: rank 0's are broadcast
        G, D = nn.Sequential(nn.Linear(4, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1)), nn.Sequential(nn.Linear(1, 8), nn.LeakyReLU(0.2), nn.Linear(8, 1))
        opts = {n: torch.optim.Adam(m.parameters(), 1e-3, betas=(0.0, 0.99)) for n, m in (('G', G), ('D', D))}
        t = Trainer({'G': G, 'D': D}, opts, gan_step, TensorDataset(torch.randn(64, 1)), 4, 6, out / 'gan', ema={'G': EMA(G)},
                    device='cpu', ddp='allreduce', kind='ddp-gan')
        t.fit()
        for p in [*G.parameters(), *D.parameters(), *t.ema['G'].module.parameters()]:   # the ranks stayed in sync
            q = [torch.zeros_like(p) for _ in range(world)]; dist.all_gather(q, p.detach()); assert torch.equal(q[0], q[1])
        cleanup_distributed()
''')

def _free_port():
    with socket.socket() as s: s.bind(('127.0.0.1', 0)); return s.getsockname()[1]

@pytest.mark.timeout(180)
def test_torchrun_two_processes_match_single_process(tmp_path):
    script = tmp_path / 'ddp_toy.py'; script.write_text(DDP_SCRIPT)
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'SPRUCE_PROGRESS': '0', 'PYTHONPATH': f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_addr=127.0.0.1', f'--master_port={_free_port()}',
           str(script), str(tmp_path / 'ddp'), '4']
    for attempt in range(3):   # gloo on a loaded 2-core machine sometimes aborts a rank ('terminate called without an active exception'); only that is retried
        shutil.rmtree(tmp_path / 'ddp', ignore_errors=True)
        r = subprocess.run(cmd[:5] + [f'--master_port={_free_port()}'] + cmd[6:], env=env, capture_output=True, text=True, timeout=150)
        if r.returncode == 0 or 'terminate called without an active exception' not in r.stderr: break
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    # the same run in one process with the global batch 2 x 4
    spec = importlib.util.spec_from_file_location('ddp_toy', script); mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    single = mod.run(tmp_path / 'single', 8, 20); single.fit()
    single = mod.run(tmp_path / 'single', 8, 24); single.fit(resume=True)
    ck_one = load_checkpoint(tmp_path / 'single' / 'last.pt', kind='ddp-toy')
    w0 = mod.run(None, 8, 1).unwrap('m').weight
    assert not torch.allclose(ck_one.state['modules']['m']['weight'], w0, atol=1e-3)   # it did train
    for ddp in ('wrap', 'allreduce'):
        ck_ddp = load_checkpoint(tmp_path / 'ddp' / ddp / 'last.pt', kind='ddp-toy')
        assert ck_ddp.metadata['step'] == ck_one.metadata['step'] == 24
        assert ck_ddp.metadata['engine']['world_size'] == 2
        assert len(ck_ddp.state['rng']) == 2 and not torch.equal(ck_ddp.state['rng'][0]['torch'], ck_ddp.state['rng'][1]['torch'])
        for k, v in ck_one.state['modules']['m'].items():
            torch.testing.assert_close(ck_ddp.state['modules']['m'][k], v, rtol=1e-5, atol=1e-6)
        h_ddp, h_one = ck_ddp.state['history'], ck_one.state['history']
        assert [r['step'] for r in h_ddp] == [r['step'] for r in h_one] == [5, 10, 15, 20, 24]
        for a, b in zip(h_ddp, h_one): assert abs(a['loss'] - b['loss']) < 1e-5 * max(1, abs(b['loss']))   # metrics averaged over ranks
        assert json.loads((tmp_path / 'ddp' / ddp / 'history.json').read_text()) == h_ddp
    assert load_checkpoint(tmp_path / 'ddp' / 'gan' / 'last.pt', kind='ddp-gan').metadata['step'] == 6

def test_autocast_metrics_and_counters():
    lin = nn.Linear(3, 1)
    seen = {}
    def step(tr, batch):
        x, y = batch
        with tr.autocast():
            seen['outer'] = tr.modules['m'](x).dtype
            with tr.autocast(enabled=False): seen['inner'] = tr.modules['m'](x).dtype
            loss = (tr.modules['m'](x).float() - y).square().mean()
        tr.backward(loss, 'm')
        return {'loss': loss, 'bad': 'nan?' if tr.step == 1 else 0.0}
    t = Trainer({'m': lin}, {'m': torch.optim.SGD(lin.parameters(), 0.1)}, step, _data(), 8, 3, amp='bf16', device='cpu')
    with pytest.raises(TypeError, match="metric 'bad'"): t.fit()
    assert seen == {'outer': torch.bfloat16, 'inner': torch.float32}
    assert t.step == 2 and t.images_seen == 16 and t.global_batch_size == 8
    with pytest.raises(TypeError, match='map-style'):
        Trainer({'m': lin}, {'m': torch.optim.SGD(lin.parameters(), 0.1)}, step, iter(range(3)), 8, 3)
    with pytest.raises(ValueError, match="ddp='ring'"):
        Trainer({'m': lin}, {'m': torch.optim.SGD(lin.parameters(), 0.1)}, step, _data(), 8, 3, ddp='ring')

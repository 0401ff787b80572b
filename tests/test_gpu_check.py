"""bench/gpu_check.py (issue #28, GPU path): the script in its tiny CPU mode as a user runs it (subprocess), its budget
guard, and the CUDA-only branches of the trainers it drives, forced on the CPU where that is possible:
autocast in bf16 and fp16 (GradScaler) inside the real classifier/TRADES/e4e steps, StyleGAN2's fp16 blocks through a
whole training step and through PTI + the latent optimisation, and `non_blocking` host → device copies.
Not exercisable without a GPU: pinned memory (a CPU-only torch cannot pin) and the asynchrony of non_blocking copies."""
import importlib.util, json, math, os, subprocess, sys
from pathlib import Path
import pytest, torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / 'bench' / 'gpu_check.py'
ITEMS = ['classifier', 'trades', 'stylegan2', 'e4e', 'explain']

def _load():
    spec = importlib.util.spec_from_file_location('gpu_check', SCRIPT)
    m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    return m

def _run(*args, timeout=120):
    env = {**os.environ, 'OMP_NUM_THREADS': '1', 'SPRUCE_PROGRESS': '0'}
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)

def test_tiny_cpu_run_as_a_user_runs_it(tmp_path):
    out = tmp_path / 'gc.json'
    p = _run('--device', 'cpu', '--tiny', '--out', str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    res = json.loads(out.read_text())
    rows = {r['item']: r for r in res['items']}
    assert list(rows) == ITEMS and all(r['status'] == 'ok' for r in rows.values()), rows
    for k in ITEMS[:4]:   # the trainers: 1 warm-up step, 2 timed steps, finite losses of the last step
        r = rows[k]
        assert r['steps_timed'] == 2 and r['s_per_step'] > 0 and math.isclose(r['images_per_s'], r['batch'] / r['s_per_step'])
        assert r['last'] and all(math.isfinite(v) for v in r['last'].values()) and r['last']['step'] == 3
        assert r['peak_mem_gib'] is None                    # CPU: no CUDA memory counter
    e = rows['explain']
    assert e['invert_s'] > 0 and e['optimise_s'] > 0 and math.isclose(e['s_per_image'], (e['invert_s'] + e['optimise_s']) / e['batch'])
    assert res['tiny'] and 'no pretrained 256-px models' in res['note'] and res['environment']['device'] == 'cpu'
    assert 'no pretrained 256-px models exist' in p.stdout and 'wrote' in p.stdout
    for k in ITEMS: assert any(line.startswith(k) for line in p.stdout.splitlines()), f'{k} missing from the table'

def test_budget_guard_skips_items(tmp_path):
    out = tmp_path / 'gc.json'
    assert _load().main(['--device', 'cpu', '--tiny', '--budget-s', '0', '--only', 'classifier', 'explain', '--out', str(out)]) == 0
    rows = json.loads(out.read_text())['items']
    assert [(r['item'], r['status']) for r in rows] == [('classifier', 'skipped'), ('explain', 'skipped')]
    assert 'time budget' in rows[0]['reason']

def test_budget_stops_a_running_trainer():
    "A trainer past the deadline stops after its current step (CancelFit) and says so."
    gc = _load()
    S = gc.sizes(True)
    r = gc.item_classifier({**S, 'steps': 5}, torch.device('cpu'), deadline=0.0)
    assert r['steps_timed'] == 0 and r['stopped_by_budget'] is True

@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the message for machines without CUDA')
def test_cuda_requested_without_cuda(tmp_path):
    p = _run('--out', str(tmp_path / 'x.json'))
    assert p.returncode == 2 and 'no CUDA device' in p.stderr and not (tmp_path / 'x.json').exists()

def test_auto_amp_picks_the_cuda_dtype(monkeypatch):
    "resolve_amp('auto') on a CUDA device: bf16 where supported, else fp16 (+ GradScaler); fp32 on the CPU."
    from spruce_nb.training import resolve_amp
    cuda = torch.device('cuda', 0)
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: True)
    assert resolve_amp('auto', cuda) == torch.bfloat16 and resolve_amp(True, cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda *a, **k: False)
    assert resolve_amp('auto', cuda) == torch.float16
    assert resolve_amp('auto', torch.device('cpu')) is None

@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_cuda_branches_forced_on_cpu(monkeypatch, tmp_path, dtype):
    """The script's tiny run with the CUDA choices forced: the engine's 'auto' AMP resolves to `dtype` (fp16 adds the
    GradScaler), StyleGAN2's num_fp16_res blocks run in fp16, and batches are copied with non_blocking=True."""
    from spruce_nb import training, stylegan2
    gc = _load()
    real_resolve, real_to_device, real_autocast = training.resolve_amp, training._to_device, training.Trainer.autocast
    seen = dict(autocast=[], fp16_blocks=0, non_blocking=[], scalers=[])
    def resolve(amp, device):
        return dtype if amp in (True, 'auto') else real_resolve(amp, device)
    def to_device(x, device, non_blocking=False):
        seen['non_blocking'].append(non_blocking); return real_to_device(x, device, non_blocking=True)
    def autocast(self, enabled=True):
        seen['autocast'].append((self.kind, self.amp_dtype, enabled)); seen['scalers'].append((self.kind, sorted(self.scalers)))
        return real_autocast(self, enabled)
    def block_dtype(use_fp16, x, force_fp32=False):
        if use_fp16 and not force_fp32: seen['fp16_blocks'] += 1; return torch.float16
        return torch.float32
    monkeypatch.setattr(training, 'resolve_amp', resolve)
    monkeypatch.setattr(training, '_to_device', to_device)
    monkeypatch.setattr(training.Trainer, 'autocast', autocast)
    monkeypatch.setattr(stylegan2, '_block_dtype', block_dtype)
    out = tmp_path / 'gc.json'
    only = ITEMS if dtype == torch.bfloat16 else ['classifier', 'trades', 'e4e']   # fp16 blocks do not depend on `dtype`: once is enough
    assert gc.main(['--device', 'cpu', '--tiny', '--only', *only, '--out', str(out)]) == 0
    rows = {r['item']: r for r in json.loads(out.read_text())['items']}
    assert list(rows) == only
    assert all(r['status'] == 'ok' for r in rows.values()), {k: (r['status'], r.get('error'), r.get('last')) for k, r in rows.items()}
    kinds = {k for k, d, on in seen['autocast'] if d == dtype and on}
    assert {'classifier-training', 'e4e-training'} <= kinds            # TRADES runs as classifier-training with make_trades_step
    scalers = {'classifier-training': ['model'], 'e4e-training': ['disc', 'encoder']} if dtype == torch.float16 else {}
    assert all(s == scalers.get(k, []) for k, s in seen['scalers']), seen['scalers']
    assert seen['fp16_blocks'] > 0 or dtype == torch.float16
    assert seen['non_blocking'] and seen['non_blocking'][0] is False   # the engine asks for non_blocking on CUDA only (forced True here)
    assert 'amp=' + str(dtype).replace('torch.', '') in rows['classifier']['config']

"""Shared pytest setup: small, single-threaded, repeatable runs on a 2-core CPU machine."""
import os
os.environ.setdefault('SPRUCE_TINY', '1')
os.environ.setdefault('SPRUCE_PROGRESS', '0')
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
import torch
torch.set_num_threads(1)

import pytest

@pytest.fixture
def real_weights():
    """The pretrained networks of `spruce weights install` (LPIPS trunks, FID Inception, EfficientNet-Lite0).
    Locally a test that needs them skips without them; in CI ($CI set) their absence is a failure, never a silent skip."""
    from spruce_nb.weights import NETWORKS, resolve_weights
    missing = [n for n in NETWORKS if resolve_weights(n) is None]
    if missing:
        msg = f"pretrained weights not installed ({', '.join(missing)}): run `spruce weights install`"
        if os.environ.get('CI'): pytest.fail(msg + ' (CI must run the real-weight tests; the test command installs them first)')
        pytest.skip(msg)


@pytest.fixture(scope='module')
def tiny_models_and_oracle(request, tmp_path_factory):
    "A 32-px tiny model directory (`tiny_model_dir`) and a phantom oracle beside it, once per test module: (root, model_dir)."
    from spruce_nb.evaluate import tiny_model_dir
    from spruce_nb.data import fit_oracle
    root = tmp_path_factory.mktemp(request.module.__name__.split('.')[-1])
    md = tiny_model_dir(root / 'models')
    fit_oracle('cxr', n=200, size=32, n_test=50).save(root / 'oracle.pt')
    return root, md

"""Shared pytest setup: small, single-threaded, repeatable runs on a 2-core CPU machine."""
import os
os.environ.setdefault('SPRUCE_TINY', '1')
os.environ.setdefault('SPRUCE_PROGRESS', '0')
os.environ.setdefault('OMP_NUM_THREADS', '1')
os.environ.setdefault('MPLBACKEND', 'Agg')
import torch
torch.set_num_threads(1)

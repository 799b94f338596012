import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# One thread per process: tests spawn several ranks on small CI machines, and oversubscribed
# OpenMP threads make small kernels ~10x slower.
torch.set_num_threads(1)


@pytest.fixture
def repo_root() -> str:
    return ROOT

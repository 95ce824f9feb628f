import os
import sys
from typing import Iterator

import pytest
import torch

from engm_opacus.training.runtime import torch_threads

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny float64 models: one torch thread is as fast and does not stall on a busy 2-core machine."""
    with torch_threads(1):
        yield

"""Test-suite set-up. Without a CUDA device, Triton kernels run under the Triton interpreter on CPU
tensors, so their indexing, masking and backward are tested here too (at small shapes). This must happen
before anything imports triton, hence at conftest import time."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield

import os

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="small shapes only")


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick")


def pytest_configure(config):
    # Benchmarks are quoted for a fixed thread count (the 2-core development/CI machine).
    torch.set_num_threads(int(os.environ.get("CLFAST_BENCH_THREADS", "2")))

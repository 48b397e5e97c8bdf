"""Test-suite set-up. Without a CUDA device, Triton kernels run under the Triton interpreter on CPU
tensors, so their indexing, masking and backward are tested here too (at small shapes). This must happen
before anything imports triton, hence at conftest import time.

Hypothesis profiles for the property-based tests (tests/ops/test_fuzz_*.py), chosen by CLFAST_FUZZ_PROFILE:
``fast`` (the default: few examples per test, derandomized so that CI is deterministic) and ``fuzz`` (``make
fuzz``: many examples, random, failures saved under .pytest_cache/hypothesis and replayed first);
CLFAST_FUZZ_EXAMPLES=n changes the profile's count. A test's number of examples is the profile's ``max_examples``
times its weight (tests/ops/_fuzz.py: ``budget``)."""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))

try:
    from hypothesis import HealthCheck, settings
    from hypothesis.database import DirectoryBasedExampleDatabase
except ImportError:  # the fuzz tests then fail at import, naming hypothesis; the rest of the suite runs
    settings = None
else:
    # Cases are slow by hypothesis's standards (every backend, gradients, the Triton interpreter): no deadline.
    _COMMON = dict(deadline=None, print_blob=True,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    settings.register_profile("fast", max_examples=12, derandomize=True, database=None, **_COMMON)
    settings.register_profile("fuzz", max_examples=400, **_COMMON,
                              database=DirectoryBasedExampleDatabase(".pytest_cache/hypothesis"))
    settings.load_profile(os.environ.get("CLFAST_FUZZ_PROFILE", "fast"))
    if os.environ.get("CLFAST_FUZZ_EXAMPLES"):  # e.g. CLFAST_FUZZ_EXAMPLES=100: the profile with another count
        settings.register_profile("custom", settings.default,
                                  max_examples=int(os.environ["CLFAST_FUZZ_EXAMPLES"]))
        settings.load_profile("custom")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def pytest_terminal_summary(terminalreporter):
    fuzz = sys.modules.get("tests.ops._fuzz")
    if fuzz is not None and fuzz.CASES["run"]:
        profile = os.environ.get("CLFAST_FUZZ_PROFILE", "fast")
        terminalreporter.write_line(f"hypothesis: {fuzz.CASES['run']} generated cases run "
                                    f"(profile {profile}, max_examples {settings.default.max_examples})")

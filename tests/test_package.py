"""The package as a user meets it: import without the compiled extension, `clfast info`, the CLI."""

import os
import subprocess
import sys

import clfast

_BLOCK_EXT = """
import importlib.abc, sys
class _Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "clfast._C":
            raise ImportError("simulated missing extension")
sys.meta_path.insert(0, _Block())
"""


def _python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def test_import_without_extension_warns_once_and_falls_back():
    code = _BLOCK_EXT + """
import warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    import clfast
    import clfast.ops
import torch
q = torch.randn(1, 2, 3, 8)
out = clfast.ops.prefix_attention(q, q, q, torch.randn(2, 1, 8), torch.randn(2, 1, 8))
from clfast.ops import attention
print("backend", clfast.ops.select("prefix_attention", attention._validate(q, q, q, None, None, None, None)).NAME)
print("warnings", sum("clfast._C could not be loaded" in str(x.message) for x in w))
print(clfast.info.report() if hasattr(clfast, "info") else __import__("clfast.info").info.report())
"""
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert "backend torch" in res.stdout
    assert "warnings 1" in res.stdout
    assert "cpu        devices=cpu" in res.stdout and "compiled extension clfast._C not loaded" in res.stdout


def test_clfast_info_cli_and_module():
    for cmd in ([sys.executable, "-m", "clfast", "info"], [sys.executable, "-m", "clfast.info"]):
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr
        assert f"clfast {clfast.__version__}" in res.stdout
        assert "op prefix_attention" in res.stdout
        assert "extension clfast._C: compiler=" in res.stdout


def test_cli_rejects_unknown_command():
    res = subprocess.run([sys.executable, "-m", "clfast", "trian"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "invalid choice: 'trian'" in res.stderr


def test_source_checkout_does_not_shadow_an_installed_kernels_package():
    # transformers 5 (under sentence-transformers) imports Hugging Face's `kernels`; with the repository
    # root on sys.path (python -m from a checkout, pytest) our kernels/ folder must not hide it
    import importlib.metadata

    importlib.metadata.version("kernels")  # installed with transformers; a missing one is a setup error
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import kernels, clfast.kernels.prefix_attention as pa, os\n"
            "assert os.path.dirname(os.path.dirname(kernels.__file__)) != os.getcwd(), kernels.__file__\n"
            "from kernels import Device\n"
            "import sentence_transformers\n"
            "print(pa.__name__)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "clfast.kernels.prefix_attention"

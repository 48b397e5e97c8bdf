"""Backend selection: priority order, forcing by context manager and environment, helpful errors."""

import os
import subprocess
import sys

import pytest
import torch

from clfast.ops import _dispatch, use_backend
from clfast.ops import attention as pa_mod


def _inputs(dtype=torch.float32):
    q = torch.randn(1, 2, 3, 8, dtype=dtype)
    return pa_mod._validate(q, q, q, None, None, None, None)


def test_use_backend_forces_and_restores():
    before = _dispatch.select("prefix_attention", _inputs()).NAME
    with use_backend("reference"):
        assert _dispatch.select("prefix_attention", _inputs()).NAME == "reference"
        with use_backend("torch", op="prefix_attention"):
            assert _dispatch.select("prefix_attention", _inputs()).NAME == "torch"
        assert _dispatch.select("prefix_attention", _inputs()).NAME == "reference"
    assert _dispatch.select("prefix_attention", _inputs()).NAME == before


def test_use_backend_unknown_names_raise():
    with pytest.raises(ValueError, match="unknown backend 'nope'"):
        with use_backend("nope"):
            pass
    with pytest.raises(ValueError, match="unknown op 'attn'"):
        with use_backend("cpu", op="attn"):
            pass


def test_forced_backend_that_cannot_run_is_an_error_with_reasons():
    if "cpu" not in _dispatch.backends("prefix_attention"):
        pytest.fail("cpu backend not registered")
    with use_backend("cpu", op="prefix_attention"):
        with pytest.raises(ValueError, match="forced backend 'cpu' cannot run these inputs: .*float64"):
            _dispatch.select("prefix_attention", _inputs(torch.float64))


def test_no_backend_fits_lists_every_backend_with_reasons():
    class Only(_dispatch.Backend):
        OP, NAME, DEVICES, DTYPES = "_test_op", "only", ("cuda",), (torch.float16,)

    _dispatch.register_backend(Only)
    _dispatch.set_priority("_test_op", "cpu", ["only"])
    try:
        with pytest.raises(ValueError) as info:
            _dispatch.select("_test_op", _inputs())
        msg = str(info.value)
        assert "no backend can run" in msg and "only:" in msg
        assert "device cpu not in ('cuda',)" in msg and "dtype float32 not in (float16)" in msg
    finally:
        _dispatch._REGISTRY.pop("_test_op")
        _dispatch._PRIORITY.pop("_test_op")


def test_register_same_name_twice_is_rejected():
    class Dup(_dispatch.Backend):
        OP, NAME, DEVICES, DTYPES = "prefix_attention", "reference", ("cpu",), (torch.float32,)

    with pytest.raises(ValueError, match="already registered"):
        _dispatch.register_backend(Dup)


@pytest.mark.parametrize("value,expected", [
    ("", {}),
    ("cpu", {None: "cpu"}),
    ("retrieve=faiss, prefix_attention=reference", {"retrieve": "faiss", "prefix_attention": "reference"}),
    ("torch,retrieve=faiss", {None: "torch", "retrieve": "faiss"}),
])
def test_env_parsing(value, expected):
    assert _dispatch._parse_env(value) == expected


def test_env_var_forces_backend_in_a_fresh_process():
    code = ("import torch, clfast; from clfast.ops import attention as m;"
            "q=torch.randn(1,1,2,4); print(clfast.ops.select('prefix_attention', m._validate(q,q,q,None,None,None,None)).NAME)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "CLFAST_BACKEND": "prefix_attention=reference"}, check=True)
    assert out.stdout.strip() == "reference"


def test_info_lists_every_op_and_backend():
    from clfast.info import report

    text = report()
    for name in _dispatch.backends("prefix_attention"):
        assert f"  {name} " in text
    assert "priority on cpu: cpu > torch > reference" in text

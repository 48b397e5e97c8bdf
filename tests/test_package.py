"""The package as a user meets it: import without the compiled extension, `clfast info`, the CLI."""

import os
import subprocess
import sys

import pytest

import clfast
from clfast import _ext
from clfast.utils.cpu import KERNEL_ISA, cpu_flags, cpu_model, isa_flags

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
        assert f"cpu: {cpu_model()} ({isa_flags()})" in res.stdout


# two processors, as /proc/cpuinfo lists them (the first one's fields are read)
CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx2 fma avx512f avx512bw amx_bf16 amx_tile avx512_bf16

processor\t: 1
model name\t: another
flags\t\t: fpu
"""


def test_cpu_model_and_isa_flags_read_the_first_processor(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(CPUINFO)
    assert cpu_model(str(path)) == "Intel(R) Xeon(R) Platinum 8480+"
    assert cpu_flags(str(path)) == {"fpu", "sse2", "avx2", "fma", "avx512f", "avx512bw", "amx_bf16", "amx_tile",
                                    "avx512_bf16"}
    assert isa_flags(str(path)) == "avx2 fma avx512f avx512bw avx512_bf16 amx_tile amx_bf16"      # KERNEL_ISA order
    missing = str(tmp_path / "none")
    assert cpu_flags(missing) is None and isa_flags(missing) == "unknown" and cpu_model(missing) != ""
    path.write_text("processor\t: 0\nflags\t\t: fpu sse2\n")
    assert isa_flags(str(path)) == "none of " + " ".join(KERNEL_ISA)


def _cpu_flags() -> set:
    return cpu_flags() or set()


@pytest.mark.skipif(_ext.EXT_ERROR is not None, reason="needs the compiled extension clfast._C")
@pytest.mark.skipif(not {"avx2", "fma"} <= _cpu_flags(), reason="needs an x86 CPU with AVX2 and FMA "
                    "(read from /proc/cpuinfo)")
def test_cpu_kernels_info_reports_the_forms_chosen_here():
    """The run-time choice, not the build's baseline (build_info says simd=avx2 on an AVX-512 machine too): the
    AVX-512 forms exactly where the CPU has F/BW/VL/DQ/BF16, off under CLFAST_CPU_DISABLE_AVX512=1; bf16 GEMMs
    computed in fp32 on a CPU without any bf16 instructions."""
    flags = _cpu_flags()
    avx512 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= flags
    code = "import clfast._ext as e; print(e.cpu_kernels_info())"
    here = _python(code, CLFAST_CPU_DISABLE_AVX512="0")
    off = _python(code, CLFAST_CPU_DISABLE_AVX512="1")
    assert here.returncode == 0 and off.returncode == 0, here.stderr + off.stderr
    assert here.stdout.startswith("simd forms=avx512;" if avx512 else "simd forms=avx2"), here.stdout
    assert off.stdout.startswith("simd forms=avx2 (avx512 forms off: CLFAST_CPU_DISABLE_AVX512=1)"), off.stdout
    if not flags & {"avx512_bf16", "amx_bf16", "avx_ne_convert"}:
        assert "bf16=computed in fp32" in here.stdout, here.stdout
    nogemm = _python(code, CLFAST_CPU_DISABLE_BRGEMM="1")
    assert "brgemm fp32=no (at::mm)" in nogemm.stdout and "bf16=computed in fp32" in nogemm.stdout, nogemm.stdout
    assert "cpu kernels here: simd forms=" in _python("import clfast.info as i; print(i.report())").stdout
    fields = _python("import clfast._ext as e; print(e.cpu_kernels())", CLFAST_CPU_DISABLE_AVX512="1").stdout
    assert "'simd': 'avx2', 'simd_note': 'avx512 forms off: CLFAST_CPU_DISABLE_AVX512=1'" in fields, fields
    assert "'fp32': 'yes'" in fields or "'fp32': 'no (at::mm)'" in fields, fields
    assert ("'bf16': 'computed in fp32'" in fields) == ("bf16=computed in fp32" in here.stdout), fields


def test_cpu_kernels_reads_each_form_of_the_info_text(monkeypatch):
    """``cpu_kernels()`` is the one reader of the extension's text (report.py's header uses it): each form the C++
    side writes, a missing extension, and text it cannot read refused by name."""
    monkeypatch.setattr(_ext, "EXT_ERROR", None)
    texts = {
        "simd forms=avx512; brgemm fp32=yes; bf16=native; fp16=native":
            {"simd": "avx512", "simd_note": "", "fp32": "yes", "bf16": "native", "fp16": "native"},
        "simd forms=scalar (avx512 forms compiled; this CPU lacks avx512 f/bw/vl/dq/bf16); brgemm fp32=no (at::mm); "
        "bf16=computed in fp32; fp16=computed in fp32":
            {"simd": "scalar", "simd_note": "avx512 forms compiled; this CPU lacks avx512 f/bw/vl/dq/bf16",
             "fp32": "no (at::mm)", "bf16": "computed in fp32", "fp16": "computed in fp32"},
    }
    for text, fields in texts.items():
        monkeypatch.setattr(_ext, "cpu_kernels_info", lambda text=text: text)
        assert _ext.cpu_kernels() == fields
    monkeypatch.setattr(_ext, "cpu_kernels_info", lambda: "simd=avx2")
    with pytest.raises(RuntimeError, match="cannot read 'simd=avx2'"):
        _ext.cpu_kernels()
    monkeypatch.setattr(_ext, "EXT_ERROR", "clfast._C not built")
    assert _ext.cpu_kernels() == {"error": "clfast._C not built"}


def test_cli_rejects_unknown_command():
    res = subprocess.run([sys.executable, "-m", "clfast", "trian"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "invalid choice: 'trian'" in res.stderr


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Entry points that must not load the compiled extension, any op or Triton: what a user touches first.
_LIGHT_ENTRY_POINTS = {
    "import clfast.data": "import clfast.data",
    "import clfast.engine.config": "import clfast.engine.config",
    "clfast --help": ("import runpy\n"
                      "sys.argv = ['clfast', '--help']\n"
                      "try:\n"
                      "    runpy.run_module('clfast', run_name='__main__', alter_sys=True)\n"
                      "except SystemExit as exc:\n"
                      "    assert exc.code == 0, exc.code\n"),
}
_HEAVY = ("clfast._C", "clfast.ops", "clfast.kernels", "triton")


@pytest.mark.parametrize("entry", [
    "import clfast.data",
    "import clfast.engine.config",
    "clfast --help",
])
def test_light_entry_points_load_no_kernels(entry):
    code = ("import sys\n" + _LIGHT_ENTRY_POINTS[entry] + "\n"
            f"heavy = {_HEAVY!r}\n"
            "print('HEAVY', sorted(m for m in sys.modules if any(m == h or m.startswith(h + '.') for h in heavy)))\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "HEAVY []" in res.stdout, f"{entry} loaded: {res.stdout[res.stdout.rfind('HEAVY'):]}"


def test_clfast_exposes_its_subpackages_lazily():
    code = ("import sys, clfast\n"
            "assert 'clfast.ops' not in sys.modules\n"
            "assert 'ops' in dir(clfast)\n"
            "print(clfast.__version__, clfast.ops.prefix_attention.__module__, 'clfast.ops' in sys.modules)\n"
            "try:\n"
            "    clfast.no_such_thing\n"
            "except AttributeError as exc:\n"
            "    print('AttributeError', exc)\n")
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"{clfast.__version__} clfast.ops.attention True" in res.stdout
    assert "AttributeError module 'clfast' has no attribute 'no_such_thing'" in res.stdout


def test_source_checkout_does_not_shadow_an_installed_kernels_package():
    # transformers 5 (under sentence-transformers) imports Hugging Face's `kernels`; with the repository
    # root on sys.path (python -m from a checkout, pytest) our kernels/ folder must not hide it
    import importlib.metadata

    importlib.metadata.version("kernels")  # installed with transformers; a missing one is a setup error
    code = ("import kernels, clfast.kernels.prefix_attention as pa, os\n"
            "assert os.path.dirname(os.path.dirname(kernels.__file__)) != os.getcwd(), kernels.__file__\n"
            "from kernels import Device\n"
            "import sentence_transformers\n"
            "print(pa.__name__, os.path.relpath(pa.__file__))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    # this checkout's kernels, not those of the checkout an editable install points at
    assert out.stdout.split() == ["clfast.kernels.prefix_attention", os.path.join("kernels", "prefix_attention.py")]


def test_source_checkout_holds_no_package_named_kernels():
    # The kernels/ folder has no __init__.py: without an installed `kernels` the name is at most an empty
    # PEP 420 namespace portion, which any installed package or module of that name outranks wherever it
    # sits on sys.path (and which transformers' availability check reports as not installed).
    assert not os.path.exists(os.path.join(ROOT, "kernels", "__init__.py"))
    code = ("import importlib.util\n"
            "spec = importlib.util.find_spec('kernels')\n"
            "print('SPEC', 'absent' if spec is None else 'namespace' if spec.origin is None "
            "and spec.submodule_search_locations is not None else spec.origin)\n")
    # -S: no site-packages, so Hugging Face's kernels is absent; the repository root is sys.path[0]
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() in ("SPEC absent", "SPEC namespace"), out.stdout

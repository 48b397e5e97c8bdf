"""benchmarks/probe_attention.py: the ONEDNN_VERBOSE summary (parsed from oneDNN's own lines), the FLOP counts the
rates rest on, the paired timing, and the tables end to end at the quick shape."""

from __future__ import annotations

import pytest

from benchmarks import probe_attention as pa
from clfast import _ext

# oneDNN 3.x lines as ONEDNN_VERBOSE=1 prints them (the AMX matmul line as a Xeon prints it; fields as documented)
VERBOSE = """\
onednn_verbose,v1,info,oneDNN v3.12.0 (commit 80afa71049cd69a3df32adcccb623b12cd7baa22)
onednn_verbose,v1,info,cpu,runtime:OpenMP,nthr:2
onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with float16, Intel DL Boost and bfloat16 support and Intel AMX with \
bfloat16 and 8-bit integer support
probe-mark,peer
onednn_verbose,v1,primitive,create:cache_miss,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:abc::f0 \
wei:bf16::blocked:acb::f0 dst:bf16::blocked:abc::f0,,,192x197x64:192x64x217,0.5
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:abc::f0 \
wei:bf16::blocked:acb::f0 dst:bf16::blocked:abc::f0,,,192x197x64:192x64x217,0.25
onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx10_1_512_amx,undef,src:bf16::blocked:abc::f0 \
wei:bf16::blocked:abc::f0 dst:bf16::blocked:abc::f0,,,192x197x217:192x217x64,0.5
probe-mark,cpu
onednn_verbose,v1,primitive,warning,ukernel,Scratchpad is not cache-line aligned,src/cpu/x64/ukernel/brgemm.cpp:207
onednn_verbose,v1,ukernel,exec,cpu,brgemm,,undef,src:bf16::blocked:ab::f0 wei:bf16::blocked:ab:32x1:f0 \
dst:f32::blocked:ab:32x1:f0,,bs:1 beta:0,197x64:64x218,0.125
onednn_verbose,v1,ukernel,exec,cpu,brgemm,,undef,src:bf16::blocked:ab::f0 wei:bf16::blocked:ab::f0 \
dst:f32::blocked:ab::f0,,bs:1 beta:0,197x218:218x64,0.0625
onednn_verbose,v1,ukernel,exec,cpu,brgemm,,undef,src:bf16::blocked:ab::f0 wei:bf16::blocked:ab:32x1:f0 \
dst:f32::blocked:ab:32x1:f0,,bs:1 beta:0,197x64:64x218,0.125
some other line
"""


def test_parse_onednn_attributes_each_execution_to_its_mark():
    s = pa.parse_onednn(VERBOSE)
    assert s["isa"].startswith("Intel AVX-512 with float16, ") and s["isa"].endswith("8-bit integer support")
    assert dict(s["primitives"]["peer"]) == {("matmul", "brg_matmul:avx10_1_512_amx"): [2, 0.75]}  # not the create
    assert not s["primitives"]["cpu"] and not s["ukernels"]["peer"]
    calls, ms, shapes = s["ukernels"]["cpu"][("brgemm", "bf16")]
    assert (calls, ms, shapes) == (3, 0.3125, {"197x64:64x218", "197x218:218x64"})


def test_flops_count_two_gemms_forward_and_five_backward():
    shape = dict(B=2, H=3, N=5, d=4, P=1)
    assert pa.flops(shape, "fwd") == 2 * 2 * (2 * 3 * 5 * 6 * 4)
    assert pa.flops(shape, "fwd+bwd") == (2 + 5) * 2 * (2 * 3 * 5 * 6 * 4)


def test_paired_ms_runs_each_function_once_per_round_in_alternating_order():
    order = []
    fns = {n: (lambda n=n: order.append(n)) for n in ("a", "b", "c")}
    ms = pa.paired_ms(fns, rounds=2)
    assert order == ["a", "b", "c", "a", "b", "c", "c", "b", "a"]          # warm-ups, then a round each way
    assert set(ms) == {"a", "b", "c"} and all(v >= 0 for v in ms.values())


@pytest.mark.skipif(_ext.missing_op_reason("cpu_phase_counters") is not None,
                    reason="needs the compiled extension clfast._C (the cpu backend and its phase counters)")
def test_tables_end_to_end_at_the_quick_shape():
    body = pa.run(["fp32"], quick=True, rounds=1)
    for impl in pa.IMPLS:
        for mode in pa.MODES:
            assert f"| fp32 | {mode} | {impl} |" in body
    for part in ("forward", "backward"):
        for phase in ("gemm", "elementwise", "pack", "store", "other (in tasks)"):
            assert f"| fp32 | {part} | {phase} |" in body
    assert "| fp32 | cpu | " in body and "ukernel brgemm | src f32" in body   # the child's verbose lines, parsed
    assert "oneDNN ISA" in body and "| None |" not in body                   # its info line found

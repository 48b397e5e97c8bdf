"""benchmarks/profile_train.py: a profiled step's own time split into phases (query, forward, backward, optimizer)
and ops, the paired rounds, and the per-method table; end to end on the shipped tiny ViT."""

from __future__ import annotations

import pytest
import torch

from benchmarks import profile_train as pt
from benchmarks import steps


class _Backbone(torch.nn.Module):
    """A frozen 'backbone' whose query is a matmul nothing else in the step runs (``aten::bmm``)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(1, 64, 64), requires_grad=False)

    def query(self, x):
        with torch.no_grad():
            return torch.bmm(x.unsqueeze(0), self.w)[0]


class _Method(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = _Backbone()
        self.head = torch.nn.Linear(64, 64)


def _step(method, opt, x):
    def run():
        opt.zero_grad(set_to_none=True)
        q = method.backbone.query(x)
        loss = torch.nn.functional.gelu(method.head(x + q)).square().mean()
        loss.backward()
        opt.step()
        return float(loss.detach())
    return run


def test_phases_and_ops_of_a_profiled_step():
    torch.manual_seed(0)
    method = _Method()
    opt = torch.optim.Adam(method.head.parameters(), lr=1e-3)
    x = torch.randn(256, 64)
    fn = _step(method, opt, x)
    fn()
    walls = pt.paired({"a": fn, "b": fn}, 3)
    assert [len(w) for w in walls.values()] == [3, 3] and all(t > 0 for w in walls.values() for t in w)
    p = pt.profile(fn, method, walls["a"])
    assert "query" not in vars(method.backbone)          # the wrapper is gone again
    assert set(p.phases) <= set(pt.PHASES) and all(p.phases[ph] > 0 for ph in pt.PHASES)
    ops = {op: ph for (ph, op) in p.ops}
    assert ops["aten::bmm"] == "query"                   # only the query runs a bmm
    assert ops["aten::addmm"] == "forward"               # the head's forward
    assert ("backward", "aten::gelu_backward") in p.ops and ("forward", "aten::gelu_backward") not in p.ops
    assert any(ph == "optimizer" and op.startswith("aten::") for ph, op in p.ops)     # Adam's update
    # each op's own time is counted once: the phases add up to the ops
    assert sum(p.phases.values()) == pytest.approx(sum(p.ops.values()), rel=1e-9)
    assert sum(p.phases.values()) <= p.profiled_s * 1.05 + 1e-3


def test_table_speed_up_per_round_and_compile_row():
    prof = {c: pt.Profile(w, 1.0, {"forward": 0.5, "backward": 0.25}, {("forward", "aten::addmm"): 0.4,
                                                                       ("backward", "aten::mm"): 0.2})
            for c, w in {"peer": [2.0, 3.0, 4.0], "clfast": [1.0, 2.0, 1.0]}.items()}
    prof["clfast"].ops[("backward", "clfast::x")] = 0.6
    text = pt.table("m", prof, top=2, first={"peer": 2.5, "clfast": 30.0})
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in text.splitlines()[2:]}
    assert rows["step s, median of 3"] == ["3.000", "1.000"]
    # per-round ratios 2.0, 1.5, 4.0: median 2.0, range 1.5-4.0 (not the ratio of the medians, 3.0)
    assert rows["speed-up vs peer, per round (range)"] == ["1.00× (1.00–1.00)", "2.00× (1.50–4.00)"]
    assert rows["first step s (compile: the compile)"] == ["2.500", "30.000"]
    assert rows["**forward**"] == ["0.500", "0.500"] and rows["**query**"] == ["0.000", "0.000"]
    # the top 2 (phase, op) pairs by their largest time in any configuration; – where a configuration has none
    assert rows["backward: `clfast::x`"] == ["–", "0.600"]
    assert rows["forward: `aten::addmm`"] == ["0.400", "0.400"]
    assert "backward: `aten::mm`" not in rows
    # without a peer the ratios are against the first configuration
    del prof["peer"]
    prof["compile"] = pt.Profile([0.5, 1.0, 2.0], 1.0, {}, {})
    rows = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")[1:]]
            for r in pt.table("m", prof, top=0).splitlines()[2:]}
    assert rows["speed-up vs clfast, per round (range)"] == ["1.00× (1.00–1.00)", "2.00× (0.50–2.00)"]


def test_profile_train_quick_run_writes_the_block(tmp_path):
    """The whole tool on the shipped tiny ViT: L2P peer and clfast, one round, into a BENCHMARKS.md copy."""
    path = tmp_path / "B.md"
    path.write_text("# bench\n")
    assert pt.main(["--quick", "-m", "l2p", "--configs", "peer", "clfast", "--rounds", "1", "--top", "3",
                    "--write", "--path", str(path)]) == 0
    text = path.read_text()
    assert "<!-- bench:profile:begin -->" in text and "<!-- bench:profile:end -->" in text
    assert "| l2p | peer | clfast |" in text and "Machine:" in text
    assert "query: `aten::addmm`" in text or "forward: `aten::addmm`" in text
    with pytest.raises(SystemExit):
        pt.main(["--rounds", "-1"])


def test_compiled_graph_calls_lose_their_hash():
    assert pt.op_name("## Call CompiledFxGraph fo4ovchu4g7hhlwthpodwatbhm3 ##") == "[compiled graph]"
    assert pt.op_name("aten::addmm") == "aten::addmm"


def _backward_mm_calls(s) -> int:
    fn = steps.step_fn(s, "clfast")
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(1 for e in prof.events() if e.name == "aten::mm" and pt.phase_of(e) == "backward")


def test_the_frozen_backbone_costs_one_backward_gemm_per_linear(tmp_path):
    """A DualPrompt step (prompts from block 0) back-propagates through every block of the frozen ViT: one GEMM per
    linear layer (the input's gradient, never the frozen weight's) but block 0's qkv (its input, the embedded
    patches, needs no gradient: the backward stops at the shallowest prompted block), plus the head's two; with the
    backbone's weights trainable the weight gradients add one GEMM per linear."""
    s = steps.setup("dualprompt", quick=True, batch_size=4, out=str(tmp_path))
    linears = sum(isinstance(m, torch.nn.Linear) for m in s.method.backbone.vit.blocks.modules())
    assert linears == 4 * len(s.method.backbone.vit.blocks)
    assert _backward_mm_calls(s) == (linears - 1) + 2
    # the mutant, weight gradients of the frozen layers: one more GEMM per linear, and block 0's qkv now needs its
    # input's gradient too (its LayerNorm's affine weights are trainable)
    s.method.backbone.vit.blocks.requires_grad_(True)
    assert _backward_mm_calls(s) == 2 * linears + 2

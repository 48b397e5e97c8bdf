"""The floor each benchmarked variant's step must pay (benchmarks/steps.py: ``Variant.pays``, ``must_pay_fn``): that
it is the right floor for the method's step (the step's backward reaches the block the floor's does; its query pass
is the method's own), and that it runs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from benchmarks import steps


def _blocks(s: steps.StepSetup, vlm: bool):
    return s.method.vlm.fusion.layers if vlm else s.method.backbone.vit.blocks


def _blocks_with_grad(s: steps.StepSetup, vlm: bool) -> list[int]:
    """Indices of the backbone's blocks (the VLM's fusion layers) whose MLP output needs a gradient in one clfast
    step: those the step's backward runs through (the MLP: every block calls it, also where the backbone runs a
    block's parts itself, as with ``site_fns``)."""
    seen: list[int] = []
    hooks = [b.mlp.register_forward_hook(lambda m, args, out, i=i: seen.append(i) if out.requires_grad else None)
             for i, b in enumerate(_blocks(s, vlm))]
    try:
        steps.step_fn(s, "clfast")()
    finally:
        for h in hooks:
            h.remove()
    return sorted(set(seen))


@pytest.mark.parametrize("name", [n for n, v in steps.VARIANTS.items() if v.pays])
def test_each_variant_pays_the_floor_its_step_runs(name, tmp_path, monkeypatch):
    """``floor`` (the backward through every block) exactly where the step's backward reaches block 0 (every
    variant prompts block 0), ``floor_head`` where it reaches none; ``query`` where the step calls the method's own
    query pass besides (the floor then calls it once per step)."""
    v = steps.VARIANTS[name]
    s = steps.setup(name, quick=True, batch_size=4, out=str(tmp_path / name))
    deep = _blocks_with_grad(s, v.vlm)
    if "floor" in v.pays:
        assert deep and deep[0] == 0, f"{name}: the step's backward starts at block {deep[:1]}, its floor at block 0"
    else:
        assert "floor_head" in v.pays and deep == [], f"{name}: the step's backward reaches blocks {deep}"
    query_name = "clip_query" if hasattr(s.method, "clip_query") else "query"
    calls = []
    if callable(getattr(s.method, query_name, None)) and not isinstance(getattr(s.method, query_name), nn.Module):
        original = getattr(s.method, query_name)
        monkeypatch.setattr(s.method, query_name, lambda *a, **k: calls.append(1) or original(*a, **k))
    steps.step_fn(s, "clfast")()
    # floor_head's frozen forward is such a method's query (linear: its feature), so it pays it there
    pays_query = "query" in v.pays or "floor_head" in v.pays
    assert bool(calls) == pays_query, f"{name}: the step calls {query_name} {len(calls)} times"
    calls.clear()
    floor = steps.must_pay_fn(s, name, quick=True, batch_size=4)
    loss = floor()
    assert math.isfinite(loss) and len(calls) == ("query" in v.pays), (name, loss, calls)


def test_variants_without_a_backbone_pay_nothing_and_bad_parts_are_refused(tmp_path):
    name = next(n for n, v in steps.VARIANTS.items() if not v.pays)
    assert not steps.VARIANTS[name].floors
    s = steps.setup(name, quick=True, batch_size=4, out=str(tmp_path / name))
    assert steps.must_pay_fn(s, name, quick=True, batch_size=4) is None
    with pytest.raises(ValueError, match="pays must be parts of"):
        steps.Variant("l2p", pays=("query", "flor"))
    with pytest.raises(ValueError, match="unknown variant"):
        steps.must_pay_fn(s, "nope", quick=True, batch_size=4)


def test_floor_parts_run_in_order_on_a_fresh_backbone(tmp_path, monkeypatch):
    """The floor of a query-paying variant is its query pass then the ViT floor (a fresh backbone: the method's
    weights untouched, its gradients untouched)."""
    s = steps.setup("l2p", quick=True, batch_size=4, out=str(tmp_path / "l2p"))
    order = []
    real_floor = steps.floor_fn
    monkeypatch.setattr(steps, "floor_fn", lambda kind, **kw: (lambda f=real_floor(kind, **kw):
                                                              order.append(kind) or f()))
    original = s.method.query
    monkeypatch.setattr(s.method, "query", lambda *a, **k: order.append("query") or original(*a, **k))
    before = {k: p.detach().clone() for k, p in s.method.named_parameters()}
    floor = steps.must_pay_fn(s, "l2p", quick=True, batch_size=4)
    floor()
    floor()
    assert order == ["query", "floor", "query", "floor"]
    assert all(torch.equal(before[k], p) and p.grad is None for k, p in s.method.named_parameters()), \
        "the floor trained the method"


def test_peer_amp_is_the_peer_under_the_engines_autocast_and_only_where_it_is_on(tmp_path):
    """``peer_amp`` runs the official step's own code with the engine's autocast around it (a block's MLP computes
    in bf16 there, in fp32 in ``peer``); a run times it only where that autocast is on, and a fp32 setup refuses
    it by name."""
    assert steps.configs(None) == steps.CONFIGS
    assert steps.configs(torch.bfloat16) == (*steps.CONFIGS, "peer_amp")
    s = steps.setup("dualprompt", quick=True, batch_size=4, out=str(tmp_path / "bf16"), overrides=("amp=bf16",))
    assert s.trainer.amp_dtype == torch.bfloat16
    dtypes: dict[str, set] = {}
    for config in ("peer", "peer_amp"):
        seen = dtypes.setdefault(config, set())
        hooks = [b.mlp.register_forward_hook(lambda m, args, out, seen=seen: seen.add(out.dtype))
                 for b in s.method.backbone.vit.blocks]
        try:
            loss = steps.step_fn(s, config)()
        finally:
            for h in hooks:
                h.remove()
        assert math.isfinite(loss), (config, loss)
    assert dtypes == {"peer": {torch.float32}, "peer_amp": {torch.bfloat16}}
    s32 = steps.setup("linear", quick=True, batch_size=4, out=str(tmp_path / "fp32"), overrides=("amp=none",))
    with pytest.raises(ValueError, match="peer_amp"):
        steps.step_fn(s32, "peer_amp")


def test_bench_train_takes_the_runs_precision_from_clfast_bench_amp(monkeypatch):
    """``clfast bench train --amp`` reaches bench_train.py as CLFAST_BENCH_AMP: none is fp32 without peer_amp, bf16
    times peer_amp too, anything else is refused by name."""
    import importlib

    from benchmarks import bench_train

    try:
        monkeypatch.setenv("CLFAST_BENCH_AMP", "none")
        m = importlib.reload(bench_train)
        assert m._amp_dtype() is None and m.CONFIGS == list(steps.CONFIGS)
        monkeypatch.setenv("CLFAST_BENCH_AMP", "bf16")
        m = importlib.reload(bench_train)
        assert m._amp_dtype() == torch.bfloat16 and m.CONFIGS == [*steps.CONFIGS, "peer_amp"]
        monkeypatch.setenv("CLFAST_BENCH_AMP", "fp8")
        with pytest.raises(ValueError, match="CLFAST_BENCH_AMP must be auto, bf16 or none"):
            importlib.reload(bench_train)
    finally:
        monkeypatch.delenv("CLFAST_BENCH_AMP")
        importlib.reload(bench_train)

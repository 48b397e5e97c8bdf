"""The per-task heads shared by ConvPrompt, ATLAS and CluMo (clfast.methods.heads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clfast.methods import freeze_rows
from clfast.methods.heads import TaskHeads


def test_task_heads_read_their_own_norm_and_rows():
    torch.manual_seed(0)
    h = TaskHeads(6, 5, 3)
    with torch.no_grad():
        h.norm_weight.normal_()
        h.norm_bias.normal_()
    x = torch.randn(4, 6)
    out = h(x, ((0, 2), (2, 5)))
    assert out.shape == (4, 5)
    want = F.linear(F.layer_norm(x, (6,), h.norm_weight[1], h.norm_bias[1], 1e-5), h.weight[2:5], h.bias[2:5])
    torch.testing.assert_close(out[:, 2:5], want)
    plain = TaskHeads(6, 5, 3, norm=False)
    torch.testing.assert_close(plain(x, ((0, 5),)), F.linear(x, plain.weight, plain.bias))
    mlp = TaskHeads(6, 5, 3, hidden=8)        # ATLAS's Linear → LN → GELU → Linear
    y = F.gelu(F.layer_norm(F.linear(x, mlp.hidden_weight[0], mlp.hidden_bias[0]), (8,), mlp.norm_weight[0],
                            mlp.norm_bias[0], 1e-5))
    torch.testing.assert_close(mlp(x, ((0, 5),)), F.linear(y, mlp.weight, mlp.bias))
    assert sum(p.numel() for p in TaskHeads(768, 200, 10).parameters()) == 169_160
    with pytest.raises(ValueError, match="task_ranges"):
        h(x, ((1, 2),))
    with pytest.raises(ValueError, match=r"x must have shape \(B,6\)"):
        h(torch.zeros(4, 7), ((0, 5),))


def test_finished_heads_are_frozen():
    torch.manual_seed(0)
    h = TaskHeads(6, 5, 2, hidden=4)
    task, first = [1], [2]
    records = []
    h.freeze_finished(lambda p, stop: records.append(freeze_rows(p, stop)), lambda: task[0], lambda: first[0])
    out = h(torch.randn(3, 6), ((0, 2), (2, 5)))
    out.sum().backward()
    assert h.weight.grad[:2].abs().max() == 0 and h.weight.grad[2:].abs().max() > 0
    assert h.hidden_weight.grad[0].abs().max() == 0 and h.hidden_weight.grad[1].abs().max() > 0
    assert h.norm_weight.grad[0].abs().max() == 0 and h.bias.grad[:2].abs().max() == 0
    assert len(records) == 6

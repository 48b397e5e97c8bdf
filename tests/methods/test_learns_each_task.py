"""Every method learns every digits task it is trained on, with its digits preset.

"Learns" is measured where forgetting and cross-task confusion cannot hide it: the accuracy on task t
right after training task t, among task t's own classes (the task-incremental diagonal). Chance is 50 %
(2 classes per task). The fast preset's 10 optimizer steps per task left `linear` at 49 % and 54 % on
tasks 1 and 2 (seed 0); the digits preset gives 86–100 % for every method (docs/results.md). The
class-incremental numbers are lower, for the reason docs/results.md measures (old tasks' logits win on
new images), and are compared there, not here.
"""

from __future__ import annotations

import pytest
import torch

from clfast.engine import Trainer, load_config
from clfast.engine.metrics import read_acc_csv

LEARNED = 80.0    # % within the task's 2 classes, right after training it (chance: 50 %)
# the short version trains 4 of the preset's 10 epochs: in fp32 (amp=auto on a CPU without native bf16) its
# DualPrompt reached 78.9 % on task 1 (seed 0; 95.8-100 on the others), so its bar is lower, still 25 points
# above chance
LEARNED_SHORT = 75.0


def diagonal(tmp_path, method, extra=()):
    cfg = load_config(method, "digits", overrides=["quiet=true", "threads=1", "scenario=task-incremental", *extra])
    assert cfg.preset == "digits"
    Trainer(cfg, out=str(tmp_path / method)).fit()
    return torch.tensor(read_acc_csv(tmp_path / method / "acc_matrix.csv")).diagonal()


def test_linear_learns_each_digits_task(tmp_path):
    diag = diagonal(tmp_path, "linear")
    assert (diag >= LEARNED).all(), diag


def test_a_prompt_method_learns_each_digits_task(tmp_path):
    """The short version of the slow test below: DualPrompt with 4 of the preset's 10 epochs."""
    diag = diagonal(tmp_path, "dualprompt", ["epochs=4"])
    assert (diag >= LEARNED_SHORT).all(), diag


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l2p", "dualprompt", "coda_prompt", "convprompt"])
def test_every_prompt_method_learns_each_digits_task(tmp_path, method):
    diag = diagonal(tmp_path, method)
    assert (diag >= LEARNED).all(), diag

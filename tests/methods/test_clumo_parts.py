"""CluMo's pure tensor parts (spec methods/clumo.md §8 items 1, 2, 3, 5, 7, 8): stage-1 keys (faiss K-means and
the released code's farthest-assignment Lloyd steps), per-sample selection, task inference, the pools, the
soft-target cross-entropy and the head distillation. Each is checked against an independent computation
(explicit loops, float64, hand-computed toys)."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clfast.methods.cluster_prompts import (ClusterPromptPool, farthest_lloyd, farthest_lloyd_step, fit_keys,
                                            pooling_modes, select_prompts, subsample_rows, task_key_scores)
from clfast.methods.vqa_losses import PreviousHead, head_distillation, soft_target_ce


def blobs(n_per: int, centers: torch.Tensor, scale: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([c + scale * torch.randn(n_per, centers.shape[1], generator=g) for c in centers])


# ---------------------------------------------------------------------------------------------------------
# §8 item 2: K-means
# ---------------------------------------------------------------------------------------------------------

def test_kmeans_keys_nearest_key_is_the_faiss_assignment():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 16, generator=g)      # no cluster structure: assignments are not trivially separable
    keys = fit_keys(x, 3, seed=7, n_iter=50, n_threads=1)
    assert keys.shape == (3, 16) and keys.dtype == x.dtype
    km = faiss.Kmeans(16, 3, niter=50, seed=7, max_points_per_centroid=200, min_points_per_centroid=1)
    km.train(x.numpy())
    _, faiss_assign = km.index.search(x.numpy(), 1)
    torch.testing.assert_close(keys, torch.from_numpy(km.centroids), rtol=0, atol=0)
    d = torch.cdist(x.double(), keys.double())                      # float64, independent of retrieve
    assert torch.equal(d.argmin(1), torch.from_numpy(faiss_assign[:, 0]).long())
    # every row is clustered (FAISS would subsample to 3·256 rows by default; here N = 600 < 768 anyway, so
    # check a larger set too: each key is the mean of the rows nearest to it after the last iteration)
    big = torch.randn(2000, 4, generator=g)
    k2 = fit_keys(big, 3, seed=1, n_iter=50, n_threads=1)
    a = torch.cdist(big.double(), k2.double()).argmin(1)
    means = torch.stack([big[a == c].double().mean(0) for c in range(3)])
    torch.testing.assert_close(means, k2.double(), rtol=0, atol=5e-3)


def test_kmeans_keys_find_separated_clusters_and_are_seeded():
    centers = torch.tensor([[8.0, 0, 0], [0, 8.0, 0], [0, 0, 8.0]])
    x = blobs(50, centers, 0.1, seed=3)
    keys = fit_keys(x, 3, seed=0, n_threads=1)
    order = torch.cdist(centers, keys).argmin(1)
    assert sorted(order.tolist()) == [0, 1, 2]
    torch.testing.assert_close(keys[order], centers, atol=0.1, rtol=0)
    assert torch.equal(keys, fit_keys(x, 3, seed=0, n_threads=1))


def test_farthest_step_hand_computed_2d_toy():
    keys = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    samples = torch.tensor([[1.0, 0.0], [9.0, 1.0], [0.0, 2.0], [5.0, 5.0]])
    # squared distances to (k0, k1, k2):  (1,0): 1, 81, 101 -> k2;  (9,1): 82, 2, 162 -> k2;
    # (0,2): 4, 104, 64 -> k1;  (5,5): 50, 50, 50 -> k0 (ties: the lower key)
    new = farthest_lloyd_step(samples, keys)
    torch.testing.assert_close(new, torch.tensor([[5.0, 5.0], [0.0, 2.0], [5.0, 0.5]]), rtol=0, atol=0)
    # keys that receive no sample stay where they are
    new = farthest_lloyd_step(samples[:2], keys)
    torch.testing.assert_close(new, torch.tensor([[0.0, 0.0], [10.0, 0.0], [5.0, 0.5]]), rtol=0, atol=0)


def test_farthest_lloyd_draws_batches_from_the_generator():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100, 5, generator=g)
    init = torch.rand(3, 5, generator=g) * 2 - 1
    out = farthest_lloyd(x, init, n_iter=4, batch_size=32, generator=torch.Generator().manual_seed(9))
    ref_g, ref = torch.Generator().manual_seed(9), init.clone()
    for _ in range(4):                    # the loop written out: 32 distinct rows per step, farthest key, mean
        rows = x[torch.randperm(100, generator=ref_g)[:32]].double()
        d = ((rows[:, None] - ref[None].double()) ** 2).sum(-1)
        a = d.argmax(1)
        ref = torch.stack([rows[a == c].mean(0).float() if (a == c).any() else ref[c] for c in range(3)])
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    # fit_keys(farthest=True): U(-1, 1) init then the same steps, all from one seeded generator
    keys = fit_keys(x, 3, seed=5, farthest=True, n_iter=4)
    g5 = torch.Generator().manual_seed(5)
    init5 = torch.rand(3, 5, generator=g5) * 2 - 1
    torch.testing.assert_close(keys, farthest_lloyd(x, init5, n_iter=4, generator=g5), rtol=0, atol=0)


def test_subsample_rows_caps_and_keeps_order():
    x = torch.arange(50.0)[:, None].repeat(1, 2)
    assert subsample_rows(x, 80, torch.Generator()) is x
    sub = subsample_rows(x, 10, torch.Generator().manual_seed(1))
    assert sub.shape == (10, 2) and len(set(sub[:, 0].tolist())) == 10
    assert torch.equal(sub[:, 0], sub[:, 0].sort().values)
    assert torch.equal(sub, subsample_rows(x, 10, torch.Generator().manual_seed(1)))


def test_key_fitting_errors_name_the_argument():
    with pytest.raises(ValueError, match="n_keys"):
        fit_keys(torch.randn(2, 4), 3, seed=0)
    with pytest.raises(ValueError, match="features must have shape"):
        fit_keys(torch.randn(4), 3, seed=0)
    with pytest.raises(ValueError, match=r"keys must have shape \(N,4\)"):
        farthest_lloyd_step(torch.randn(5, 4), torch.randn(3, 2))
    with pytest.raises(ValueError, match="batch_size"):
        farthest_lloyd(torch.randn(5, 4), torch.randn(3, 4), batch_size=0, generator=torch.Generator())


# ---------------------------------------------------------------------------------------------------------
# §8 item 3 (the part without a backbone): one pooling setting gives the stage-1 and selection modes
# ---------------------------------------------------------------------------------------------------------

def test_pooling_modes():
    assert pooling_modes("mean") == ("mean", "mean")
    assert pooling_modes("max") == ("max", "max")
    assert pooling_modes("official") == ("mean", "max")
    with pytest.raises(ValueError, match="key_pooling"):
        pooling_modes("cls")


# ---------------------------------------------------------------------------------------------------------
# §8 items 1 and 5: selection, task inference, shapes
# ---------------------------------------------------------------------------------------------------------

def reference_select(h_v, h_t, keys_v, keys_t, task=None):
    """Loops in float64 over samples, tasks and keys."""
    out = []
    for b in range(h_v.shape[0]):
        best = []
        for tau in range(keys_v.shape[0]):
            cv = [F.cosine_similarity(h_v[b].double(), k.double(), dim=0, eps=1e-12).item() for k in keys_v[tau]]
            ct = [F.cosine_similarity(h_t[b].double(), k.double(), dim=0, eps=1e-12).item() for k in keys_t[tau]]
            best.append((max(cv) + max(ct), int(np.argmax(cv)), int(np.argmax(ct))))
        tau = int(np.argmax([s for s, _, _ in best])) if task is None else int(task[b])
        _, i, j = best[tau]
        out.append((tau, i, j, keys_v.shape[1] * j + i))
    return torch.tensor(out)


def random_pools(T=4, Dv=12, Dw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, 3, Dv, generator=g), torch.randn(T, 3, Dw, generator=g)


def test_selection_equals_the_reference_loops():
    kv, kt = random_pools()
    g = torch.Generator().manual_seed(1)
    hv, ht = torch.randn(9, 12, generator=g), torch.randn(9, 8, generator=g)
    sel = select_prompts(hv, ht, kv, kt)
    ref = reference_select(hv, ht, kv, kt)
    got = torch.stack([sel.task, sel.image_key, sel.text_key, sel.index], 1)
    assert torch.equal(got, ref)
    assert sel.index.min() >= 0 and sel.index.max() < 9 and sel.task_scores.shape == (9, 4)
    tau = torch.tensor([3, 0, 1, 2, 2, 1, 0, 3, 3])
    sel = select_prompts(hv, ht, kv, kt, task=tau)
    got = torch.stack([sel.task, sel.image_key, sel.text_key, sel.index], 1)
    assert torch.equal(got, reference_select(hv, ht, kv, kt, task=tau))


def test_task_key_scores_segmented_max():
    kv, _ = random_pools(T=3, Dv=6)
    h = torch.randn(5, 6)
    best, arg = task_key_scores(h, kv)
    cos = F.normalize(h.double(), dim=-1) @ F.normalize(kv.double(), dim=-1).reshape(9, 6).T   # (5, 9)
    torch.testing.assert_close(best.double(), cos.view(5, 3, 3).max(-1).values, rtol=0, atol=1e-6)
    assert torch.equal(arg, cos.view(5, 3, 3).argmax(-1))


def test_task_inference_on_separated_pools():
    T, Dv, Dw = 5, 32, 16
    g = torch.Generator().manual_seed(2)
    kv = torch.randn(T, 3, Dv, generator=g)
    kt = torch.randn(T, 3, Dw, generator=g)
    task = torch.randint(0, T, (40,), generator=g)
    i, j = torch.randint(0, 3, (40,), generator=g), torch.randint(0, 3, (40,), generator=g)
    hv = kv[task, i] + 0.05 * torch.randn(40, Dv, generator=g)
    ht = kt[task, j] + 0.05 * torch.randn(40, Dw, generator=g)
    sel = select_prompts(hv, ht, kv, kt)
    assert torch.equal(sel.task, task)
    assert torch.equal(sel.index, 3 * j + i)
    # task_aware_test: the given task is used even where the keys point elsewhere
    other = (task + 1) % T
    sel = select_prompts(hv, ht, kv, kt, task=other)
    assert torch.equal(sel.task, other)


def test_selection_is_batch_invariant():
    kv, kt = random_pools(T=3)
    g = torch.Generator().manual_seed(4)
    hv, ht = torch.randn(17, 12, generator=g), torch.randn(17, 8, generator=g)
    full = select_prompts(hv, ht, kv, kt)
    for b in range(17):
        one = select_prompts(hv[b:b + 1], ht[b:b + 1], kv, kt)
        assert one.task.item() == full.task[b].item() and one.index.item() == full.index[b].item()
        assert one.task_scores[0].tolist() == full.task_scores[b].tolist()
    perm = torch.randperm(17, generator=g)
    shuffled = select_prompts(hv[perm], ht[perm], kv, kt)
    assert torch.equal(shuffled.task, full.task[perm]) and torch.equal(shuffled.index, full.index[perm])


def test_selection_errors():
    kv, kt = random_pools(T=2)
    with pytest.raises(ValueError, match="task ids"):
        select_prompts(torch.randn(2, 12), torch.randn(2, 8), kv, kt, task=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="same tasks"):
        select_prompts(torch.randn(2, 12), torch.randn(2, 8), kv, kt[:1])
    with pytest.raises(ValueError, match="batch size"):
        select_prompts(torch.randn(2, 12), torch.randn(3, 8), kv, kt)


def test_pool_shapes_init_and_prompt_gather():
    torch.manual_seed(0)
    pool = ClusterPromptPool(6, 768, 512, 768)
    assert pool.keys_v.shape == (6, 3, 768) and pool.keys_t.shape == (6, 3, 512)
    assert pool.prompts.shape == (6, 9, 10, 768) and pool.general.shape == (6, 10, 768)
    assert pool.prompts.abs().max() <= 1 and pool.keys_v.abs().max() <= 1
    assert abs(pool.general.std().item() - 1) < 0.05          # N(0, 1)
    assert not pool.fitted.any()
    assert {n for n, _ in pool.named_parameters()} == {"prompts", "general"}
    task, idx = torch.tensor([0, 5, 2]), torch.tensor([8, 0, 4])
    pi = pool.prompt(task, idx)
    assert pi.shape == (3, 20, 768)
    ref = torch.stack([torch.cat([pool.general[t], pool.prompts[t, i]]) for t, i in zip(task.tolist(), idx.tolist())])
    assert torch.equal(pi, ref)
    pi.sum().backward()     # only the gathered rows receive gradient
    gp = pool.prompts.grad.abs().sum((-1, -2))
    assert set(map(tuple, gp.nonzero().tolist())) == {(0, 8), (5, 0), (2, 4)}
    assert set(pool.general.grad.abs().sum((-1, -2)).nonzero()[:, 0].tolist()) == {0, 2, 5}


def test_pool_set_keys_and_select():
    pool = ClusterPromptPool(3, 4, 5, 6, length=2, general_length=1)
    kv, kt = torch.randn(3, 4), torch.randn(3, 5)
    pool.set_keys(1, kv, kt)
    assert torch.equal(pool.keys_v[1], kv) and torch.equal(pool.keys_t[1], kt)
    assert pool.fitted.tolist() == [False, True, False]
    with pytest.raises(ValueError, match=r"keys_t must have shape \(3, 5\)"):
        pool.set_keys(0, kv, torch.randn(3, 4))
    h_v, h_t = kv[[2, 0]], kt[[1, 1]]
    sel = pool.select(h_v, h_t, seen=2, task=torch.tensor([1, 1]))
    assert sel.index.tolist() == [3 * 1 + 2, 3 * 1 + 0]
    assert pool.prompt(sel.task, sel.index).shape == (2, 3, 6)
    with pytest.raises(ValueError, match="seen"):
        pool.select(h_v, h_t, seen=4)


# ---------------------------------------------------------------------------------------------------------
# §8 items 7 and 8: the losses
# ---------------------------------------------------------------------------------------------------------

def test_soft_target_ce_equals_the_definition():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 7, generator=g)
    w = torch.zeros(4, 7)
    w[0, 2] = 0.1 * 2 + 0.1        # an answer listed twice plus another: 0.1 each, accumulated
    w[0, 5] = 0.1
    w[1, 1] = 1.0
    w[2, [0, 3]] = torch.tensor([0.6, 0.4])
    # row 3: every listed answer out of the vocabulary -> no target, contributes 0
    ref = 0.0
    for b in range(4):
        logp = z[b].double() - torch.logsumexp(z[b].double(), 0)
        ref -= sum(w[b, a].double() * logp[a] for a in range(7))
    ref /= 4
    torch.testing.assert_close(soft_target_ce(z, w).double(), ref, rtol=1e-6, atol=1e-7)
    # bf16 logits are computed in float32
    assert soft_target_ce(z.bfloat16(), w).dtype == torch.float32
    with pytest.raises(ValueError, match="targets"):
        soft_target_ce(z, w[:, :6])


def test_head_distillation_zero_for_identical_heads_and_no_grad_to_the_copy():
    torch.manual_seed(0)
    head = nn.Sequential(nn.Linear(6, 12), nn.LayerNorm(12), nn.GELU(), nn.Linear(12, 5))
    prev = PreviousHead(head)
    h = torch.randn(3, 6, requires_grad=True)
    with pytest.raises(RuntimeError, match="take"):
        prev(h)
    with torch.no_grad():      # the head trains after the copy was built: take() copies its current state
        head[0].weight.mul_(2)
    prev.take(head)
    z = head(h)
    assert head_distillation(z, prev(h)).item() == 0.0
    with torch.no_grad():
        head[-1].weight.add_(0.3)
    z = head(h)
    zp = prev(h)
    ref = ((z.double() - zp.double()) ** 2).sum() / z.numel()
    loss = head_distillation(z, zp)
    torch.testing.assert_close(loss.double(), ref, rtol=1e-6, atol=0)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in prev.parameters())
    assert head[-1].weight.grad is not None and h.grad is not None
    # the copy is independent of later changes to the head, and saved with its owner
    w_before = prev.head[-1].weight.clone()
    with torch.no_grad():
        head[-1].weight.add_(1.0)
    assert torch.equal(prev.head[-1].weight, w_before)
    state = prev.state_dict()
    assert "taken" in state and bool(state["taken"])
    fresh = PreviousHead(head)
    fresh.load_state_dict(state)
    assert torch.equal(fresh(h), prev(h))


# ---------------------------------------------------------------------------------------------------------
# Stage 1 over ranks: the same keys as one process
# ---------------------------------------------------------------------------------------------------------

def _stage1_data():
    g = torch.Generator().manual_seed(5)
    hv = blobs(14, torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0], [0, 0, 4.0, 0]]), 0.5, seed=6)   # (42, 4)
    ht = torch.randn(42, 3, generator=g)
    return hv, ht, torch.arange(42)


def _ctx(rank=0, world=1, task=2):
    from clfast.methods import TaskContext

    return TaskContext(task=task, num_tasks=4, class_range=(0, 1), seen_classes=1, num_classes=1,
                       task_ranges=((0, 1),) * 4, seed=11, rank=rank, world_size=world)


def _stage1_worker(rank: int, world: int, init: str, out: str):
    import torch.distributed as dist

    from clfast.methods.cluster_prompts import stage1_keys

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        hv, ht, idx = _stage1_data()
        order = torch.randperm(42, generator=torch.Generator().manual_seed(1))     # shards out of index order
        mine = order[:17] if rank == 0 else order[17:]                             # unequal shards
        res = {f: stage1_keys(hv[mine], ht[mine], idx[mine], _ctx(rank, world), max_samples=30, n_iter=10,
                              farthest=f) for f in (False, True)}
        torch.save(res, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow     # two spawned processes: about 20 s on 2 cores
def test_stage1_keys_over_two_ranks_equal_one_process(tmp_path):
    import torch.multiprocessing as mp

    from clfast.methods.cluster_prompts import stage1_keys

    out = str(tmp_path / "keys")
    mp.spawn(_stage1_worker, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2, join=True)
    hv, ht, idx = _stage1_data()
    for farthest in (False, True):
        want = stage1_keys(hv, ht, idx, _ctx(), max_samples=30, n_iter=10, farthest=farthest)
        for rank in (0, 1):
            got = torch.load(f"{out}.{rank}", weights_only=True)[farthest]
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (farthest, rank)


def test_stage1_keys_use_the_documented_rows_and_seeds_in_any_row_order():
    from clfast.methods.cluster_prompts import stage1_keys
    from clfast.utils.seeding import derive_seed

    hv, ht, idx = _stage1_data()

    x = subsample_rows(torch.cat([hv, ht], 1), 30, torch.Generator().manual_seed(derive_seed(11, "clumo-stage1", 2)))
    kv, kt = stage1_keys(hv, ht, idx, _ctx(), max_samples=30, n_iter=10)
    assert torch.equal(kv, fit_keys(x[:, :4], 3, seed=derive_seed(11, "clumo-keys-v", 2), n_iter=10))
    assert torch.equal(kt, fit_keys(x[:, 4:], 3, seed=derive_seed(11, "clumo-keys-t", 2), n_iter=10))
    # rows in another order (another sharding) give the same keys
    perm = torch.randperm(42, generator=torch.Generator().manual_seed(3))
    kv2, kt2 = stage1_keys(hv[perm], ht[perm], idx[perm], _ctx(), max_samples=30, n_iter=10)
    assert torch.equal(kv2, kv) and torch.equal(kt2, kt)

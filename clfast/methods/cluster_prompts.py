"""CluMo's key–key–prompt pools: stage-1 keys, per-sample selection and task inference (spec
``methods/clumo.md`` §2 "Key–key–prompt pool", §4 "Stage 1", §7 quirk table).

Per task τ: visual keys K^v_τ (n_v, D_v), textual keys K^t_τ (n_t, D_w), n_v·n_t cluster prompts P_τ (L, D_f)
each and a general prompt G_τ (L_g, D_f); all tasks' tensors are stored densely, (T, ...)::

    keys = fit_keys(features, 3, seed=s)                               # stage 1: faiss K-means (nearest)
    keys = fit_keys(features, 3, seed=s, farthest=True)                # the released code's Lloyd steps
    sel = select_prompts(h_v, h_t, pool.keys_v[:seen], pool.keys_t[:seen])            # infer τ per sample
    sel = select_prompts(h_v, h_t, pool.keys_v[:seen], pool.keys_t[:seen], task=tau)  # τ given
    prefix = pool.prompt(sel.task, sel.index)                          # (B, L_g + L, D_f) = [G_τ ; P_τ[idx]]

Selection: i = argmax_k cos(h^v, K^v_{τ,k}), j' = argmax_k cos(h^t, K^t_{τ,k}), idx = n_v·j' + i (the code's
``text_idx * text_key_size + image_idx``, with n_v = n_t = 3). Task inference: score_τ = max_k cos(h^v, K^v_{τ,k})
+ max_k cos(h^t, K^t_{τ,k}) over the given tasks, τ̂ = argmax_τ (ties to the lower τ, the lower key). One
:func:`clfast.ops.retrieve` call per modality ranks all T·n keys; its scores, put back in key order, are
reduced per task (a segmented max). Every step is per row, so the selection is batch-invariant.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor, nn

from clfast.ops import kmeans, retrieve

from ..utils.seeding import derive_seed

__all__ = ["KEY_POOLINGS", "pooling_modes", "subsample_rows", "fit_keys", "farthest_lloyd_step", "farthest_lloyd",
           "stage1_keys", "task_key_scores", "Selection", "select_prompts", "ClusterPromptPool"]

#: ``mean``/``max``: one pooling for stage 1, training and test; ``official``: the code's mean in stage 1, max at
#: selection (spec §7 "Pooling mismatch")
KEY_POOLINGS = ("mean", "max", "official")


def pooling_modes(key_pooling: str) -> tuple[str, str]:
    """``(stage-1 mode, selection mode)`` of :func:`pool_tokens` for a ``key_pooling`` setting."""
    if key_pooling not in KEY_POOLINGS:
        raise ValueError(f"key_pooling must be one of {KEY_POOLINGS}, got {key_pooling!r}")
    return ("mean", "max") if key_pooling == "official" else (key_pooling, key_pooling)


def _check_matrix(fn: str, name: str, x, dim: Optional[int] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 2 or (dim is not None and x.shape[1] != dim):
        want = f"(N,{dim})" if dim is not None else "(N,D)"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {tuple(x.shape)}")


def _check_count(fn: str, name: str, v, lo: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{fn}: {name} must be an int >= {lo}, got {v!r}")


def subsample_rows(x: Tensor, max_rows: int, generator: torch.Generator) -> Tensor:
    """At most ``max_rows`` rows of ``x`` (N, D), drawn without replacement by ``generator`` and kept in their
    original order (all of them, unchanged, when N <= max_rows): stage 1's ``kmeans_samples`` cap."""
    _check_matrix("subsample_rows", "x", x)
    _check_count("subsample_rows", "max_rows", max_rows)
    if x.shape[0] <= max_rows:
        return x
    pick = torch.randperm(x.shape[0], generator=generator)[:max_rows].sort().values
    return x[pick.to(x.device)]


def farthest_lloyd_step(samples: Tensor, keys: Tensor) -> Tensor:
    """One mini-batch Lloyd step of the released code (``update_cluster``): each sample (n, D) goes to the key
    (K, D) at the *largest* Euclidean distance (ties: the lower key), and each key that received samples is
    replaced by their mean; the others stay. Returns the new keys (K, D) in float32 (float64 if given)."""
    _check_matrix("farthest_lloyd_step", "samples", samples)
    _check_matrix("farthest_lloyd_step", "keys", keys, samples.shape[1])
    dt = torch.float64 if torch.float64 in (samples.dtype, keys.dtype) else torch.float32
    x, k = samples.to(dt), keys.to(dt)
    d2 = (x[:, None, :] - k[None]).pow(2).sum(-1)                    # (n, K); argmax of d² = argmax of d
    assign = d2.argmax(1)                                            # first maximum: the lower key on ties
    counts = torch.bincount(assign, minlength=k.shape[0]).to(dt)
    sums = torch.zeros_like(k).index_add_(0, assign, x)
    return torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], k)


def farthest_lloyd(features: Tensor, init: Tensor, *, n_iter: int = 50, batch_size: int = 32,
                   generator: torch.Generator) -> Tensor:
    """The released code's stage 1 (spec §4, §7 "K-means assignment"): ``n_iter`` :func:`farthest_lloyd_step`
    calls, each on ``batch_size`` rows of ``features`` (N, D) drawn without replacement by ``generator``,
    starting from ``init`` (K, D). Returns (K, D) in ``features``' dtype."""
    _check_matrix("farthest_lloyd", "features", features)
    _check_matrix("farthest_lloyd", "init", init, features.shape[1])
    _check_count("farthest_lloyd", "n_iter", n_iter)
    _check_count("farthest_lloyd", "batch_size", batch_size)
    keys = init.float()
    n = features.shape[0]
    for _ in range(n_iter):
        pick = torch.randperm(n, generator=generator)[:batch_size].to(features.device)
        keys = farthest_lloyd_step(features[pick].float(), keys)
    return keys.to(features.dtype)


def fit_keys(features: Tensor, n_keys: int = 3, *, seed: int, n_iter: int = 50, farthest: bool = False,
             batch_size: int = 32, n_threads: Optional[int] = None) -> Tensor:
    """Stage-1 keys (n_keys, D) of one modality from pooled features (N, D).

    Default: :func:`clfast.ops.kmeans` (``faiss.Kmeans``, ``n_iter`` Lloyd iterations, seeded) on every row (no
    FAISS subsampling: the caller caps N with :func:`subsample_rows`); each feature's nearest key is its K-means
    assignment (FAISS's seed is ``seed mod 2³¹``). ``farthest=True``: the released code's :func:`farthest_lloyd`
    from keys U(−1, 1), ``n_iter`` steps of ``batch_size`` samples, both drawn from a generator seeded with ``seed``.
    """
    _check_matrix("fit_keys", "features", features)
    _check_count("fit_keys", "n_keys", n_keys)
    if features.shape[0] < n_keys:
        raise ValueError(f"fit_keys: need at least n_keys = {n_keys} feature rows, got {features.shape[0]}")
    if farthest:
        g = torch.Generator().manual_seed(int(seed))
        init = torch.rand(n_keys, features.shape[1], generator=g) * 2 - 1
        return farthest_lloyd(features, init.to(features.device), n_iter=n_iter, batch_size=batch_size, generator=g)
    keys, _ = kmeans(features.float(), n_keys, n_iter=n_iter, seed=int(seed) % 2**31,   # FAISS takes an int32
                     max_points_per_centroid=math.ceil(features.shape[0] / n_keys), min_points_per_centroid=1,
                     n_threads=n_threads)
    return keys.to(features.dtype)


def stage1_keys(h_v: Tensor, h_t: Tensor, index: Tensor, ctx, *, n_image_keys: int = 3, n_text_keys: int = 3,
                max_samples: int = 10000, n_iter: int = 50, farthest: bool = False,
                batch_size: int = 32) -> tuple[Tensor, Tensor]:
    """One task's stage-1 keys from this rank's pooled features (spec §4), the same on every rank.

    The rows (h_v (n, D_v), h_t (n, D_w) and their dataset positions ``index`` (n,) int64, -1 where unknown) are
    all-gathered (``ctx.all_gather``) and put in index order, so the keys do not depend on the number of ranks;
    at most ``max_samples`` rows are kept, drawn with a seed of the run and the task (the same rows for both
    modalities); rank 0 fits :func:`fit_keys` per modality (seeds of the run, task and modality) and the result
    reaches the other ranks through a sum all-reduce to which they add zeros (a broadcast, exact).

    Returns:
        ``(keys_v (n_image_keys, D_v), keys_t (n_text_keys, D_w))`` float32.
    """
    if h_v.shape[0] != h_t.shape[0] or index.shape != (h_v.shape[0],):
        raise ValueError(f"stage1_keys: h_v, h_t and index must have the same number of rows, got "
                         f"{tuple(h_v.shape)}, {tuple(h_t.shape)} and {tuple(index.shape)}")
    D_v = h_v.shape[1]
    x, idx = torch.cat([h_v.float(), h_t.float()], 1), index.to(h_v.device).long()
    if ctx.world_size > 1:
        x, idx = ctx.all_gather(x), ctx.all_gather(idx)
    if bool((idx >= 0).all()):
        x = x[idx.argsort(stable=True)]
    x = subsample_rows(x, max_samples, torch.Generator().manual_seed(derive_seed(ctx.seed, "clumo-stage1", ctx.task)))
    kv = x.new_zeros(n_image_keys, D_v)
    kt = x.new_zeros(n_text_keys, x.shape[1] - D_v)
    if ctx.rank == 0:
        common = dict(n_iter=n_iter, farthest=farthest, batch_size=batch_size)
        kv = fit_keys(x[:, :D_v], n_image_keys, seed=derive_seed(ctx.seed, "clumo-keys-v", ctx.task), **common)
        kt = fit_keys(x[:, D_v:], n_text_keys, seed=derive_seed(ctx.seed, "clumo-keys-t", ctx.task), **common)
    return ctx.all_reduce(kv.contiguous()), ctx.all_reduce(kt.contiguous())


def task_key_scores(h: Tensor, keys: Tensor) -> tuple[Tensor, Tensor]:
    """Per task, the best key of each sample: ``(max_k cos(h, keys[τ, k]), argmax_k)``, each (B, T).

    ``h`` (B, D); ``keys`` (T, K, D). One :func:`retrieve` call over the T·K keys (float32), its scores scattered
    back to key order and reduced per task; ties go to the lower key.
    """
    _check_matrix("task_key_scores", "h", h)
    if not isinstance(keys, Tensor) or keys.dim() != 3 or keys.shape[2] != h.shape[1]:
        got = tuple(keys.shape) if isinstance(keys, Tensor) else type(keys).__name__
        raise ValueError(f"task_key_scores: keys must have shape (T,K,{h.shape[1]}), got {got}")
    T, K, D = keys.shape
    q = h.detach().float()
    s, ix = retrieve(q, keys.detach().float().reshape(T * K, D), T * K, metric="cosine")
    dense = torch.empty_like(s).scatter_(1, ix, s.detach()).view(-1, T, K)
    best, arg = dense.max(-1)
    return best, arg


class Selection(NamedTuple):
    """A per-sample selection: ``task`` (B,) the pool used, ``image_key`` i and ``text_key`` j' (B,) inside it,
    ``index`` = n_v·j' + i (B,) the cluster prompt, ``task_scores`` (B, T) the inference scores."""

    task: Tensor
    image_key: Tensor
    text_key: Tensor
    index: Tensor
    task_scores: Tensor


def select_prompts(h_v: Tensor, h_t: Tensor, keys_v: Tensor, keys_t: Tensor,
                   task: Optional[Tensor] = None) -> Selection:
    """Choose each sample's pool and cluster prompt (spec §2 "Selection", "Test-time task identity").

    Args:
        h_v: (B, D_v) pooled image features; h_t: (B, D_w) pooled question embeddings.
        keys_v: (T, n_v, D_v); keys_t: (T, n_t, D_w): the keys of the T candidate tasks (the seen ones).
        task: (B,) int64 given task per sample (training; ``task_aware_test``); None infers
            τ̂ = argmax_τ [max_k cos(h_v, K^v_{τ,k}) + max_k cos(h_t, K^t_{τ,k})].

    Returns:
        :class:`Selection`; ``index`` in [0, n_v·n_t).
    """
    if keys_v.dim() != 3 or keys_t.dim() != 3 or keys_v.shape[0] != keys_t.shape[0]:
        raise ValueError(f"select_prompts: keys_v (T,n_v,D_v) and keys_t (T,n_t,D_w) must hold the same tasks, "
                         f"got {tuple(keys_v.shape)} and {tuple(keys_t.shape)}")
    if h_v.shape[0] != h_t.shape[0]:
        raise ValueError(f"select_prompts: h_v and h_t must have the same batch size, got {h_v.shape[0]} "
                         f"and {h_t.shape[0]}")
    sv, iv = task_key_scores(h_v, keys_v)
    st, it = task_key_scores(h_t, keys_t)
    scores = sv + st                                                 # (B, T)
    if task is None:
        task = scores.argmax(1)
    else:
        if not isinstance(task, Tensor) or task.shape != (h_v.shape[0],) or task.is_floating_point():
            raise ValueError(f"select_prompts: task must be an int64 tensor of shape ({h_v.shape[0]},), got {task!r}")
        task = task.to(scores.device).long()
        if bool(((task < 0) | (task >= keys_v.shape[0])).any()):
            raise ValueError(f"select_prompts: task ids must lie in [0, {keys_v.shape[0]}) (the tasks with keys), "
                             f"got {task.tolist()}")
    i = iv.gather(1, task[:, None])[:, 0]
    j = it.gather(1, task[:, None])[:, 0]
    return Selection(task, i, j, keys_v.shape[1] * j + i, scores)


class ClusterPromptPool(nn.Module):
    """The dense pools of every task (spec §2, code shapes, clfast widths).

    Buffers ``keys_v`` (T, n_v, D_v) and ``keys_t`` (T, n_t, D_w), U(−1, 1) until stage 1 overwrites them;
    parameters ``prompts`` (T, n_v·n_t, L, D_f) U(−1, 1) and ``general`` (T, L_g, D_f) N(0, 1). ``fitted`` (T,)
    bool marks the tasks whose keys stage 1 has written.
    """

    def __init__(self, num_tasks: int, image_dim: int, text_dim: int, width: int, *, n_image_keys: int = 3,
                 n_text_keys: int = 3, length: int = 10, general_length: int = 10):
        super().__init__()
        for name, v in (("num_tasks", num_tasks), ("image_dim", image_dim), ("text_dim", text_dim),
                        ("width", width), ("n_image_keys", n_image_keys), ("n_text_keys", n_text_keys),
                        ("length", length)):
            _check_count("ClusterPromptPool", name, v)
        _check_count("ClusterPromptPool", "general_length", general_length, 0)
        self.n_image_keys, self.n_text_keys = n_image_keys, n_text_keys
        self.register_buffer("keys_v", torch.empty(num_tasks, n_image_keys, image_dim).uniform_(-1, 1))
        self.register_buffer("keys_t", torch.empty(num_tasks, n_text_keys, text_dim).uniform_(-1, 1))
        self.register_buffer("fitted", torch.zeros(num_tasks, dtype=torch.bool))
        self.prompts = nn.Parameter(torch.empty(num_tasks, n_image_keys * n_text_keys, length, width).uniform_(-1, 1))
        self.general = nn.Parameter(torch.randn(num_tasks, general_length, width))

    @property
    def num_tasks(self) -> int:
        return self.prompts.shape[0]

    @torch.no_grad()
    def set_keys(self, task: int, keys_v: Tensor, keys_t: Tensor) -> None:
        """Write task ``task``'s stage-1 keys and mark it fitted."""
        if not 0 <= task < self.num_tasks:
            raise ValueError(f"ClusterPromptPool.set_keys: task must be in [0, {self.num_tasks}), got {task}")
        for name, new, old in (("keys_v", keys_v, self.keys_v[task]), ("keys_t", keys_t, self.keys_t[task])):
            if tuple(new.shape) != tuple(old.shape):
                raise ValueError(f"ClusterPromptPool.set_keys: {name} must have shape {tuple(old.shape)}, "
                                 f"got {tuple(new.shape)}")
        self.keys_v[task].copy_(keys_v)
        self.keys_t[task].copy_(keys_t)
        self.fitted[task] = True

    def select(self, h_v: Tensor, h_t: Tensor, seen: int, task: Optional[Tensor] = None) -> Selection:
        """:func:`select_prompts` over tasks ``[0, seen)``."""
        if not 1 <= seen <= self.num_tasks:
            raise ValueError(f"ClusterPromptPool.select: seen must be in [1, {self.num_tasks}], got {seen}")
        return select_prompts(h_v, h_t, self.keys_v[:seen], self.keys_t[:seen], task)

    def prompt(self, task: Tensor, index: Tensor) -> Tensor:
        """Π = [G_τ ; P_τ[idx]] per sample: (B, L_g + L, D_f), differentiable w.r.t. the pools (only the rows
        gathered receive gradient)."""
        task, index = task.long(), index.long()
        return torch.cat([self.general[task], self.prompts[task, index]], dim=1)

"""KeyIndex: a stateful, checkpointable, optionally sharded pool of keys for repeated top-k search, exact (through
:func:`clfast.ops.retrieve`) or approximate (FAISS HNSW / IVF-Flat), with scores differentiable w.r.t. the query."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from clfast.ops import _faiss as faiss_glue
from clfast.ops._backends import FLOAT, LOWP
from clfast.ops._checks import check_float_tensor, check_k, shape_str
from clfast.ops.retrieval import NORM_EPS, check_metric, merge_candidates, rank_key, rescore, retrieve, score_rows

__all__ = ["KeyIndex"]


def _dist():
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() else None


class KeyIndex:
    """A pool of keys for repeated top-k search: large, slowly changing key sets (class prototypes, cluster
    keys, ImageNet-21k-scale pools).

    Args:
        dim: key dimension D.
        metric: ``"cosine"``, ``"ip"`` or ``"l2"`` (as :func:`retrieve`).
        exact: True searches exactly (through :func:`retrieve`, so the C++ or faiss backend). False uses a
            FAISS approximate index (``index_type`` ``"hnsw"``, default, or ``"ivf"`` = IVF-Flat): results may
            miss true neighbours; their scores are still exact and differentiable w.r.t. the query.
        shard: under ``torch.distributed``, each rank keeps 1/world of the keys. :meth:`add` and
            :meth:`search` are then collective (every rank calls them; :meth:`add` with the same keys on every
            rank); :meth:`search` returns each rank the results for its own queries, merged over all shards.
        dtype: storage dtype of the keys (float32, or bfloat16/float16 to halve the memory).
        device: where the keys live (default CPU).
        index_type, nlist, nprobe, hnsw_m, ef_search: the approximate index (``exact=False`` only; a faiss-cpu
            index, whatever ``device``). IVF needs :meth:`train` (or trains itself on the first :meth:`add`);
            ``nlist`` defaults to about 4·√n of the training sample.
        process_group: the group for ``shard=True`` (default: the world).

    Indices are global and sequential in order of :meth:`add`. The state is checkpointable:
    :meth:`state_dict` holds only tensors and plain values (``torch.load(weights_only=True)`` works), including
    a trained approximate index, so nothing is retrained on load.
    """

    def __init__(self, dim: int, metric: str = "cosine", exact: bool = True, *, shard: bool = False,
                 dtype: torch.dtype = torch.float32, device: Any = None, index_type: str = "hnsw",
                 nlist: Optional[int] = None, nprobe: int = 16, hnsw_m: int = 32, ef_search: int = 64,
                 process_group: Any = None) -> None:
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"KeyIndex: dim must be a positive int, got {dim!r}")
        check_metric("KeyIndex", metric)
        if not isinstance(exact, bool):
            raise TypeError(f"KeyIndex: exact must be a bool, got {type(exact).__name__}")
        if dtype not in FLOAT:
            raise TypeError(f"KeyIndex: dtype must be a floating dtype, got {dtype}")
        if index_type not in ("hnsw", "ivf"):
            raise ValueError(f"KeyIndex: index_type must be 'hnsw' or 'ivf', got {index_type!r}")
        if not exact and faiss_glue.unavailable_reason() is not None:
            raise RuntimeError(f"KeyIndex(exact=False) needs faiss: {faiss_glue.unavailable_reason()}")
        self.dim, self.metric, self.exact, self.dtype = dim, metric, exact, dtype
        self.device = torch.device(device if device is not None else "cpu")
        self.index_type, self.nlist, self.nprobe = index_type, nlist, nprobe
        self.hnsw_m, self.ef_search = hnsw_m, ef_search
        self.shard, self.group = shard, process_group
        if shard and _dist() is None:
            raise RuntimeError("KeyIndex(shard=True) needs an initialised torch.distributed process group")
        self.reset()

    # -- bookkeeping -------------------------------------------------------------------------------

    @property
    def world(self) -> tuple[int, int]:
        """(rank, world size) of the sharding; (0, 1) when not sharded."""
        if not self.shard:
            return 0, 1
        dist = _dist()
        return dist.get_rank(self.group), dist.get_world_size(self.group)

    def reset(self) -> None:
        """Drop every key (a trained IVF index keeps its training)."""
        self._buf = torch.empty((0, self.dim), dtype=self.dtype, device=self.device)
        self._ids = torch.empty((0,), dtype=torch.int64, device=self.device)
        self._n = 0  # local rows in use
        self.ntotal = 0  # global number of keys added
        old = getattr(self, "_faiss", None)
        if self.exact:
            self._faiss = None
        elif old is not None and self.index_type == "ivf" and old.is_trained:
            old.reset()
        else:
            self._faiss = self._new_faiss_index()

    def __len__(self) -> int:
        return self.ntotal

    @property
    def keys(self) -> Tensor:
        """This rank's keys ``(n_local, D)`` (all keys when not sharded), a view into the pool."""
        return self._buf[: self._n]

    @property
    def ids(self) -> Tensor:
        """Global indices ``(n_local,)`` of :attr:`keys`, ascending."""
        return self._ids[: self._n]

    def _new_faiss_index(self, nlist: Optional[int] = None):
        import faiss

        fm = faiss.METRIC_L2 if self.metric == "l2" else faiss.METRIC_INNER_PRODUCT
        if self.index_type == "hnsw":
            index = faiss.IndexHNSWFlat(self.dim, self.hnsw_m, fm)
            index.hnsw.efSearch = self.ef_search
            return index
        nlist = nlist or self.nlist
        if nlist is None:
            return None  # chosen from the training sample by train()
        quantizer = faiss.IndexFlatL2(self.dim) if fm == faiss.METRIC_L2 else faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, fm)  # faiss keeps the quantizer alive
        index.nprobe = self.nprobe
        return index

    def _faiss_rows(self, x: Tensor):
        x = x.detach().to("cpu", torch.float32)
        if self.metric == "cosine":
            x = F.normalize(x, dim=-1, eps=NORM_EPS)
        return x.contiguous().numpy()

    # -- the API -----------------------------------------------------------------------------------

    def train(self, sample: Tensor) -> None:
        """Train the IVF coarse quantizer on ``sample`` ``(n, D)`` (a no-op for exact and HNSW indexes).
        Under ``shard=True`` pass the same sample on every rank, so that every shard shares one quantizer."""
        check_float_tensor("KeyIndex.train", "sample", sample, shape=f"(n,D) = (n,{self.dim})", dim=2)
        if sample.shape[1] != self.dim:
            raise ValueError(f"KeyIndex.train: sample must have shape (n,D) = (n,{self.dim}), got {shape_str(sample)}")
        if self.exact or self.index_type != "ivf":
            return
        if self._faiss is not None and self._faiss.ntotal > 0:
            raise RuntimeError("KeyIndex.train: the IVF index already holds keys; reset() first")
        n = sample.shape[0]
        nlist = self._faiss.nlist if self._faiss is not None else max(1, min(int(4 * math.sqrt(n)), n // 39))
        if n < nlist:  # checked before an index is built: an empty sample would fix nlist = 1 for good
            raise ValueError(f"KeyIndex.train: sample must have at least nlist = {nlist} rows (one per IVF list; an "
                             f"untrained index trains on the keys of its first add), got {shape_str(sample)}")
        if self._faiss is None:
            self._faiss = self._new_faiss_index(nlist)
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        self._faiss.train(self._faiss_rows(sample))

    def add(self, keys: Tensor) -> Tensor:
        """Append keys ``(n, D)``; returns their global indices ``(n,)``. Sharded: collective, same keys on
        every rank, of which each keeps a contiguous 1/world slice. An untrained IVF index trains on them."""
        check_float_tensor("KeyIndex.add", "keys", keys, shape=f"(n,D) = (n,{self.dim})", dim=2)
        if keys.shape[1] != self.dim:
            raise ValueError(f"KeyIndex.add: keys must have shape (n,D) = (n,{self.dim}), got {shape_str(keys)}")
        n = keys.shape[0]
        new_ids = torch.arange(self.ntotal, self.ntotal + n, dtype=torch.int64, device=self.device)
        rank, world = self.world
        lo, hi = (rank * n) // world, ((rank + 1) * n) // world
        local = keys.detach()[lo:hi].to(self.device, self.dtype)
        if not self.exact:
            import faiss

            if n and (self._faiss is None or not self._faiss.is_trained):  # nothing to train on in an empty add
                self.train(keys)
            faiss.omp_set_num_threads(torch.get_num_threads())
            if local.shape[0]:
                self._faiss.add(self._faiss_rows(local))
        self._append(local, new_ids[lo:hi])
        self.ntotal += n
        return new_ids

    def _append(self, rows: Tensor, ids: Tensor) -> None:
        need = self._n + rows.shape[0]
        if need > self._buf.shape[0]:  # grow geometrically: many small adds stay linear in time
            cap = max(need, 2 * self._buf.shape[0], 1024)
            buf = torch.empty((cap, self.dim), dtype=self.dtype, device=self.device)
            buf[: self._n] = self._buf[: self._n]
            idb = torch.empty((cap,), dtype=torch.int64, device=self.device)
            idb[: self._n] = self._ids[: self._n]
            self._buf, self._ids = buf, idb
        self._buf[self._n:need] = rows
        self._ids[self._n:need] = ids
        self._n = need

    def search(self, query: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
        """Top-``k`` keys of the pool for each query row ``(B, D)``: ``(scores, indices)``, both ``(B, k)``,
        ordered as :func:`retrieve`; scores differentiable w.r.t. the query. Collective when sharded."""
        check_float_tensor("KeyIndex.search", "query", query, shape=f"(B,D) = (B,{self.dim})", dim=2)
        if query.shape[1] != self.dim:
            raise ValueError(f"KeyIndex.search: query must have shape (B,D) = (B,{self.dim}), got {shape_str(query)}")
        check_k("KeyIndex.search", k, self.ntotal)
        if self.shard:
            return self._sharded_search(query, k)
        if self.exact:
            s, i = retrieve(query.to(self._query_dtype(query)), self.keys.to(query.device), k, metric=self.metric)
        else:
            local = self._local_search(query.detach().to(self.device), k)
            s, i = rescore(query, self.keys.to(query.device), local.to(query.device), self.metric)
        return s, self.ids.to(query.device)[i]

    def _query_dtype(self, query: Tensor) -> torch.dtype:
        """The dtype a query is searched in against keys stored as self.dtype (see retrieve's dtype rules)."""
        if query.dtype == self.dtype:
            return query.dtype
        return torch.float32 if self.dtype in LOWP else self.dtype

    def _local_search(self, q: Tensor, k: int) -> Tensor:
        """Local row indices ``(B, min(k, n_local))`` of this rank's best keys for each row of ``q``."""
        kk = min(k, self._n)
        if kk == 0 or q.shape[0] == 0:
            return torch.empty((q.shape[0], kk), dtype=torch.int64, device=q.device)
        qq = q.to(self._query_dtype(q))
        if self.exact:
            return retrieve(qq, self.keys, kk, metric=self.metric)[1]
        import faiss

        faiss.omp_set_num_threads(torch.get_num_threads())
        if self.index_type == "hnsw":
            self._faiss.hnsw.efSearch = max(self.ef_search, kk)
        _, local = self._faiss.search(self._faiss_rows(q), kk)
        local = torch.from_numpy(local).to(q.device)
        short = (local < 0).any(1)  # an IVF probe reached fewer than kk keys: search those rows exactly
        if bool(short.any()):
            local[short] = retrieve(qq[short], self.keys, kk, metric=self.metric)[1]
        return local

    def _sharded_search(self, query: Tensor, k: int) -> tuple[Tensor, Tensor]:
        """Every rank searches every rank's queries on its shard; the candidates are all-gathered and merged
        (each rank can merge every query), then each key row that won is contributed by its owner through an
        all-reduce, so that each rank recomputes differentiable scores for its own queries."""
        dist = _dist()
        rank, world = self.world
        B, dev = query.shape[0], self.device
        sizes = [torch.zeros(1, dtype=torch.int64, device=dev) for _ in range(world)]
        dist.all_gather(sizes, torch.tensor([B], dtype=torch.int64, device=dev), group=self.group)
        bmax = max(int(s.item()) for s in sizes)
        wide = torch.float64 if self.dtype == torch.float64 or query.dtype == torch.float64 else torch.float32
        qpad = torch.zeros((bmax, self.dim), dtype=wide, device=dev)
        qpad[:B] = query.detach().to(dev, wide)
        gathered = [torch.empty_like(qpad) for _ in range(world)]
        dist.all_gather(gathered, qpad, group=self.group)
        allq = torch.cat(gathered, 0)  # (world * bmax, D)
        # this shard's k best for every query; a shard with fewer than k keys pads with -inf
        local = self._local_search(allq, k)
        kk = local.shape[1]
        s = torch.full((world * bmax, k), float("-inf"), dtype=wide, device=dev)
        gid = torch.full((world * bmax, k), -1, dtype=torch.int64, device=dev)
        if kk:
            s[:, :kk] = score_rows(allq, self.keys, local, self.metric).to(wide)
            gid[:, :kk] = self.ids[local]
        all_s = [torch.empty_like(s) for _ in range(world)]
        all_i = [torch.empty_like(gid) for _ in range(world)]
        dist.all_gather(all_s, s, group=self.group)
        dist.all_gather(all_i, gid, group=self.group)
        cs = torch.stack(all_s, 1).reshape(world * bmax, world * k)
        ci = torch.stack(all_i, 1).reshape(world * bmax, world * k)
        # padding must lose every tie, so it gets indices above any real one
        pad = ci < 0
        ci = torch.where(pad, 2 ** 62 + torch.arange(ci.shape[1], device=dev).expand_as(ci), ci)
        _, top = merge_candidates(cs.masked_fill(pad, float("-inf")), ci, k)  # (world * bmax, k) global ids
        rows = torch.zeros((world * bmax, k, self.dim), dtype=wide, device=dev)
        if self._n:
            pos = torch.searchsorted(self.ids, top).clamp_max(self._n - 1)
            mine = self.ids[pos] == top
            rows[mine] = self.keys[pos[mine]].to(wide)
        dist.all_reduce(rows, group=self.group)  # one owner per row: the sum is exact
        mine_q = slice(rank * bmax, rank * bmax + B)
        my_top, my_rows = top[mine_q].to(query.device), rows[mine_q].to(query.device)
        seq = torch.arange(B * k, device=query.device).reshape(B, k)
        # the rows came from self.dtype storage: casting back is exact, and the scores are then the same
        # function of (query, row) as without sharding
        scores = score_rows(query, my_rows.reshape(B * k, self.dim).to(self.dtype), seq, self.metric)
        order = torch.sort(rank_key(scores.detach()), dim=1, descending=True, stable=True).indices
        return scores.gather(1, order), my_top.gather(1, order)

    # -- checkpointing -----------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Tensors and plain values only (this rank's shard when sharded)."""
        rank, world = self.world
        state = {"dim": self.dim, "metric": self.metric, "exact": self.exact, "dtype": str(self.dtype)[6:],
                 "index_type": self.index_type, "shard": self.shard, "rank": rank, "world_size": world,
                 "ntotal": self.ntotal, "keys": self.keys.detach().cpu().clone(), "ids": self.ids.cpu().clone()}
        if self._faiss is not None:
            import faiss

            state["faiss_index"] = torch.from_numpy(faiss.serialize_index(self._faiss).copy())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output; the index must have the same dim, metric and exactness (and,
        when sharded, the same rank and world size)."""
        for key in ("dim", "metric", "exact", "index_type"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"KeyIndex.load_state_dict: {key} is {state.get(key)!r} in the state, "
                                 f"{getattr(self, key)!r} here")
        rank, world = self.world
        same_shard = not self.shard or (state.get("rank"), state.get("world_size")) == (rank, world)
        if bool(state.get("shard")) != self.shard or not same_shard:
            raise ValueError(f"KeyIndex.load_state_dict: the state is rank {state.get('rank')} of "
                             f"{state.get('world_size')} (shard={state.get('shard')}); this index is rank {rank} "
                             f"of {world} (shard={self.shard})")
        keys, ids = state["keys"], state["ids"]
        if keys.dim() != 2 or keys.shape[1] != self.dim or ids.shape != (keys.shape[0],):
            raise ValueError(f"KeyIndex.load_state_dict: keys must be (n,{self.dim}) with ids (n,), got "
                             f"{shape_str(keys)} and {shape_str(ids)}")
        self._faiss = None
        self.reset()
        self._append(keys.to(self.device, self.dtype), ids.to(self.device))
        self.ntotal = int(state["ntotal"])
        if "faiss_index" in state:
            import faiss

            self._faiss = faiss.deserialize_index(state["faiss_index"].numpy())
            if self.index_type == "hnsw":
                self._faiss.hnsw.efSearch = self.ef_search
            else:
                faiss.extract_index_ivf(self._faiss).nprobe = self.nprobe

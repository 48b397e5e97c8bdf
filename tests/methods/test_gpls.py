"""GPLS (methods/gpls.md): the spec's test list (its section 8), the ELBO that trains, and the options that
reproduce the released code.

Most tests run on the shipped vit_tiny_synth (6 blocks, width 192, 65 tokens); the shapes and parameter
counts use ViT-B/16 (random weights, or built on the meta device), and the insertion equivalence a random
12-block ViT so that every one of 12 layers is checked.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from clfast.backbones.vit import ViTBackbone, create_vit
from clfast.methods import TaskContext, build_config, create_method, method_class
from clfast.methods.gpls import GPLS, GaussianPrior, all_reduce_stats, majority_task
from clfast.ops import GaussianStats, gaussian_kl, mahalanobis

NUM_CLASSES, NUM_TASKS = 8, 2
PER = NUM_CLASSES // NUM_TASKS
RANGES = tuple((t * PER, (t + 1) * PER) for t in range(NUM_TASKS))


@pytest.fixture(scope="module")
def tiny():
    return create_vit("vit_tiny_synth", pretrained=True)


def images(n: int, seed: int, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def make_batch(n: int = 4, seed: int = 0, task: int = 0, start: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 1000)
    return {"image": images(n, seed), "label": torch.randint(*RANGES[task], (n,), generator=g),
            "task": torch.full((n,), task), "index": torch.arange(start, start + n)}


def task_data(task: int, n_batches: int = 2, n: int = 4) -> list[dict]:
    """Fixed training batches of one task, with distinct indices per task."""
    return [make_batch(n, seed=100 * task + b, task=task, start=1000 * task + n * b) for b in range(n_batches)]


def ctx_for(task: int, data=None, **kw) -> TaskContext:
    kw.setdefault("augment", False)
    return TaskContext(task=task, num_tasks=NUM_TASKS, class_range=RANGES[task], seen_classes=RANGES[task][1],
                       num_classes=NUM_CLASSES, task_ranges=RANGES,
                       task_loader=(lambda augment=False: data) if data is not None else None, **kw)


def build(backbone, seed: int = 0, **cfg) -> GPLS:
    torch.manual_seed(seed)
    return create_method("gpls", backbone, NUM_CLASSES, NUM_TASKS, **cfg)


def randomise_eps(m: GPLS, seed: int = 5, scale: float = 0.05) -> None:
    """W^ε starts at zero (ε ≡ 0); a trained one is not: give the ε path something to carry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for gen in m.generators:
            gen.eps_weight.copy_(torch.randn(gen.eps_weight.shape, generator=g) * scale)
            gen.eps_bias.copy_(torch.randn(gen.eps_bias.shape, generator=g) * scale)
            gen.norm.weight.copy_(1 + 0.1 * torch.randn(gen.norm.weight.shape, generator=g))
            gen.norm.bias.copy_(0.1 * torch.randn(gen.norm.bias.shape, generator=g))


def grads(m, loss) -> dict[str, torch.Tensor]:
    names = [n for n, p in m.named_parameters() if p.requires_grad]
    params = [p for n, p in m.named_parameters() if p.requires_grad]
    return dict(zip(names, torch.autograd.grad(loss, params, allow_unused=True)))


# --- independent references ------------------------------------------------------------------------


def reference_tokens(m: GPLS, imgs: torch.Tensor, task: torch.Tensor, sigma_param: str = "softplus") -> torch.Tensor:
    """The released forward, written out: [cls; z; patches] through each timm block, prompt rows dropped
    after it; μ/σ with the detached norm; ε from LN^g of the real rows entering the block."""
    bb = m.backbone
    vit = bb.vit
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(bb.normalize(imgs))))
    e = m.task_embed[task]
    for layer, blk in enumerate(vit.blocks):
        if layer not in m.layers:
            x = blk(x)
            continue
        g = m.generators[m.layers.index(layer)]
        v = e @ g.mu.weight.T + g.mu.bias
        mu = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).detach()
        s = e @ g.sigma.weight.T + g.sigma.bias
        if sigma_param == "softplus":
            s = torch.log1p(torch.exp(s))
        sigma = s / torch.linalg.vector_norm(s, dim=1, keepdim=True).detach()
        hn = F.layer_norm(x, (x.shape[-1],), g.norm.weight, g.norm.bias, g.norm.eps)
        eps = torch.einsum("jn,bnd->bjd", g.eps_weight, hn) + g.eps_bias[None, :, None]
        z = mu[:, None] + sigma[:, None] * eps
        P = z.shape[1]
        y = blk(torch.cat([x[:, :1], z, x[:, 1:]], dim=1))
        x = torch.cat([y[:, :1], y[:, 1 + P:]], dim=1)
    return vit.norm(x)


def reference_loss(m: GPLS, batch: dict, task: int, pull_weight: float) -> torch.Tensor:
    t = torch.full((batch["image"].shape[0],), task)
    logits = m.head(reference_tokens(m, batch["image"], t, "linear")[:, 0])
    lo, hi = RANGES[task]
    masked = torch.full_like(logits, float("-inf"))
    masked[:, lo:hi] = logits[:, lo:hi]
    ce = F.cross_entropy(masked, batch["label"])
    q = m.backbone.query(batch["image"])
    cos = (q / q.norm(dim=1, keepdim=True)) @ (m.keys[task] / m.keys[task].norm())
    return ce - pull_weight * cos.mean()


# --- 1. shapes ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vitb():
    torch.manual_seed(0)
    return create_vit("vit_base_patch16_224", pretrained=False)


@pytest.mark.parametrize("length,batch", [(10, 1), (10, 2), (30, 1)])
def test_shapes_at_vit_base(vitb, length, batch):
    m = create_method("gpls", vitb, 100, 10, prompt_length=length, elbo_weight=0.0).eval()
    seen = []
    orig = m.prompts

    def spy(slot, h, e, sample):
        z = orig(slot, h, e, sample)
        eps = m.generators[slot].noise(h)
        pk, pv = vitb.prompt_kv(m.layers[slot], z)
        seen.append((tuple(h.shape), tuple(eps.shape), tuple(z.shape), tuple(pk.shape), tuple(pv.shape)))
        return z

    m.prompts = spy
    with torch.no_grad():
        logits = m.logits(images(batch, 0, 224), torch.zeros(batch, dtype=torch.long))
    assert logits.shape == (batch, 100)
    assert len(seen) == 12
    for h, eps, z, pk, pv in seen:
        assert h == (batch, 197, 768) and eps == z == (batch, length, 768)
        assert pk == pv == (batch, 12, length, 64)


def test_a_batch_of_one_trains(tiny):
    """The released code squeezes a batch of 1 and its SVD then raises; here it is an ordinary step."""
    m = build(tiny).train()
    data = task_data(0, 1, n=1)
    m.begin_task(ctx_for(0, data))
    out = m.training_step(data[0], ctx_for(0, cacheable=True))
    out.loss.backward()
    assert torch.isfinite(out.loss) and m.generators[0].mu.weight.grad.abs().sum() > 0


# --- 2. insertion equivalence -------------------------------------------------------------------------


def test_prefix_form_equals_inserted_tokens_in_all_12_layers():
    """[cls; z; patches] through each block with the prompt rows dropped after it (the paper and the code)
    equals GPLS's prefix form: logits and the gradients of μ, σ, W^ε and LN^g, fp32, 1e-5."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=128, depth=12, num_heads=2, mlp_ratio=2.0,
                            num_classes=0)
    bb = ViTBackbone(vit)
    m = create_method("gpls", bb, NUM_CLASSES, NUM_TASKS, prompt_length=3, elbo_weight=0.0)
    assert m.layers == tuple(range(12))
    randomise_eps(m)
    x, task = images(3, 1), torch.tensor([0, 1, 1])
    got = m.logits(x, task)
    want = m.head(reference_tokens(m, x, task)[:, 0])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    target = torch.randn(got.shape, generator=torch.Generator().manual_seed(2))
    g_got, g_want = grads(m, (got * target).sum()), grads(m, (want * target).sum())
    checked = 0
    for name, g in g_want.items():
        if not name.startswith("generators."):
            continue
        assert g.abs().max() > 0, name
        scale = float(g.abs().max())
        torch.testing.assert_close(g_got[name], g, rtol=1e-5, atol=1e-5 * max(1.0, scale), msg=name)
        checked += 1
    assert checked == 12 * 8   # norm.{weight,bias}, eps_{weight,bias}, mu.{weight,bias}, sigma.{weight,bias}


# --- 3. released-code gradients -------------------------------------------------------------------------


@pytest.mark.parametrize("task", [0, 1])
def test_released_code_options_give_the_released_loss_and_gradients(tiny, task):
    cfg = dict(elbo_weight=0.0, sample_noise=False, sigma_param="linear", freeze_past_task_rows=False)
    m = build(tiny, **cfg).train()
    randomise_eps(m)
    data = task_data(task)
    m.begin_task(ctx_for(task, data))
    batch = data[0]
    out = m.training_step(batch, ctx_for(task, cacheable=True))
    ref = reference_loss(m, batch, task, m.cfg.pull_weight)
    torch.testing.assert_close(out.loss, ref, rtol=1e-5, atol=1e-5)
    assert "kl" not in out.logs
    g_got, g_ref = grads(m, out.loss), grads(m, ref)
    for name, g in g_ref.items():
        mine = g_got[name] if g_got[name] is not None else torch.zeros_like(g)
        if g is None:
            assert mine is None or mine.abs().max() == 0, name
            continue
        if task > 0 and name.startswith("generators.") and ".eps_" in name:
            assert mine.abs().max() == 0, f"{name}: W^ε trains on task 0 only"
            continue
        torch.testing.assert_close(mine, g, rtol=1e-4, atol=1e-5 * max(1.0, float(g.abs().max())), msg=name)
    assert g_got["keys"][task].abs().max() > 0 and g_got["task_embed"][task].abs().max() > 0


# --- 4. initialisation ---------------------------------------------------------------------------------


def test_initialisation_eps_is_zero_tokens_equal_mu_and_the_norm_is_detached(tiny):
    m = build(tiny)
    first = m.generators[0].state_dict()
    for g in m.generators:   # deep copies of one generator
        assert all(torch.equal(v, first[k]) for k, v in g.state_dict().items())
    h = torch.randn(3, 65, 192)
    e = m.task_embed[:1].expand(3, -1)
    g = m.generators[2]
    assert torch.equal(g.noise(h), torch.zeros(3, 10, 192))
    mu, sigma = g.mean_scale(e)
    torch.testing.assert_close(mu.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(sigma.norm(dim=1), torch.ones(3))
    z = g(h, e)
    assert torch.equal(z, mu[:, None].expand(-1, 10, -1))
    # through the detached norm the gradient is grad / ‖v‖ (v = W^μ e + b^μ, so dv/db^μ = I)
    c = torch.randn(192)
    (mu[0] * c).sum().backward()
    v = g.mu(e[:1].float())[0].detach()
    torch.testing.assert_close(g.mu.bias.grad, c / v.norm())


# --- 5. gaussian_kl (as GPLS uses it) -------------------------------------------------------------------


def random_spd(D: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(D, D, generator=g, dtype=torch.float64)
    return a @ a.T / D + 0.5 * torch.eye(D, dtype=torch.float64)


def test_gaussian_kl_equals_torch_distributions_and_is_a_divergence():
    D = 7
    S = random_spd(D, 0)
    L = torch.linalg.cholesky(torch.linalg.inv(S))          # L Lᵀ = S⁻¹
    g = torch.Generator().manual_seed(1)
    mu, log_var, m = (torch.randn(3, D, generator=g, dtype=torch.float64) for _ in range(3))
    kl = gaussian_kl(mu, log_var, m, L)
    q = torch.distributions.MultivariateNormal(mu, scale_tril=torch.diag_embed((0.5 * log_var).exp()))
    p = torch.distributions.MultivariateNormal(m, covariance_matrix=S)
    torch.testing.assert_close(kl, torch.distributions.kl_divergence(q, p), rtol=1e-10, atol=1e-10)
    assert (kl >= 0).all()
    inputs = tuple(t.clone().requires_grad_(True) for t in (mu[:1], log_var[:1], m[0]))
    assert torch.autograd.gradcheck(lambda a, b, c: gaussian_kl(a, b, c, L), inputs)
    # zero exactly when the posterior is the prior (a diagonal S)
    s_diag = torch.rand(D, generator=g, dtype=torch.float64) + 0.5
    zero = gaussian_kl(m[:1], s_diag.log()[None], m[0], torch.diag(s_diag.rsqrt()))
    torch.testing.assert_close(zero, torch.zeros(1, dtype=torch.float64), rtol=0, atol=1e-12)


def test_the_method_kl_is_the_closed_form_against_its_stored_prior(tiny):
    m = build(tiny, elbo_weight=1e-3)
    data = task_data(0)
    m.begin_task(ctx_for(0, data))
    kl = m.kl(0)
    assert kl.shape == (6,)
    for j, (g, prior) in enumerate(zip(m.generators, m.priors)):
        mu, sigma = (t.double() for t in g.mean_scale(m.task_embed[:1]))
        S = prior_covariance(prior, 0.1)
        q = torch.distributions.MultivariateNormal(mu, scale_tril=torch.diag_embed(sigma.abs()))
        p = torch.distributions.MultivariateNormal(prior.mean[0][None], covariance_matrix=S)
        want = torch.distributions.kl_divergence(q, p)
        torch.testing.assert_close(kl[j].double(), want[0], rtol=2e-4, atol=1e-3)


# --- 6. prior statistics ------------------------------------------------------------------------------


def prior_covariance(prior: GaussianPrior, shrinkage: float) -> torch.Tensor:
    groups = int((prior.count > 0).sum())
    cov = prior.scatter / (prior.count.sum() - groups)
    return (1 - shrinkage) * cov + shrinkage * torch.diagonal(cov).mean() * torch.eye(cov.shape[0], dtype=cov.dtype)


def block_inputs(backbone, batches) -> dict[int, torch.Tensor]:
    """Every block's input token rows over ``batches``, captured independently of the method."""
    rows = collections.defaultdict(list)

    def grab(layer, x):
        rows[layer].append(x.reshape(-1, x.shape[-1]).double())

    with torch.no_grad():
        for b in batches:
            backbone(b["image"], block_fn=grab)
    return {k: torch.cat(v) for k, v in rows.items()}


def test_prior_is_the_pooled_within_task_gaussian_chunk_invariant_and_factorised(tiny):
    d0, d1 = task_data(0, 3, n=3), task_data(1, 2, n=4)
    m = build(tiny, prior_shrinkage=0.0)
    m.begin_task(ctx_for(0, d0))
    m.begin_task(ctx_for(1, d1))
    x0, x1 = block_inputs(tiny, d0), block_inputs(tiny, d1)
    for layer in (0, 3, 5):
        prior = m.priors[layer]
        a, b = x0[layer], x1[layer]
        torch.testing.assert_close(prior.count, torch.tensor([a.shape[0], b.shape[0]], dtype=torch.float64))
        torch.testing.assert_close(prior.mean, torch.stack([a.mean(0), b.mean(0)]))
        centred = torch.cat([a - a.mean(0), b - b.mean(0)])
        sample_cov = centred.T @ centred / (centred.shape[0] - 2)        # γ = 0: the sample covariance
        torch.testing.assert_close(prior_covariance(prior, 0.0), sample_cov, rtol=1e-9, atol=1e-9)
    # one batch of everything (one-shot) gives the chunked result
    whole = build(tiny, prior_shrinkage=0.0)
    whole.begin_task(ctx_for(0, [{k: torch.cat([b[k] for b in d0]) for k in d0[0]}]))
    whole.begin_task(ctx_for(1, [{k: torch.cat([b[k] for b in d1]) for k in d1[0]}]))
    for p, q in zip(m.priors, whole.priors):
        for name in ("count", "mean", "scatter"):
            torch.testing.assert_close(getattr(p, name), getattr(q, name), rtol=1e-10, atol=1e-9)
    # the stored factor: L Lᵀ = S⁻¹ for the shrunk S (γ = 0.1), from the float64 factorisation
    m = build(tiny)
    m.begin_task(ctx_for(0, d0))
    prior = m.priors[4]
    S = prior_covariance(prior, 0.1)
    stats = prior.new_stats()
    stats.count, stats.mean, stats.scatter = prior.count, prior.mean, prior.scatter
    L64 = stats.precision_cholesky(0.1)
    torch.testing.assert_close(L64 @ L64.T @ S, torch.eye(192, dtype=torch.float64), rtol=0, atol=1e-8)
    torch.testing.assert_close(prior.chol, L64.float())
    assert torch.equal(prior.chol, prior.chol.tril())


def _two_rank_worker(rank: int, world: int, init: str, out: str):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7) + 3.0
        groups = torch.arange(40) % 3
        mine = slice(0, 13) if rank == 0 else slice(13, 40)       # unequal shards
        a, b = GaussianStats(6, 3), GaussianStats(6, 1)
        a.update(x[mine], groups[mine])
        b.update(x[mine] * 2)
        ctx = TaskContext(task=0, num_tasks=1, class_range=(0, 1), seen_classes=1, num_classes=1,
                          task_ranges=((0, 1),), rank=rank, world_size=world)
        all_reduce_stats([a], ctx)
        all_reduce_stats([b], ctx)
        if rank == 0:
            torch.save({"a": a.state_dict(), "b": b.state_dict()}, out)
    finally:
        dist.destroy_process_group()


def test_all_reduce_over_two_ranks_equals_one_process(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "stats.pt")
    mp.spawn(_two_rank_worker, args=(2, f"file://{tmp_path / 'init'}", out), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64) * torch.arange(1, 7) + 3.0
    a, b = GaussianStats(6, 3), GaussianStats(6, 1)
    a.update(x, torch.arange(40) % 3)
    b.update(x * 2)
    for want, name in ((a, "a"), (b, "b")):
        for k in ("count", "mean", "scatter"):
            torch.testing.assert_close(got[name][k], getattr(want, k), rtol=1e-12, atol=1e-10)


# --- 7. mahalanobis task inference ----------------------------------------------------------------------


def test_mahalanobis_task_inference_is_the_explicit_nearest_mean(tiny):
    m = build(tiny, task_inference="mahalanobis", elbo_weight=0.0).eval()
    assert m.score_names == ("task_acc", "task_acc_keys")
    m.begin_task(ctx_for(0, task_data(0, 3)))
    m.begin_task(ctx_for(1, task_data(1, 3)))
    prior = m.query_prior
    S = prior_covariance(prior, 0.1)
    batch = make_batch(6, seed=9)
    q = tiny.query(batch["image"]).double()
    explicit = torch.stack([torch.einsum("bd,de,be->b", q - mu, torch.linalg.inv(S), q - mu)
                            for mu in prior.mean], dim=1)
    d = mahalanobis(q.float(), prior.mean.float(), prior.chol)
    torch.testing.assert_close(d.double(), explicit, rtol=1e-3, atol=1e-3)
    task, by_keys = m.infer_task(batch, ctx_for(1, split="test"))
    assert torch.equal(task, explicit.argmin(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):     # as the engine evaluates (the default amp)
        assert torch.equal(m.infer_task(batch, ctx_for(1, split="test"))[0], task)
    with torch.no_grad():
        logits = m.predict(batch, ctx_for(1, split="test"))
        scores = m.score(batch, logits, ctx_for(1, split="test"))
    assert set(scores) == {"credit", "task_acc", "task_acc_keys"}
    assert torch.equal(scores["task_acc"], (task == batch["task"]).float())
    assert torch.equal(scores["task_acc_keys"], (by_keys == batch["task"]).float())


# --- 8. selection ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("inference", ["keys", "mahalanobis"])
def test_selection_is_per_sample_and_batch_invariant(tiny, inference):
    m = build(tiny, task_inference=inference).eval()
    randomise_eps(m)
    m.begin_task(ctx_for(0, task_data(0)))
    m.begin_task(ctx_for(1, task_data(1)))
    batch = make_batch(6, seed=4)
    ctx = ctx_for(1, split="test", cacheable=True)
    q = tiny.query(batch["image"])
    with torch.no_grad():
        if inference == "keys":   # keys at two of the queries: those images pick different tasks
            m.keys[0], m.keys[1] = q[0], q[1]
        task, _ = m.infer_task(batch, ctx)
        assert task.unique().numel() == 2, "the batch must mix tasks for this test to mean anything"
        logits = m.predict(batch, ctx)
        alone = torch.cat([m.predict({k: v[i: i + 1] for k, v in batch.items()}, ctx) for i in range(6)])
    # fp32 GEMMs block differently for 1 and 6 rows (~1e-5 apart here); a sample that read another's task or
    # prompt would be O(1) away
    torch.testing.assert_close(alone, logits, rtol=1e-4, atol=1e-4)


def two_tasks_keyed_on_the_batch(tiny, n: int, **cfg):
    """A model after the statistics of tasks 0 and 1 whose keys are the queries of the batch's first two
    images (so the batch's images pick different tasks); returns (model, batch, queries)."""
    m = build(tiny, **cfg).eval()
    m.begin_task(ctx_for(0, task_data(0)))
    m.begin_task(ctx_for(1, task_data(1)))
    batch = make_batch(n, seed=4)
    q = tiny.query(batch["image"])
    with torch.no_grad():
        m.keys[0], m.keys[1] = q[0], q[1]
    return m, batch, q


def test_batchwise_vote_is_the_majority_task(tiny):
    for t in ([0, 1, 1, 0, 2], [2, 1, 1], [3], [0, 2, 2, 1, 1]):
        t = torch.tensor(t)
        values, counts = torch.unique(t, return_counts=True)       # the released code's way
        want = values[counts.argmax()]
        assert torch.equal(majority_task(t, 5), want.expand_as(t))
    m, batch, q = two_tasks_keyed_on_the_batch(tiny, 5, batchwise_vote=True)
    with torch.no_grad():
        own = F.normalize(q, dim=1) @ F.normalize(m.keys, dim=1).T
        ids = own.argmax(1)
        task, by_keys = m.infer_task(batch, ctx_for(1, split="test"))
    assert torch.equal(by_keys, ids) and ids.unique().numel() == 2
    assert torch.equal(task, majority_task(ids, NUM_TASKS)) and task.unique().numel() == 1
    assert m.record()["unfair_evaluation"] and "batchwise_vote" in m.record()["unfair_evaluation_reasons"]


def test_mask_to_predicted_task_keeps_each_samples_inferred_task(tiny):
    m, batch, _ = two_tasks_keyed_on_the_batch(tiny, 6, mask_to_predicted_task=True)
    with torch.no_grad():
        ctx = ctx_for(1, split="test")
        task, _ = m.infer_task(batch, ctx)
        logits = m.predict(batch, ctx)
    for b in range(6):
        lo, hi = RANGES[int(task[b])]
        assert torch.isfinite(logits[b, lo:hi]).all()
        assert torch.isinf(logits[b, :lo]).all() and torch.isinf(logits[b, hi:]).all()


# --- 9. cache ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_cached_query_is_bitwise_the_recomputed_one(tiny, amp):
    m = build(tiny).train()
    data = task_data(0, 2, n=5)
    m.begin_task(ctx_for(0, data, amp_dtype=amp))                  # the statistics pass fills the cache
    calls = []
    m.backbone.query, orig = (lambda x, **kw: calls.append(1) or orig(x, **kw)), m.backbone.query
    try:
        ctx = ctx_for(0, split="train", cacheable=True)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            for b in data:
                cached = m.query(b, ctx)
                assert calls == [], "the query of a cached image was recomputed"
                fresh = orig(b["image"]).float()
                assert torch.equal(cached, fresh)
            # cache_query=false: always recomputed
            m.cfg.cache_query = False
            m.query(data[0], ctx)
            assert calls == [1]
    finally:
        del m.backbone.query
    # with augmentation on, nothing is cached (the transform is random)
    m2 = build(tiny, elbo_weight=0.0)
    m2.begin_task(ctx_for(0, data, augment=True))
    assert m2.query_cache._rows == {}


# --- 10. freezing ------------------------------------------------------------------------------------------


def run_tasks(m: GPLS, steps: int = 3) -> list[dict]:
    """Every task for `steps` steps under one persistent Adam (the code's: amsgrad, betas 0.9/0.9); the
    trainable state after each task."""
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.01, betas=(0.9, 0.9), amsgrad=True)
    after = []
    for task in range(NUM_TASKS):
        data = task_data(task, steps)
        m.train()
        m.begin_task(ctx_for(task, data))
        for b in data:
            opt.zero_grad()
            m.training_step(b, ctx_for(task, cacheable=True)).loss.backward()
            opt.step()
            m.after_optimizer_step()
        after.append({n: p.detach().clone() for n, p in m.named_parameters() if p.requires_grad})
    return after


@pytest.mark.parametrize("freeze", [True, False])
def test_eps_trains_on_task_0_only_and_old_task_rows_stay_unless_asked(tiny, freeze):
    m = build(tiny, freeze_past_task_rows=freeze)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    s0, s1 = run_tasks(m)
    eps = [n for n in s0 if ".eps_" in n]
    assert eps and all(not torch.equal(s0[n], before[n]) for n in eps), "W^ε must train on task 0"
    assert all(torch.equal(s1[n], s0[n]) for n in eps), "W^ε moved after task 0"
    for n in ("generators.0.mu.weight", "generators.3.sigma.bias", "generators.5.norm.weight"):
        assert not torch.equal(s1[n], s0[n]), f"{n} must train on every task"
    for n in ("task_embed", "keys"):
        assert not torch.equal(s0[n][0], before[n][0]) and torch.equal(s0[n][1], before[n][1])
        assert not torch.equal(s1[n][1], s0[n][1])
        if freeze:
            assert torch.equal(s1[n][0], s0[n][0]), f"{n}[0] moved after task 0"
        else:   # the released code: Adam's moments keep moving the old row
            assert not torch.equal(s1[n][0], s0[n][0]), f"{n}[0] should drift with the option"


# --- 11. parameter counts ---------------------------------------------------------------------------------


@pytest.mark.parametrize("classes,tasks,cfg,want", [
    (100, 10, {}, 440_276),                                             # CIFAR-100
    (200, 10, {"prompt_length": 30, "task_embed_dim": 64}, 1_449_912),  # ImageNet-R
    (345, 15, {}, 632_601),                                             # DomainNet
])
def test_parameter_counts_at_vit_base(classes, tasks, cfg, want):
    import timm

    with torch.device("meta"):
        bb = ViTBackbone(timm.create_model("vit_base_patch16_224", num_classes=0))
        m = create_method("gpls", bb, classes, tasks, **cfg)
    trainable = {n: p.numel() for n, p in m.named_parameters() if p.requires_grad}
    assert sum(trainable.values()) == want
    if classes == 100:
        per_layer = sum(v for n, v in trainable.items() if n.startswith("generators.0."))
        assert per_layer == 29_628 and len(m.generators) == 12
        assert trainable["keys"] == 7_680 and trainable["task_embed"] == 160
        assert trainable["head.weight"] + trainable["head.bias"] == 76_900
    with torch.device("meta"):
        skip = create_method("gpls", bb, classes, tasks, skip_last_layer_imr=True, **cfg)
    assert skip.layers == tuple(range(11))


# --- 12. metrics ----------------------------------------------------------------------------------------------


def test_metrics_on_a_hand_written_matrix_with_unequal_task_sizes():
    from clfast.engine.metrics import AccuracyMatrix

    sizes = [50, 100, 200]
    correct = {(0, 0): 45, (0, 1): 40, (0, 2): 35, (1, 1): 90, (1, 2): 80, (2, 2): 100}
    acc = AccuracyMatrix()
    for (i, j), c in correct.items():
        acc.update(i, j, c, sizes[i])
    s = acc.summary()
    # by hand: last column 70, 80, 50 %
    assert s["A_N"] == pytest.approx((70 + 80 + 50) / 3)
    assert s["F_N"] == pytest.approx(((90 - 70) + (90 - 80)) / 2)           # max over earlier columns
    assert s["sample_weighted_accuracy"] == pytest.approx(100 * (35 + 80 + 100) / 350)
    la = float(acc.matrix().diagonal().mean())                             # LA: mean of the diagonal
    assert la == pytest.approx((90 + 90 + 50) / 3)
    assert s["sample_weighted_accuracy"] != pytest.approx(s["A_N"])        # unequal sizes tell them apart


# --- the ELBO trains -----------------------------------------------------------------------------------------


def test_the_kl_alone_gives_the_generators_gradient_and_falls(tiny):
    m = build(tiny, elbo_weight=1e-3).train()
    data = task_data(0)
    m.begin_task(ctx_for(0, data))
    g = grads(m, m.cfg.elbo_weight * m.kl(0).mean())
    for j in range(6):
        for part in ("mu.weight", "mu.bias", "sigma.weight", "sigma.bias"):
            assert g[f"generators.{j}.{part}"].abs().max() > 0, f"no KL gradient for generators.{j}.{part}"
    assert g["task_embed"][0].abs().max() > 0 and g["task_embed"][1].abs().max() == 0
    assert g["head.weight"] is None and g["keys"] is None       # the KL does not reach them
    # the training loss carries exactly β·mean KL on top of CE and the pull term (same noise draw)
    ctx = ctx_for(0, cacheable=True)
    torch.manual_seed(3)
    with_kl = m.training_step(data[0], ctx)
    m.cfg.elbo_weight = 0.0
    torch.manual_seed(3)
    without = m.training_step(data[0], ctx)
    m.cfg.elbo_weight = 1e-3
    torch.testing.assert_close(with_kl.loss - without.loss, 1e-3 * with_kl.logs["kl"])
    # the KL falls when the training step's loss is minimised (a few Adam steps on fixed batches)
    opt = torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=0.01)
    kls = []
    for step in range(8):
        out = m.training_step(data[step % 2], ctx)
        kls.append(float(out.logs["kl"]))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        m.after_optimizer_step()
    assert kls[-1] < kls[0], kls


def test_with_elbo_weight_0_the_kl_gives_exactly_zero_gradient(tiny):
    m = build(tiny, elbo_weight=0.0).train()
    assert m.priors is None
    data = task_data(0)
    m.begin_task(ctx_for(0, data))
    m.kl = lambda task: (_ for _ in ()).throw(AssertionError("the KL was computed with elbo_weight=0"))
    out = m.training_step(data[0], ctx_for(0, cacheable=True))
    assert "kl" not in out.logs
    # the generators' gradient is that of CE and the pull term alone (which never reaches μ/σ via the KL)
    torch.manual_seed(0)
    ref = build(tiny, elbo_weight=1e-3).train()
    ref.load_state_dict(m.state_dict(), strict=False)
    ref.begin_task(ctx_for(0, data))
    torch.manual_seed(7)
    a = grads(m, m.training_step(data[0], ctx_for(0, cacheable=True)).loss)
    torch.manual_seed(7)
    out_ref = ref.training_step(data[0], ctx_for(0, cacheable=True))
    b = grads(ref, out_ref.loss - ref.cfg.elbo_weight * ref.kl(0).mean())
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7, msg=n)


def test_noise_in_training_only(tiny):
    m = build(tiny).train()
    randomise_eps(m)
    x, t = images(2, 3), torch.zeros(2, dtype=torch.long)
    with torch.no_grad():
        a, b = m.logits(x, t, sample=True), m.logits(x, t, sample=True)
        c, d = m.logits(x, t), m.logits(x, t)
    assert (a - b).abs().max() > 1e-4 and torch.equal(c, d)
    m2 = build(tiny, sample_noise=False)
    m2.load_state_dict(m.state_dict())
    data = task_data(0)
    m2.begin_task(ctx_for(0, data))
    l1 = m2.training_step(data[0], ctx_for(0, cacheable=True)).loss
    l2 = m2.training_step(data[0], ctx_for(0, cacheable=True)).loss
    assert torch.equal(l1, l2)


def test_head_init_is_the_codes_or_the_baselines(tiny):
    m = create_method("gpls", tiny, 100, 10)
    assert torch.all(m.head.bias == -math.log(99.0))
    assert abs(float(m.head.weight.std()) - math.sqrt(2.0 / 100)) < 0.01          # kaiming, fan_out = 100
    torch.manual_seed(0)
    b = create_method("gpls", tiny, 100, 10, head_init="trunc_normal")
    assert torch.all(b.head.bias == 0) and abs(float(b.head.weight.std()) - 0.02) < 0.002


def test_unit_prior_features_and_config_errors(tiny):
    m = build(tiny, prior_features="unit")
    m.begin_task(ctx_for(0, task_data(0)))
    norms = m.priors[2].mean[0].norm()
    assert 0 < norms <= 1 + 1e-9
    for bad, match in (({"sigma_param": "exp"}, "sigma_param"), ({"task_inference": "cosine"}, "task_inference"),
                       ({"prior_shrinkage": 1.5}, "prior_shrinkage"), ({"elbo_weight": -1}, "elbo_weight"),
                       ({"prompt_lenght": 3}, "prompt_length")):
        with pytest.raises(ValueError, match=match):
            build_config(method_class("gpls").Config, bad, "gpls")
    with pytest.raises(ValueError, match="no prior for task 1"):
        m.kl(1)
    with pytest.raises(ValueError, match="task_loader"):
        build(tiny).begin_task(ctx_for(0))

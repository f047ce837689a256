"""VectorQuantizer options: straight-through / rotation trick, low-dim codes, EMA, dead-code restart, usage
statistics, and their synchronisation across ranks (2 gloo processes)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from svq_fast._ext import native_available
from svq_fast.nn.quantizer import VectorQuantizer, rotate_to


def _latents(b=2, d=16, h=5, w=7, seed=0):
    return torch.randn(b, d, h, w, generator=torch.Generator().manual_seed(seed))


def _flat(z):
    return z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])


def test_forward_contract_and_lookup():
    q = VectorQuantizer(64, 16, backend="ref")
    z = _latents()
    z_q, loss, info = q(z)
    assert q.usage_stats()["restarts"] == 0  # the default window (100 steps) has not passed
    assert z_q.shape == z.shape and loss.dim() == 0
    assert info["indices"].shape == (2, 5, 7) and info["indices"].dtype == torch.int64
    assert 1.0 <= float(info["perplexity"]) <= 64
    assert torch.equal(q.lookup(info["indices"]), z_q.detach())
    # nearest code, and loss = (1 + beta) * mean squared error
    flat = _flat(z)
    want = torch.cdist(flat, q.codebook()).argmin(1)
    assert torch.equal(info["indices"].flatten(), want)
    torch.testing.assert_close(loss, 1.25 * (flat - q.codebook()[want]).pow(2).mean())


@pytest.mark.skipif(not native_available(), reason="native extension not built")
def test_backends_agree():
    z = _latents(d=32)
    outs = []
    for backend in ("ref", "native"):
        torch.manual_seed(0)
        q = VectorQuantizer(100, 32, backend=backend, init_from_data=False)
        z1 = z.clone().requires_grad_()
        z_q, loss, info = q(z1)
        (z_q.square().sum() + loss).backward()
        outs.append((z_q, loss, info["indices"], z1.grad, q.embedding.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_straight_through_gradient():
    q = VectorQuantizer(64, 16, backend="ref", beta=0.0)
    z = _latents().requires_grad_()
    z_q, _, _ = q(z)
    g = torch.randn_like(z)
    (z_q * g).sum().backward()
    assert torch.equal(z.grad, g)  # identity Jacobian


def test_rotation_trick_value_and_gradient():
    torch.manual_seed(0)
    src = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(6, 5, dtype=torch.float64)
    out = rotate_to(src, tgt)
    torch.testing.assert_close(out, tgt)  # forward value is the code
    g = torch.randn(6, 5, dtype=torch.float64)
    (out * g).sum().backward()
    for i in range(6):  # explicit lambda R: R u = q, R orthogonal, gradient = lambda R^T g
        u = F.normalize(src[i].detach(), dim=0)
        qv = F.normalize(tgt[i], dim=0)
        w = F.normalize(u + qv, dim=0)
        r = torch.eye(5, dtype=torch.float64) - 2 * torch.outer(w, w) + 2 * torch.outer(qv, u)
        torch.testing.assert_close(r @ u, qv)
        torch.testing.assert_close(r @ r.t(), torch.eye(5, dtype=torch.float64))
        lam = tgt[i].norm() / src[i].detach().norm()
        torch.testing.assert_close(src.grad[i], lam * r.t() @ g[i])


def test_rotation_option_in_module():
    z = _latents()
    q_ste = VectorQuantizer(64, 16, backend="ref", beta=0.0, init_from_data=False)
    q_rot = VectorQuantizer(64, 16, backend="ref", beta=0.0, grad="rotation", init_from_data=False)
    q_rot.load_state_dict(q_ste.state_dict())
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    a, _, ia = q_ste(z1)
    b, _, ib = q_rot(z2)
    assert torch.equal(ia["indices"], ib["indices"])
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(z)
    (a * g).sum().backward()
    (b * g).sum().backward()
    assert not torch.allclose(z1.grad, z2.grad)  # rotated, rescaled gradient
    # rotation preserves the direction-change structure: per-vector gradient norm scales by |e|/|z|
    flat_z, flat_e = _flat(z), _flat(b.detach())
    ratio = _flat(z2.grad).norm(dim=1) / _flat(g).norm(dim=1)
    torch.testing.assert_close(ratio, flat_e.norm(dim=1) / flat_z.norm(dim=1), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cosine", [False, True])
def test_low_dim_lookup(cosine):
    q = VectorQuantizer(128, 16, code_dim=8, cosine=cosine, backend="ref")
    assert q.embedding.weight.shape == (128, 8)
    z = _latents().requires_grad_()
    z_q, loss, info = q(z)
    assert z_q.shape == z.shape
    x = q.proj_in(_flat(z.detach()))
    x = F.normalize(x, dim=1) if cosine else x
    assert torch.equal(info["indices"].flatten(), torch.cdist(x, q.codebook()).argmin(1))
    if cosine:
        torch.testing.assert_close(q.codebook().norm(dim=1), torch.ones(128))
    torch.testing.assert_close(q.lookup(info["indices"]), z_q.detach())
    (z_q.square().sum() + loss).backward()
    for p in (q.proj_in.weight, q.proj_out.weight, q.embedding.weight, z):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_ema_update_formula():
    k, d, decay, eps = 8, 4, 0.9, 1e-5
    q = VectorQuantizer(k, d, ema=True, ema_decay=decay, ema_eps=eps, backend="ref", beta=0.25, init_from_data=False)
    assert not q.embedding.weight.requires_grad
    w0 = q.embedding.weight.detach().clone()
    z = _latents(b=1, d=d, h=4, w=4).requires_grad_()
    z_q, loss, info = q(z)
    flat, idx = _flat(z.detach()), info["indices"].flatten()
    torch.testing.assert_close(loss, 0.25 * (flat - w0[idx]).pow(2).mean())  # commitment term only
    counts = torch.bincount(idx, minlength=k).float()
    sums = torch.zeros(k, d).index_add_(0, idx, flat)
    cs = (1 - decay) * counts
    es = decay * w0 + (1 - decay) * sums
    n = cs.sum()
    want = es / ((cs + eps) / (n + k * eps) * n)[:, None]
    torch.testing.assert_close(q.embedding.weight, want)
    loss.backward()  # the in-place EMA write does not break the autograd graph
    assert z.grad is not None and q.embedding.weight.grad is None


def test_ema_converges_to_cluster_means():
    torch.manual_seed(0)
    centers = torch.tensor([[4.0, 0.0], [0.0, 4.0], [-4.0, 0.0], [0.0, -4.0]])
    q = VectorQuantizer(4, 2, ema=True, ema_decay=0.8, backend="ref", init_from_data=False)
    with torch.no_grad():
        q.embedding.weight.copy_(centers * 0.5)
    for _ in range(60):
        x = centers[torch.arange(64) % 4] + 0.1 * torch.randn(64, 2)
        q(x.t().reshape(1, 2, 8, 8))
    torch.testing.assert_close(q.embedding.weight, centers, atol=0.1, rtol=0)


@pytest.mark.parametrize("ema", [False, True])
def test_dead_code_restart(ema):
    torch.manual_seed(0)
    k, d = 16, 4
    q = VectorQuantizer(k, d, restart_after=3, ema=ema, backend="ref", init_from_data=False)
    with torch.no_grad():
        q.embedding.weight.zero_()
        q.embedding.weight[0] = 10.0  # code 0 far away; codes 1.. all at the origin: only code 1 is ever chosen
    opt = torch.optim.SGD([p for p in q.parameters() if p.requires_grad], lr=0.1) if not ema else None
    z = _latents(b=1, d=d, h=4, w=8)  # 32 latents
    used = set()
    for step in range(1, 4):
        z_q, loss, info = q(z)
        used |= set(info["indices"].flatten().tolist())
        if opt is not None:
            opt.zero_grad()
            loss.backward()
            opt.step()
        stats = q.usage_stats()
        if step < 3:
            assert stats["restarts"] == 0
    restarted = [j for j in range(k) if j not in used]
    assert 0 not in used and len(restarted) >= k - 3
    assert stats["restarts"] == len(restarted)  # exactly the codes unused for 3 steps
    flat = _flat(z)
    cb = q.codebook().detach()
    for j in restarted:  # each restarted code is one of the batch's latents
        assert (cb[j] - flat).norm(dim=1).min() < 1e-6
    assert len({tuple(cb[j].tolist()) for j in restarted}) == len(restarted)  # drawn without replacement
    if not ema:
        # the optimizer owns the weight: the restart lives in a buffer and survives the next optimizer step
        assert "restart_offset" in dict(q.named_buffers())
        z_q, loss, info = q(z)
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert len(torch.unique(info["indices"])) > 1
    assert q.usage_stats()["steps"] == (4 if not ema else 3)


@pytest.mark.parametrize("sampling", ["error", "uniform"])
def test_restart_sampling_favours_badly_quantized_latents(sampling):
    """1020 latents sit on the one live code and 4 lie far from it: D^2 seeding gives the 7 dead codes to the 4
    outliers (weights ~ 100 against ~1e-6); a uniform draw of 7 of 1024 rows almost never picks all 4."""
    torch.manual_seed(0)
    k, d = 8, 2
    q = VectorQuantizer(k, d, restart_after=1, restart_sampling=sampling, backend="ref", init_from_data=False)
    with torch.no_grad():
        q.embedding.weight.zero_()
        q.embedding.weight[1:] = 50.0  # codes 1.. far from everything: only code 0 is chosen, the rest are dead
    outliers = torch.tensor([[10.0, 0.0], [-10.0, 0.0], [0.0, 10.0], [0.0, -10.0]])
    flat = torch.cat([1e-3 * torch.randn(1020, d), outliers])  # (N, D) latents
    q(flat.t().reshape(1, d, 32, 32))  # (1, D, 32, 32): row n of `flat` is latent n
    new_codes = q.codebook().detach()[1:]  # (7, D) the re-seeded codes
    hit = [bool((new_codes - o).norm(dim=1).min() < 1e-6) for o in outliers]
    assert q.usage_stats()["restarts"] == k - 1
    assert all(hit) if sampling == "error" else not all(hit)


def test_defaults_restart_dead_codes():
    q = VectorQuantizer(8, 4, init_from_data=False)
    assert (q.restart_after, q.ema, q.grad, q.cosine, q.code_dim, q.beta) == (100, False, "ste", False, 4, 0.25)
    assert q.restart_sampling == "uniform"
    with pytest.raises(ValueError, match="restart_sampling"):
        VectorQuantizer(8, 4, restart_sampling="random")
    q_off = VectorQuantizer(8, 4, restart_after=0, init_from_data=False)
    assert "restart_offset" not in dict(q_off.named_buffers())
    z = _latents(b=1, d=4, h=2, w=2)
    for _ in range(100):
        q_off(z)
    assert q_off.usage_stats()["restarts"] == 0


def test_restart_with_fewer_latents_than_dead_codes():
    q = VectorQuantizer(64, 4, restart_after=1, backend="ref")
    z = _latents(b=1, d=4, h=2, w=4)  # 8 latents, 63 dead codes
    q(z)
    cb = q.codebook().detach()
    assert q.usage_stats()["restarts"] >= 56
    assert len({tuple(r.tolist()) for r in cb}) == 64  # jittered: no duplicate codes


def test_usage_stats_window():
    k = 8
    q = VectorQuantizer(k, 2, usage_window=4, restart_after=0, backend="ref")
    with torch.no_grad():
        q.embedding.weight.copy_(torch.stack([torch.tensor([float(i), 0.0]) * 10 for i in range(k)]))
    near = lambda codes: torch.tensor([[10.0 * c, 0.0] for c in codes]).t().reshape(1, 2, 1, len(codes))  # noqa: E731
    q(near([0, 1, 2, 3]))
    s = q.usage_stats()
    assert s["usage_fraction"] == 0.5 and s["codes_used"] == 4
    for _ in range(4):
        _, _, info = q(near([0, 0, 1, 1]))
    s = q.usage_stats()
    assert s["usage_fraction"] == 0.25  # codes 2, 3 fell out of the 4-step window
    assert float(info["perplexity"]) == pytest.approx(2.0)
    assert 2.0 < s["perplexity_window"] < 4.0
    assert s["steps"] == 5 and s["dead_fraction"] == 0.75
    q.eval()  # eval forwards do not move the statistics
    q(near([5, 6, 7, 4]))
    assert q.usage_stats() == s
    assert all(isinstance(v, float) for v in s.values())


def test_first_training_forward_seeds_codebook_from_data():
    z = _latents(d=4)  # N = 70 latents
    q = VectorQuantizer(16, 4, restart_after=0, backend="ref")
    z_q, _, info = q(z)
    rows = _flat(z)
    codes = q.codebook().detach()
    # every code is one of this batch's latents, distinct ones, and this very forward already used them
    assert ((codes[:, None] - rows[None]).norm(dim=-1).min(1).values < 1e-6).all()
    assert len(torch.unique(codes, dim=0)) == 16
    assert torch.equal(q.lookup(info["indices"]), z_q.detach())
    assert q.usage_stats()["restarts"] == 0  # seeding is not a restart
    # more codes than latents: duplicates are split by noise, every code stays close to a latent
    big = VectorQuantizer(100, 4, restart_after=0, backend="ref")
    big(z)
    dist_to_data = (big.codebook().detach()[:, None] - rows[None]).norm(dim=-1).min(1).values
    assert len(torch.unique(big.codebook().detach(), dim=0)) == 100 and dist_to_data.max() < 0.1
    # evaluation forwards, and modules restored from a trained state, never reseed
    fresh = VectorQuantizer(16, 4, restart_after=0, backend="ref").eval()
    before = fresh.codebook().detach().clone()
    fresh(z)
    assert torch.equal(fresh.codebook(), before)
    restored = VectorQuantizer(16, 4, restart_after=0, backend="ref")
    restored.load_state_dict(q.state_dict())
    restored(_latents(d=4, seed=3))
    torch.testing.assert_close(restored.codebook().detach(), codes)
    off = VectorQuantizer(16, 4, restart_after=0, init_from_data=False, backend="ref")
    before = off.codebook().detach().clone()
    off(z)
    assert torch.equal(off.codebook().detach(), before) and "restart_offset" not in dict(off.named_buffers())


def test_state_dict_roundtrip_and_fp32_statistics():
    q = VectorQuantizer(32, 8, ema=True, restart_after=5, backend="ref")
    q(_latents(d=8))
    q2 = VectorQuantizer(32, 8, ema=True, restart_after=5, backend="ref")
    q2.load_state_dict(q.state_dict())
    z = _latents(d=8, seed=1)
    q.eval(), q2.eval()
    assert torch.equal(q(z)[0], q2(z)[0])
    q2.bfloat16()
    assert q2.embedding.weight.dtype == torch.bfloat16
    assert q2.ema_cluster_size.dtype == torch.float32 and q2.ema_embed_sum.dtype == torch.float32


def test_ema_refuses_zero3_partitioned_codebook():
    q = VectorQuantizer(8, 4, ema=True, backend="ref")
    q.embedding.weight.ds_status = "NOT_AVAILABLE"  # what DeepSpeed ZeRO-3 attaches to partitioned parameters
    with pytest.raises(RuntimeError, match="ZeRO-3"):
        q(_latents(b=1, d=4, h=2, w=2))


def test_bad_options():
    with pytest.raises(ValueError, match="unknown grad"):
        VectorQuantizer(8, 4, grad="gumbel")
    with pytest.raises(ValueError, match="unknown backend"):
        VectorQuantizer(8, 4, backend="cuda")
    with pytest.raises(ValueError, match="ema_decay"):
        VectorQuantizer(8, 4, ema=True, ema_decay=1.0)
    with pytest.raises(ValueError, match="expected 4 channels"):
        VectorQuantizer(8, 4)(torch.randn(1, 5, 2, 2))


# -- two ranks (gloo): statistics and codebooks identical everywhere ------------------------------------------------


def _rank_main(rank, world, init_file, result_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(0)  # identical initial modules, as DDP / DeepSpeed broadcast at wrap time
    q = VectorQuantizer(32, 4, ema=True, restart_after=2, usage_window=3, backend="ref")
    torch.manual_seed(100 + rank)  # different data and RNG streams per rank
    for _ in range(4):
        z = torch.randn(1, 4, 3, 3) + rank * 3.0
        _, _, info = q(z)
    torch.save({"state": q.state_dict(), "stats": q.usage_stats(), "ppl": info["perplexity"]},
               os.path.join(result_dir, f"rank{rank}.pt"))  # fmt: skip
    dist.destroy_process_group()


def test_two_ranks_stay_in_sync(tmp_path):
    world = 2
    mp.spawn(_rank_main, args=(world, str(tmp_path / "init"), str(tmp_path)), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(world))
    assert r0["stats"] == r1["stats"] and r0["stats"]["restarts"] > 0
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key
    assert torch.equal(r0["ppl"], r1["ppl"])  # batch perplexity of both ranks' latents together

"""Frechet distance against independent computations, streamed feature statistics, the FID Inception pipeline
with random weights from a temporary file, and the statistics cache."""

import numpy as np
import pytest
import scipy.linalg
import torch

from svq_fast.eval.fid import (
    FID_WEIGHTS_NAME,
    FID_WEIGHTS_URL,
    InceptionFeatures,
    frechet_distance,
    frechet_distance_of,
    load_stats,
    save_stats,
    stats_cache_path,
    stats_key,
)
from svq_fast.eval.metrics import FeatureStats


def _spd(rng, d, scale=1.0):
    a = rng.standard_normal((d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def _fd_scipy(mu1, s1, mu2, s2):
    """The textbook formula with scipy's sqrtm (float64), independent of our eigen-decomposition."""
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = np.real(covmean)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("d", [1, 8, 64])
def test_frechet_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = _spd(rng, d), _spd(rng, d, scale=3.0)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-9, abs=1e-9)
    if d > 1:  # and pytorch-fid's own implementation (sqrtm with the eps fallback; it fails on 1x1 with scipy 1.17)
        from pytorch_fid.fid_score import calculate_frechet_distance

        assert ours == pytest.approx(calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_diagonal_closed_form_including_singular():
    rng = np.random.default_rng(1)
    d = 50
    v1, v2 = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
    v1[:5] = 0.0  # singular covariances (fewer samples than dimensions give these)
    v2[3:8] = 0.0
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    closed = float(np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2))
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(closed, rel=1e-10)
    # rotating both distributions by the same orthogonal matrix leaves the distance unchanged
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    rot = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert rot == pytest.approx(closed, rel=1e-8)


def test_frechet_rank_deficient_matches_the_sample_space_computation():
    """Fewer samples than dimensions (the usual FID-on-a-small-set case): S1 = Xc^T Xc / (n - 1) has rank n - 1, and
    tr sqrt(S1 S2) is exactly the sum of sqrt(eigenvalues) of the small matrix Xc S2 Xc^T / (n - 1)."""
    rng = np.random.default_rng(3)
    d = 300
    x = rng.standard_normal((12, d)) * rng.uniform(0.1, 3, d)
    y = rng.standard_normal((40, d)) + 0.2
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    xc = x - x.mean(0)
    small = xc @ s2 @ xc.T / (len(x) - 1)
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((small + small.T) / 2), 0, None)).sum()
    d_mu = x.mean(0) - y.mean(0)
    exact = float(d_mu @ d_mu + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    assert frechet_distance(x.mean(0), s1, y.mean(0), s2) == pytest.approx(exact, rel=1e-7)  # (4e-9 here)
    assert frechet_distance(y.mean(0), s2, x.mean(0), s1) == pytest.approx(exact, rel=1e-7)  # symmetric


def test_frechet_rejects_bad_input():
    with pytest.raises(ValueError, match="mismatched"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.zeros(2), np.full((2, 2), np.nan), np.zeros(2), np.eye(2))


def test_streamed_statistics_match_numpy_and_converge_to_the_known_distance():
    rng = np.random.default_rng(2)
    d = 6
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d) + 1.0
    c1, c2 = _spd(rng, d), _spd(rng, d, scale=2.0)
    x1 = rng.multivariate_normal(mu1, c1, size=40000) + 1e3  # a large offset: no E[xx^T] - mu mu^T cancellation
    x2 = rng.multivariate_normal(mu2, c2, size=40000) + 1e3
    a, b = FeatureStats(d), FeatureStats(d)
    for chunk in np.array_split(x1, 37):  # uneven batches
        a.update(torch.from_numpy(chunk))
    for chunk in np.array_split(x2, 5):
        b.update(torch.from_numpy(chunk))
    np.testing.assert_allclose(a.mean(), x1.mean(0), rtol=1e-12)
    np.testing.assert_allclose(a.cov(), np.cov(x1, rowvar=False), rtol=1e-9, atol=1e-9)
    est = frechet_distance_of(a, b)
    assert est == pytest.approx(_fd_scipy(x1.mean(0), np.cov(x1, rowvar=False), x2.mean(0), np.cov(x2, rowvar=False)))
    truth = _fd_scipy(mu1, c1, mu2, c2)
    assert est == pytest.approx(truth, rel=0.03)  # sampling error at n = 40000


def _random_fid_weights(path):
    """torchvision's Inception v3 with the FID head size (same keys and shapes as pytorch-fid's FID network),
    random weights, BatchNorm statistics calibrated on noise so that features are O(1)."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average over the calibration pass
    with torch.no_grad():
        net.train()(torch.rand(2, 3, 112, 112) * 2 - 1)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    return str(_random_fid_weights(tmp_path_factory.mktemp("inception") / "random_inception.pth"))


def test_inception_features_with_random_weights(fid_weights):
    with pytest.warns(RuntimeWarning, match="not pytorch-fid"):
        net = InceptionFeatures(fid_weights)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 64, 48, generator=g) * 2 - 1
    f = net(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float32
    assert torch.isfinite(f).all() and f.std() > 1e-3  # calibrated: features are not vanishing
    assert torch.allclose(net(x[:1]), f[:1], atol=1e-4, rtol=1e-4)  # per-image, batch-independent (eval BN)
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    # the network is pytorch-fid's module, resizing to 299 and rescaling [0, 1] -> [-1, 1] itself
    from pytorch_fid.inception import InceptionV3

    assert isinstance(net.net, InceptionV3) and net.net.resize_input and net.net.normalize_input
    assert "sha256:" in net.network_id


def test_inception_missing_file_names_path_and_source(tmp_path):
    missing = tmp_path / "nope" / FID_WEIGHTS_NAME
    with pytest.raises(FileNotFoundError) as e:
        InceptionFeatures(str(missing))
    assert str(missing) in str(e.value) and FID_WEIGHTS_URL in str(e.value)


def test_inception_wrong_file_is_rejected(tmp_path):
    bad = tmp_path / "not_inception.pth"
    torch.save({"features.0.weight": torch.zeros(64, 3, 3, 3)}, bad)
    with pytest.raises(ValueError, match="not_inception.pth"), pytest.warns(RuntimeWarning):
        InceptionFeatures(str(bad))


def test_stats_cache_roundtrip_and_key(tmp_path):
    shard = tmp_path / "a.tar"
    shard.write_bytes(b"x" * 10)
    st = FeatureStats(4)
    st.update(torch.randn(20, 4, dtype=torch.float64))
    key = stats_key([str(shard)], "net-A", image_size=64, samples=20)
    path = stats_cache_path(str(tmp_path / "cache"), key, "fid")
    save_stats(path, st, key)
    back = load_stats(path, key)
    assert back.n == 20
    np.testing.assert_allclose(back.mean(), st.mean())
    np.testing.assert_allclose(back.cov(), st.cov(), rtol=1e-12)
    assert load_stats(path, "another key") is None
    assert stats_key([str(shard)], "net-B", image_size=64, samples=20) != key
    assert stats_key([str(shard)], "net-A", image_size=64, samples=19) != key
    shard.write_bytes(b"y" * 11)  # a regenerated shard changes the key
    assert stats_key([str(shard)], "net-A", image_size=64, samples=20) != key

"""FID: pytorch-fid's Inception network (weights from a local file), the Frechet distance, cached statistics.

Network: `pytorch_fid.inception.InceptionV3` with `use_fid_inception=True`, i.e. the port of TensorFlow's
2015-12-05 Inception graph that every published FID uses, returning the 2048-d pool3 features. Inputs are
resized to 299x299 bilinearly and scaled to [-1, 1] inside the package's module, exactly as in pytorch-fid.
The package would fetch its weights from FID_WEIGHTS_URL; here the one download call of
`pytorch_fid.inception.fid_inception_v3` is pointed at a local file instead while the network is built, and the
package's own strict `load_state_dict` checks the file. Get the file once on a machine with network:

    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth

Frechet distance (`frechet_distance`): computed in float64 without scipy's sqrtm and without its eps-offset
fallback. tr sqrt(S1 S2) is the sum of the square roots of the eigenvalues of S1 S2. Factor S1 = P U^T U P^T by
pivoted Cholesky (LAPACK dpstrf; U is r x D for a rank-r S1, so singular covariances, e.g. fewer samples than
dimensions, are exact, not regularised). S1 S2 = (P U^T)(U P^T S2) has the same non-zero eigenvalues as
M = U (P^T S2 P) U^T, which is symmetric positive semi-definite, so `eigvalsh` applies; its tiny negative round-off
eigenvalues are clipped to 0. About 5x faster than an eigendecomposition of S1 at D = 2048, and far more accurate
for rank-deficient S1 (tests compare it with scipy.linalg.sqrtm, pytorch-fid, the closed form for diagonal
covariances, and the exact low-rank computation from the samples).

Statistics cache: the real images' (mu, sigma, n) of one dataset split are stored as an .npz (pytorch-fid's
key names, plus `key`) named by a hash of the shard list (paths, sizes, mtimes), the network (a hash of its
weight file) and the settings that change the features (image size, number of samples).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings

import numpy as np
import torch
from torch import nn

from svq_fast.eval.metrics import FeatureStats

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub's convention: the file name carries its hash's prefix
FID_DIM = 2048


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr sqrt(S1 S2), in float64 (pivoted Cholesky + eigvalsh: see the module
    docstring). Covariances must be symmetric positive semi-definite (D, D); means (D,)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"mismatched statistics: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    if not (np.isfinite(s1).all() and np.isfinite(s2).all() and np.isfinite(mu1).all() and np.isfinite(mu2).all()):
        raise ValueError("frechet_distance: the statistics contain NaN or inf")
    from scipy.linalg import lapack

    s1, s2 = (s1 + s1.T) / 2, (s2 + s2.T) / 2
    c, piv, rank, info = lapack.dpstrf(s1, lower=0, tol=-1.0)  # P^T S1 P = U^T U, first `rank` rows of U valid
    if info < 0:
        raise ValueError(f"frechet_distance: LAPACK dpstrf failed (info {info})")
    tr_covmean = 0.0
    if rank > 0:
        p = piv - 1
        u = np.triu(c[:rank])  # (r, D)
        m = u @ s2[np.ix_(p, p)] @ u.T  # (r, r)
        ev = np.linalg.eigvalsh((m + m.T) / 2)
        tr_covmean = float(np.sqrt(np.clip(ev, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def frechet_distance_of(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean(), a.cov(), b.mean(), b.cov())


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextlib.contextmanager
def _pytorch_fid_reads(path: str):
    """While active, pytorch_fid.inception fetches its FID weights from `path` instead of the network."""
    import pytorch_fid.inception as pfi

    def load_local(url, *args, **kwargs):
        return torch.load(path, map_location="cpu", weights_only=True)

    original = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = load_local
    try:
        yield pfi
    finally:
        pfi.load_state_dict_from_url = original


class InceptionFeatures(nn.Module):
    """pytorch-fid's FID InceptionV3 (pool3, 2048-d) with weights from a local file; frozen, eval mode.

    forward(images (B, 3, H, W) in [-1, 1]) -> (B, 2048) float32 features. Quantise images to 8 bits first
    (svq_fast.eval.image_metrics.quantize_uint8) to score them as they would be saved.
    """

    def __init__(self, weights_path: str):
        super().__init__()
        if not weights_path or not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"FID Inception weights not found at {weights_path!r}. Download pytorch-fid's {FID_WEIGHTS_NAME} on a "
                f"machine with network ({FID_WEIGHTS_URL}), copy it here and pass its path (--inception-weights)."
            )
        self.sha256 = file_sha256(weights_path)
        if not self.sha256.startswith(FID_WEIGHTS_SHA256_PREFIX):
            warnings.warn(
                f"{weights_path} is not pytorch-fid's {FID_WEIGHTS_NAME} (sha256 {self.sha256[:12]}...): the "
                "scores are not comparable with published FIDs",
                RuntimeWarning,
                stacklevel=2,
            )
        try:
            with _pytorch_fid_reads(weights_path) as pfi:
                self.net = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[FID_DIM]], use_fid_inception=True)
        except (RuntimeError, KeyError, ValueError, EOFError) as e:
            raise ValueError(
                f"{weights_path} does not hold the FID Inception weights ({FID_WEIGHTS_NAME} from {FID_WEIGHTS_URL}): "
                f"{str(e)[:300]}"
            ) from e
        self.net.eval().requires_grad_(False)
        self.train(False)
        self.network_id = f"pytorch_fid-{_pytorch_fid_version()}-InceptionV3-pool3-sha256:{self.sha256}"

    def train(self, mode: bool = True):  # always eval (BatchNorm statistics are the network's)
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = ((images.float() + 1) / 2).clamp(0, 1)  # the package takes [0, 1] (normalize_input=True)
        return self.net(x)[0].flatten(1)  # (B, 2048)


def _pytorch_fid_version() -> str:
    try:
        from importlib.metadata import version

        return version("pytorch-fid")
    except Exception:  # pragma: no cover
        return "unknown"


# ---------------------------------------------------------------------------------------------------------------
# statistics cache


def shard_fingerprint(shards: list[str]) -> list[list]:
    """[absolute path, size, mtime_ns] per shard: a changed or regenerated shard changes the key."""
    out = []
    for p in shards:
        st = os.stat(p)
        out.append([os.path.abspath(p), st.st_size, st.st_mtime_ns])
    return out


def stats_key(shards: list[str], network_id: str, **settings) -> str:
    """A hash of (shard list, network, settings); settings must be JSON-serialisable (image size, samples...)."""
    blob = json.dumps({"shards": shard_fingerprint(shards), "network": network_id, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def stats_cache_path(cache_dir: str, key: str, prefix: str = "stats") -> str:
    return os.path.join(cache_dir, f"{prefix}-{key[:24]}.npz")


def save_stats(path: str, stats: FeatureStats, key: str) -> None:
    """Write (mu, sigma, n, key) atomically."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}.npz"
    np.savez(tmp, **stats.to_arrays(), key=np.asarray(key))
    os.replace(tmp, path)


def load_stats(path: str, key: str | None = None) -> FeatureStats | None:
    """The cached statistics, or None when the file is absent or was made for another key."""
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        if key is not None and str(z["key"]) != key:
            return None
        return FeatureStats.from_arrays(z["mu"], z["sigma"], int(z["n"]))


__all__ = [
    "FID_WEIGHTS_NAME",
    "FID_WEIGHTS_URL",
    "FID_DIM",
    "frechet_distance",
    "frechet_distance_of",
    "InceptionFeatures",
    "file_sha256",
    "shard_fingerprint",
    "stats_key",
    "stats_cache_path",
    "save_stats",
    "load_stats",
]

"""One map, many images: how much K draws for one held-out map differ, against how much real images of that map do.

A map fixes what is where, not colours and textures. The synthetic generator re-renders a scene's layout with fresh
image-only draws (data/synthetic.py, `texture_seed`): K such re-renders are the real spread of one map. Rows (K draws
per map, the first `maps` held-out maps):
- real re-renders                 texture seeds 0..K-1 of the map's own scene
- decodes, the re-renders' z_x    decoder(z_s, z_x of each re-render): stage 1's ceiling for any GPT, whose best is
                                  to draw z_x as real images of the map have them (blur and lost texture detail
                                  lower this row's pixel spread, not the GPT)
- GPT samples, map-only z_s       z_s from the map alone (encode_semantic), the evaluation's sampling settings
- GPT samples, reference z_s      z_s from (real image, map), as in the paper
- decodes, other scenes' z_x      decoder(z_s, z_x of the K next scenes in the batch)
- decodes, random z_x             decoder(z_s, uniform random image tokens)
(the two decode rows use the evaluation's z_s kind). Per row: the mean pairwise pixel L1 between the K draws of a
map (images in [0, 1]), the mean pairwise L2 between their segmenter features (the pooled penultimate layer FSD
uses), diversity-LPIPS when the LPIPS backbone is given, each as a ratio to the real re-renders'; coverage: FSD
between all draws and all re-renders of the same maps (a row that draws one appearance, or copies the reference,
covers the re-renders' spread badly); and the mean-colour distance (per class present, L2 in [0, 1] RGB) to the
reference image and to a re-render of the map (draw i against re-render i+1 mod K): their ratio, the copy ratio, is
about 1 for draws independent of the reference (the re-renders' own, by construction) and below 1 for draws that
copy the reference's appearance.

The z_x probe (ZxProbe): decode(z_s of map A, z_x of scene B) for B = the previous scene in the batch; on the
pixels where A and B have the same class (>= PROBE_MIN_PIXELS of a class, and A's and B's mean colours there at
least PROBE_MIN_GAP apart, else the case cannot tell them apart), is the decode's mean colour closer to B's (the z_x
source) than to A's? Bar, stated before it was measured: at least PROBE_BAR of the cases follow z_x.
"""

from __future__ import annotations

import itertools
import re

import numpy as np
import torch

from svq_fast.data.index import read_index
from svq_fast.data.synthetic import SyntheticSpec, render_scene
from svq_fast.eval.image_metrics import quantize_uint8
from svq_fast.eval.metrics import FeatureStats, MeanStat
from svq_fast.eval.sampling import sample_image_tokens
from svq_fast.models.slices import in_slices

REAL, MAP, REF = "real re-renders", "GPT samples, map-only z_s", "GPT samples, reference z_s"
CEILING, OTHER, RANDOM = "decodes, the re-renders' z_x", "decodes, other scenes' z_x", "decodes, random z_x"
ROWS = (REAL, CEILING, MAP, REF, OTHER, RANDOM)
PROBE_MIN_PIXELS, PROBE_MIN_GAP, PROBE_BAR = 16, 0.1, 0.75
NO_RERENDERS = "n/a (held-out shards are not synthetic scenes: no re-renders)"


class Rerenders:
    """Re-renders of held-out synthetic scenes, found by their shard key (make_shards writes `syn<index>`) and
    the seed and size in the shards' index.json. available is False for other datasets."""

    def __init__(self, shards: list[str]):
        index = read_index(shards[0]) if shards else {}
        self.available = index.get("dataset") == "synthetic"
        self.where = shards[0] if shards else "(no shards)"
        self.spec = SyntheticSpec(size=int(index["image_size"]), seed=int(index["seed"])) if self.available else None

    def render(self, keys: list[str], draws: int, labels: torch.Tensor) -> torch.Tensor:
        """keys (B,), labels (B, H, W) the maps as loaded -> (B * draws, 3, H, W) in [-1, 1], map-major. Raises
        when a key is not a synthetic scene's or its re-render's map differs from the loaded one."""
        out = []
        for key, label in zip(keys, labels.cpu().numpy()):
            m = re.fullmatch(r"syn(\d+)", key)
            if m is None:
                raise ValueError(f"{self.where}: sample key {key!r} is not a synthetic scene's (syn<index>)")
            for t in range(draws):
                image, lab = render_scene(self.spec, int(m.group(1)), texture_seed=t)
                if lab.shape != label.shape or not np.array_equal(lab, label):
                    raise ValueError(
                        f"{self.where}: the generator's scene {key} (seed {self.spec.seed}, size {self.spec.size}) "
                        "does not have the loaded map: shards written by another generator version or crop"
                    )
                out.append(torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1) / 127.5 - 1)
        return torch.stack(out).to(labels.device)


def pairwise_mean(v: torch.Tensor, dist) -> torch.Tensor:
    """v (M, K, ...) -> (M,) mean of dist(a, b) over the K (K-1) / 2 pairs of draws of each map."""
    pairs = list(itertools.combinations(range(v.shape[1]), 2))
    return torch.stack([dist(v[:, i], v[:, j]) for i, j in pairs], 1).mean(1)


def class_mean_colours(images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, ...]:
    """images (B, 3, H, W) in [-1, 1], labels (B, H, W) -> (means (B, C, 3) in [0, 1], pixel counts (B, C))."""
    onehot = torch.nn.functional.one_hot(labels.long().clamp(0, num_classes), num_classes + 1)[..., :num_classes]
    onehot = onehot.flatten(1, 2).double()  # (B, HW, C); ignore ids fall into the dropped extra column
    rgb = ((images.double() + 1) / 2).flatten(2).transpose(1, 2)  # (B, HW, 3)
    counts = onehot.sum(1)  # (B, C)
    return onehot.transpose(1, 2) @ rgb / counts.clamp_min(1)[..., None], counts


def _nonnegative(v):
    """A Frechet distance of identical statistics comes out as -1e-16 from round-off: report it as 0."""
    return max(v, 0.0) if isinstance(v, float) else v


class Row:
    def __init__(self, feature_dim: int):
        self.pixel, self.feature, self.lpips, self.colour = MeanStat(), MeanStat(), MeanStat(), MeanStat()
        self.colour_rr = MeanStat()  # the same distance to a re-render of the map
        self.features = FeatureStats(feature_dim) if feature_dim else None

    def states(self):
        return [self.pixel, self.feature, self.lpips, self.colour, self.colour_rr] + (
            [self.features] if self.features else []
        )


class ZxProbe:
    """Cases (pair, class) of decode(z_s of A, z_x of B) that follow z_x (see the module docstring)."""

    def __init__(self):
        self.follows, self.to_b, self.to_a = MeanStat(), MeanStat(), MeanStat()

    def update(self, decoded, x_a, x_b, s_a, s_b, num_classes: int) -> None:
        same = torch.where(s_a == s_b, s_a, torch.full_like(s_a, num_classes))  # pixels where A and B agree
        dec, n = class_mean_colours(decoded, same, num_classes)
        col_a, _ = class_mean_colours(x_a, same, num_classes)
        col_b, _ = class_mean_colours(x_b, same, num_classes)
        d_a, d_b = (dec - col_a).norm(dim=-1), (dec - col_b).norm(dim=-1)  # (B, C)
        case = (n >= PROBE_MIN_PIXELS) & ((col_a - col_b).norm(dim=-1) >= PROBE_MIN_GAP)
        self.follows.update((d_b[case] < d_a[case]).double())
        self.to_b.update(d_b[case])
        self.to_a.update(d_a[case])

    def states(self):
        return [self.follows, self.to_b, self.to_a]

    def results(self) -> dict:
        share = self.follows.mean()
        return {
            "cases": self.follows.count,
            "share_following_zx": share,
            "colour_distance_to_zx_source": self.to_b.mean(),
            "colour_distance_to_zs_source": self.to_a.mean(),
            "bar": f">= {PROBE_BAR} of the cases closer to the z_x source",
            "met": bool(share >= PROBE_BAR) if self.follows.count else "n/a (no cases)",
        }


class Diversity:
    """The diversity rows and the z_x probe over the first `maps` held-out maps, K = `draws` draws each. The task
    supplies the GPT, its tokenizer, the sampling settings and the evaluation's condition (z_s kind)."""

    def __init__(self, task, segmenter, lpips, shards: list[str], *, maps: int, draws: int):
        if draws < 2:
            raise ValueError(f"diversity needs >= 2 draws per map, got {draws}")
        self.task, self.segmenter, self.lpips, self.maps, self.draws = task, segmenter, lpips, maps, draws
        self.rerenders = Rerenders(shards)
        dim = segmenter.feature_dim if segmenter is not None else 0
        self.rows = {name: Row(dim) for name in ROWS}
        self.probe = {"map": ZxProbe(), "reference": ZxProbe()}

    @torch.no_grad()
    def update(self, b: int, first: int, keys: list[str], x, s, img) -> None:
        """Batch number b whose first sample is held-out sample number `first`; x (B, 3, H, W), s (B, H, W), img
        (B, N) the scenes' own image tokens. Only the samples before `maps` count."""
        m = min(self.maps - first, x.shape[0])
        if m <= 0:
            return
        task, k, grid = self.task, self.draws, self.task.grid
        tok, nc = task.tokenizer, task.num_classes
        sem = {c: tok.semantic_tokens(x, s, c) for c in ("map", "reference")}  # (B, P) each
        gen = torch.Generator(device=x.device).manual_seed(task.seed * 1_000_003 + b + 7_919_000)
        draws: dict[str, torch.Tensor] = {}
        zs = sem[task.condition]
        if self.rerenders.available:
            draws[REAL] = self.rerenders.render(keys[:m], k, s[:m])  # (m K, 3, H, W)
            s_k, zs_k = s[:m].repeat_interleave(k, 0), zs[:m].repeat_interleave(k, 0)
            draws[CEILING] = tok.decode(zs_k, tok.image_tokens(draws[REAL], s_k), grid)  # no generator: the rows below
            # draw the same random numbers with or without this row
        # a separate semantic model reads the map alone: its "reference" z_s are its map-only ones, one row says it
        for name, c in ((MAP, "map"), (REF, "reference"))[: 1 if tok.semantic_model is not None else 2]:
            zs_c = sem[c][:m].repeat_interleave(k, 0)  # (m K, P)
            draws[name] = tok.decode(zs_c, sample_image_tokens(task.gpt, zs_c, generator=gen, **task.sampling), grid)
        bsz = x.shape[0]
        other = torch.stack([img.roll(j, 0)[:m] for j in range(1, k + 1)], 1).flatten(0, 1)  # (m K, N)
        if bsz > 1:  # with one scene in the batch there is no other scene's z_x
            draws[OTHER] = tok.decode(zs[:m].repeat_interleave(k, 0), other, grid)
        rand = torch.randint(0, tok.image_vocab, (m * k, img.shape[1]), generator=gen, device=img.device)
        draws[RANDOM] = tok.decode(zs[:m].repeat_interleave(k, 0), rand, grid)
        real = draws.get(REAL)
        for name, images in draws.items():
            self._score(self.rows[name], quantize_uint8(images), x[:m], s[:m], nc, real)
        if bsz > 1:
            for c, probe in self.probe.items():
                decoded = quantize_uint8(tok.decode(sem[c], img.roll(1, 0), grid))
                probe.update(decoded[:m], x[:m], x.roll(1, 0)[:m], s[:m], s.roll(1, 0)[:m], nc)

    def _score(self, row: Row, images, x, s, num_classes: int, real=None) -> None:
        """images (m K, 3, H, W) map-major, x (m, 3, H, W) the references, s (m, H, W), real (m K, ...) the
        re-renders (None: not synthetic)."""
        m, k = x.shape[0], self.draws
        per_map = images.view(m, k, *images.shape[1:])
        row.pixel.update(pairwise_mean(per_map, lambda a, b: ((a - b).abs() / 2).flatten(1).mean(1)))
        if self.segmenter is not None:
            _, feats = in_slices(self.segmenter.forward_features, images)  # (m K, D)
            row.feature.update(pairwise_mean(feats.view(m, k, -1), lambda a, b: (a - b).norm(dim=1)))
            row.features.update(feats)
        if self.lpips is not None:
            row.lpips.update(pairwise_mean(per_map, lambda a, b: self.lpips(a, b).flatten()))
        labels = s.repeat_interleave(k, 0)
        cols, n = class_mean_colours(images, labels, num_classes)
        present = n > 0

        def distance(to: torch.Tensor) -> torch.Tensor:  # (m K,) mean over the classes present
            other, _ = class_mean_colours(to, labels, num_classes)
            return ((cols - other).norm(dim=-1) * present).sum(1) / present.sum(1).clamp_min(1)

        row.colour.update(distance(x.repeat_interleave(k, 0)))
        if real is not None:  # draw i of a map against re-render i + 1 mod K of it (never a re-render to itself)
            row.colour_rr.update(distance(real.view(m, k, *real.shape[1:]).roll(-1, 1).flatten(0, 1)))

    def all_reduce(self) -> None:
        """Collective: every rank calls it, whether or not it scored diversity batches."""
        for row in self.rows.values():
            for st in row.states():
                st.all_reduce()
        for probe in self.probe.values():
            for st in probe.states():
                st.all_reduce()

    def results(self) -> dict:
        from svq_fast.eval.scorer import frechet_or_na

        real = self.rows[REAL]
        have_real = self.rerenders.available and real.pixel.count > 0

        def ratio(st: MeanStat, ref: MeanStat):
            if not have_real:
                return NO_RERENDERS
            return st.mean() / ref.mean() if st.count and ref.count and ref.mean() > 0 else "n/a"

        no_seg, no_lpips = "n/a (no segmenter)", "n/a (no --vgg-weights: diversity-LPIPS needs the VGG backbone)"
        rows = []
        for name, row in self.rows.items():
            if row.pixel.count == 0:
                continue
            seg = self.segmenter is not None
            rows.append(
                {
                    "images": name,
                    "maps": row.pixel.count,
                    "pixel_l1": row.pixel.mean(),
                    "pixel_ratio": ratio(row.pixel, real.pixel),
                    "feature_l2": row.feature.mean() if seg else no_seg,
                    "feature_ratio": ratio(row.feature, real.feature) if seg else no_seg,
                    "lpips": row.lpips.mean() if self.lpips is not None else no_lpips,
                    "lpips_ratio": ratio(row.lpips, real.lpips) if self.lpips is not None else no_lpips,
                    "fsd_to_rerenders": (
                        _nonnegative(frechet_or_na(row.features, real.features)) if have_real else NO_RERENDERS
                    )
                    if seg
                    else no_seg,  # fmt: skip
                    "colour_distance_to_reference": row.colour.mean(),
                    "colour_distance_to_rerenders": row.colour_rr.mean() if have_real else NO_RERENDERS,
                    "reference_copy_ratio": row.colour.mean() / row.colour_rr.mean()
                    if have_real and row.colour_rr.count and row.colour_rr.mean() > 0
                    else NO_RERENDERS,
                }
            )
        return {
            "maps": self.maps,
            "draws_per_map": self.draws,
            "decode_rows_condition": self.task.condition,
            "rerenders": "texture seeds 0..K-1 (data/synthetic.py)" if self.rerenders.available else NO_RERENDERS,
            "rows": rows,
            "zx_probe": {c: p.results() for c, p in self.probe.items()},
        }

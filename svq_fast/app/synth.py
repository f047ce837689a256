"""The model behind the synthesis page: a stage-2 export and its frozen stage-1 tokenizer, turned into
`painted map + settings -> samples + the map as the model understood it`.

The semantic tokens come from the map alone (`encode_semantic`: the image input is the learned fill, or zeros),
since a painted map has no reference image; the demo's stage-1 model loses 0.1 points of semantic mIoU that way
(87.31% against 87.44% with the reference image). Sampling is svq_fast.eval.sampling.sample_images, the path of
recipes/sample.py. "As understood" is the semantic decoder's reading of z_s: what the GPT was conditioned on.
Canvases larger than the model's size (each side a multiple of the downsampling factor, from the model's size up
to MAX_CANVAS_FACTOR times it: 128x128 for the 64-px demo model) are sampled by the sliding window
(svq_fast/eval/sliding_window.py); a 128x128 sample costs about 4x the tokens of a 64x64 one
(benchmarks/results/sampling_any_size_cpu/).
Every problem the person can fix (a missing or wrong export, a bad setting) is an AppError with a sentence for them.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from svq_fast.app.maps import ClassPalette, MapError, check_ids, palette_for
from svq_fast.config import Stage1Config, Stage2Config
from svq_fast.eval.sampling import sample_images
from svq_fast.eval.visualize import to_unit
from svq_fast.export import CONFIG, WEIGHTS, load_gpt, load_tokenizer, read_export

MAX_SAMPLES = 16
MAX_HELDOUT = 64  # held-out maps read from the shards (the first ones in shard order)
MAX_CANVAS_FACTOR = 2  # a canvas side is at most this many times the model's size (the page's stated limit)


class AppError(Exception):
    """Something the person can fix; str(e) is shown in the page as it is."""


@dataclass(kw_only=True)
class SampleSettings:
    num_samples: int = 1
    temperature: float = 1.0
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    guidance_scale: float = 1.0  # classifier-free guidance; 1 = off
    seed: int = 0

    def check(self, image_vocab: int) -> SampleSettings:
        """-> self if every value is in range; AppError naming the first that is not."""
        rules = [
            ("num_samples", 1 <= self.num_samples <= MAX_SAMPLES, f"an integer from 1 to {MAX_SAMPLES}"),
            ("temperature", 0 <= self.temperature <= 10, "from 0 (greedy) to 10"),
            ("top_k", 0 <= self.top_k <= image_vocab, f"from 0 (off) to the image vocabulary, {image_vocab}"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1] (1 = off)"),
            ("guidance_scale", 0 <= self.guidance_scale <= 20, "from 0 to 20 (1 = off)"),
            ("seed", 0 <= self.seed < 2**63, "an integer from 0 to 2^63 - 1"),
        ]
        for name, ok, want in rules:
            if not ok:
                raise AppError(f"{name} = {getattr(self, name)} is out of range: use {want}")
        return self

    @classmethod
    def from_request(cls, values: dict, defaults: SampleSettings) -> SampleSettings:
        """Typed settings from the page's JSON; missing keys take `defaults`, unknown keys and bad types raise."""
        if not isinstance(values, dict):
            raise AppError("settings must be a JSON object")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise AppError(f"unknown settings {unknown}; known: {sorted(fields)}")
        out = {}
        for name in fields:
            v = values.get(name, getattr(defaults, name))
            want = int if name in ("num_samples", "top_k", "seed") else float
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise AppError(f"{name} must be a number, got {v!r}")
            if want is int and float(v) != int(v):
                raise AppError(f"{name} must be an integer, got {v!r}")
            out[name] = want(v)
        return cls(**out)


@dataclass
class SampleResult:
    painted: np.ndarray  # (H, W) uint8: the map as received
    understood: np.ndarray  # (H, W) uint8: decoded from z_s
    samples: list[np.ndarray]  # (H, W, 3) uint8 each
    settings: SampleSettings
    timings: dict  # seconds: encode, tokens, decode
    agreement: float  # fraction of labeled painted pixels that the model's map keeps


def _check_export_dir(path: str, role: str) -> None:
    if not path:
        raise AppError(f"no {role} export given: start the app with --gpt DIR (a stage-2 export)")
    if not os.path.isdir(path):
        raise AppError(
            f"{role} export {path!r} does not exist (relative paths are taken from {os.getcwd()}); "
            "train one first (`make demo` writes runs/demo/stage2/export) or pass another directory"
        )
    for name in (WEIGHTS, CONFIG):
        if not os.path.isfile(os.path.join(path, name)):
            raise AppError(f"{path!r} is not an export: {name} is missing (an export holds {WEIGHTS} + {CONFIG})")


class Synthesizer:
    """Loaded models of one stage-2 export; sample() is not thread-safe: the job queue calls it one at a time."""

    def __init__(
        self,
        gpt_dir: str,
        *,
        stage1: str = "",
        shards: str = "",
        device: str | torch.device = "cpu",
        allow_stage1_mismatch: bool = False,
    ):
        self.gpt_dir, self.dev = gpt_dir, torch.device(device)
        _check_export_dir(gpt_dir, "stage-2")
        try:
            cfg, _ = read_export(gpt_dir)
        except Exception as e:  # a damaged or foreign config.json
            raise AppError(f"cannot read the export {gpt_dir!r}: {e}") from None
        if isinstance(cfg, Stage1Config):
            raise AppError(
                f"{gpt_dir!r} is a stage-1 export (the sVQ autoencoder); the page samples with a stage-2 GPT "
                f"export, e.g. runs/demo/stage2/export, which names its stage-1 model itself"
            )
        if not isinstance(cfg, Stage2Config):
            raise AppError(f"{gpt_dir!r} holds a {type(cfg).__name__} export, expected a stage-2 GPT")
        try:
            self.gpt, self.cfg = load_gpt(gpt_dir, self.dev)
        except Exception as e:
            raise AppError(f"cannot load the GPT from {gpt_dir!r}: {e}") from None
        if stage1:
            self.cfg.stage1 = stage1
        _check_export_dir(self.cfg.stage1, "stage-1")
        try:
            self.tokenizer = load_tokenizer(self.cfg, self.dev, allow_stage1_mismatch=allow_stage1_mismatch)
        except Exception as e:
            raise AppError(f"cannot load the stage-1 model {self.cfg.stage1!r} that {gpt_dir!r} names: {e}") from None
        self.semantic_model = self.tokenizer.semantic_model or self.tokenizer.image_model
        m = self.semantic_model.cfg
        self.size, self.grid = self.cfg.data.image_size, self.cfg.model.grid
        self.factor = self.size // self.grid  # pixels per latent
        self.palette: ClassPalette = palette_for(m.num_classes, m.ignore_index)
        s = self.cfg.sample
        self.defaults = SampleSettings(
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, guidance_scale=s.guidance_scale
        )
        self.shards = shards or self.cfg.data.val_shards
        self._heldout: list[tuple[str, np.ndarray, np.ndarray]] | None = None
        self._heldout_lock = threading.Lock()

    # -- what the page shows about the model --------------------------------------------------------------

    def info(self) -> dict:
        g, s1 = self.cfg.model, self.semantic_model.cfg
        return {
            "gpt": self.gpt_dir,
            "stage1": self.cfg.stage1,
            "run": self.cfg.run.name,
            "size": self.size,
            "grid": self.grid,
            # the page's canvas choices: the model's size, and larger / non-square ones up to the limit
            "canvases": [[h, w] for h in self.canvas_sides() for w in self.canvas_sides()],
            "gpt_summary": f"{g.n_layer} layers x {g.n_embd}, image vocab {g.image_vocab}, semantic vocab "
            f"{g.semantic_vocab}, {self.grid}x{self.grid} tokens",
            "stage1_kind": s1.kind,
            "palette": self.palette.to_json(),
            "defaults": dataclasses.asdict(self.defaults),
            "limits": {
                "num_samples": MAX_SAMPLES,
                "top_k": g.image_vocab,
                "canvas_side": MAX_CANVAS_FACTOR * self.size,
            },
            "shards": self.shards,
            "device": str(self.dev),
        }

    # -- held-out maps ------------------------------------------------------------------------------------

    def heldout(self, index: int) -> tuple[int, int, str, np.ndarray, np.ndarray]:
        """-> (index mod count, count, key, label (H, W) uint8, reference image (H, W, 3) uint8)."""
        maps = self._load_heldout()
        i = index % len(maps)
        key, label, image = maps[i]
        return i, len(maps), key, label, image

    def _load_heldout(self):
        with self._heldout_lock:
            if self._heldout is None:
                self._heldout = self._read_heldout()
            return self._heldout

    def _read_heldout(self):
        from svq_fast.data.loader import list_shards, ordered_loader

        if not self.shards:
            raise AppError("this run names no held-out shards (data.val_shards is empty): start the app with --shards")
        try:
            shards = list_shards(self.shards)
        except FileNotFoundError as e:
            raise AppError(f"no held-out maps: {e} (pass --shards DIR)") from None
        loader = ordered_loader(shards, batch_size=1, image_size=self.size)
        out = []
        for batch in loader:
            if bool(batch["pad"][0]):
                continue
            label = batch["label"][0].numpy().astype(np.uint8)
            image = (to_unit(batch["image"][0]) * 255).round().byte().permute(1, 2, 0).numpy()
            out.append((batch["key"][0], label, image))
            if len(out) >= MAX_HELDOUT:
                break
        if not out:
            raise AppError(f"the held-out shards {self.shards!r} hold no readable samples")
        return out

    # -- sampling -----------------------------------------------------------------------------------------

    def canvas_sides(self) -> list[int]:
        """The presets the page offers per side: the model's size and each further multiple up to the limit."""
        return [k * self.size for k in range(1, MAX_CANVAS_FACTOR + 1)]

    def check_map(self, label: np.ndarray, what: str = "the map") -> np.ndarray:
        """-> label (H, W) uint8 if the ids are in the label space and the canvas is one this page samples: each side a
        multiple of the downsampling factor, from the model's size to MAX_CANVAS_FACTOR times it."""
        label = np.asarray(label)
        if label.ndim != 2:
            raise MapError(f"{what} has shape {label.shape}; a map is (height, width)")
        h, w = label.shape
        lo, hi, f = self.size, MAX_CANVAS_FACTOR * self.size, self.factor
        if not (lo <= h <= hi and lo <= w <= hi) or h % f or w % f:
            raise MapError(
                f"{what} is {h}x{w}; this model takes maps from {lo}x{lo} (its training size) up to {hi}x{hi} (the "
                f"page's limit), each side a multiple of {f} (larger maps: recipes/sample.py --maps, no limit)"
            )
        return check_ids(label, self.palette, what)

    @torch.no_grad()
    def semantic_tokens(self, label: np.ndarray) -> torch.Tensor:
        """(H, W) ids -> z_s token ids (1, P) from the map alone."""
        s = torch.from_numpy(label.astype(np.int64))[None].to(self.dev)  # (1, H, W)
        return self.semantic_model.encode_semantic(s).flatten(1)

    @torch.no_grad()
    def understood(self, sem: torch.Tensor, latent: tuple[int, int] | None = None) -> np.ndarray:
        """z_s token ids (1, P) of a latent grid (h, w) (default the model's) -> (H, W) uint8: the semantic decoder's
        map of those tokens."""
        m = self.semantic_model
        z_s = m.quantizer_s.lookup(sem.view(1, *(latent or (self.grid, self.grid))))
        return m.semantic_labels(m.decode_semantic(z_s))[0].to(torch.uint8).cpu().numpy()

    def sample(
        self,
        label: np.ndarray,
        settings: SampleSettings,
        progress: Callable[[str, int, int], None] | None = None,
    ) -> SampleResult:
        """One request: the map (H, W) ids -> settings.num_samples images. progress(stage, done, total)."""
        label = self.check_map(label)
        settings.check(self.cfg.model.image_vocab)
        report = progress or (lambda stage, done, total: None)
        t0 = time.perf_counter()
        report("encoding", 0, 1)
        sem = self.semantic_tokens(label)
        latent = (label.shape[0] // self.factor, label.shape[1] // self.factor)
        understood = self.understood(sem, latent)
        t1 = time.perf_counter()
        gen = torch.Generator(device=self.dev).manual_seed(settings.seed)
        tokens_done = [t1]

        def on_token(done: int, total: int) -> None:
            report("sampling", done, total)
            if done == total:  # the rest of sample_images is the decoder
                tokens_done[0] = time.perf_counter()
                report("decoding", 0, 1)

        images = sample_images(
            self.gpt,
            self.tokenizer,
            sem,
            samples_per_map=settings.num_samples,
            temperature=settings.temperature,
            top_k=settings.top_k,
            top_p=settings.top_p,
            guidance_scale=settings.guidance_scale,
            generator=gen,
            progress=on_token,
            latent_shape=latent,
        )  # (n, 3, H, W)
        t2 = time.perf_counter()
        samples = [a for a in (to_unit(images) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()]
        t3 = time.perf_counter()
        labeled = label != self.palette.ignore
        agreement = float((understood == label)[labeled].mean()) if labeled.any() else float("nan")
        return SampleResult(
            painted=label,
            understood=understood,
            samples=samples,
            settings=settings,
            timings={
                "encode_s": t1 - t0,
                "tokens_s": tokens_done[0] - t1,
                "decode_s": t2 - tokens_done[0],
                "to_uint8_s": t3 - t2,
            },
            agreement=agreement,
        )

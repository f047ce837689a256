"""Evaluate a stage-1 model (reconstruction: the paper's Tables 2 and 3) or a stage-2 GPT (generation: Table 1).

    python recipes/evaluate.py --mode stage1 --stage1 runs/svqgan_tiny/export --out runs/eval/stage1 \\
        --vgg-weights vgg16-397923af.pth --inception-weights pt_inception-2015-12-05-6726825d.pth \\
        --segmenter runs/segmenter
    python recipes/evaluate.py --mode stage2 --gpt runs/gpt_tiny/export --out runs/eval/stage2 \\
        --temperature 1.0 --top-k 0 --top-p 1.0 --guidance 1.0 --seed 0 --segmenter runs/segmenter ...
    accelerate launch --multi_gpu --num_processes 2 recipes/evaluate.py ...   # several ranks (CPU or GPU)

Data handling, rank splitting and the output files: svq_fast/eval/run.py (EvalConfig holds every flag below).

Metrics:
- stage1: SSIM, PSNR (torchmetrics), LPIPS (--vgg-weights), FID vs the real images (--inception-weights),
  semantic reconstruction mIoU and pixel accuracy (argmax of the semantic decoder, per class and mean),
  codebook usage (fraction of codes used, perplexity) of both codebooks; with --segmenter also FSD (Frechet
  distance in the segmenter's feature space) and the segmenter's mIoU on reconstructions and on real images.
- stage2: one sample per held-out map with the given temperature / top-k / top-p / guidance, FID and FSD of the
  samples vs the real images, SSIM / PSNR / LPIPS between each sample and the real image of its map, the
  segmenter's mIoU on the samples (and on the real images, its reference) and the usage of generated codes; and the
  diagnostic table (svq_fast/eval/diagnostics.py): real images, reconstructions, decodes with another scene's z_x
  and with random z_x, GPT samples, null-condition samples and guided samples (--diagnostics-guidance), each
  scored by the segmenter against the map, plus the image-token NLL with and without the condition; and the
  diversity rows (svq_fast/eval/diversity.py): the within-map spread of K draws per map (pixels, segmenter features,
  LPIPS with --vgg-weights) for real re-renders of the map, GPT samples with map-only and with reference z_s and
  decodes of other scenes' and random z_x, as ratios to the re-renders', FSD of the draws to the re-renders, the
  colour distance to the reference, and the z_x probe (decode(z_s of A, z_x of B): does appearance follow z_x?).
Every metrics.json records the protocol (settings.protocol): segmenter sha256, FSD / FID features, resolution,
draws per map, sampling settings, the z_s kind, and the exports' sha256.
Metrics whose network was not given are reported as "n/a (no weights)".
The real images' FID / FSD statistics are cached (--stats-cache) per shard list, network and sample count.

Writes <out>/metrics.json and <out>/metrics.md (the paper's table layout, then the other numbers).
"""

from __future__ import annotations

import argparse
import sys

from svq_fast.eval.run import EvalConfig, EvaluationError, default_stats_cache, run_evaluation
from svq_fast.export import ExportMismatch


def parse_args(argv=None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("stage1", "stage2"), required=True)
    p.add_argument("--stage1", default="", help="stage-1 export (stage1 mode; in stage2 mode overrides the GPT's)")
    p.add_argument("--gpt", default="", help="stage-2 export directory (stage2 mode)")
    p.add_argument("--out", required=True, help="output directory for metrics.json and metrics.md")
    p.add_argument("--shards", default="", help="held-out shards (default: the model config's synthetic val split)")
    p.add_argument("--max-samples", type=int, default=0, help="evaluate the first N samples (0 = all)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--name", default="", help="model name in the tables (default: the export's run name)")
    p.add_argument("--vgg-weights", default="", help="torchvision vgg16-397923af.pth (LPIPS backbone)")
    p.add_argument("--inception-weights", default="", help="pytorch-fid pt_inception-2015-12-05-6726825d.pth")
    p.add_argument("--segmenter", default="", help="segmenter directory from recipes/train_segmenter.py")
    p.add_argument(
        "--stats-cache",
        default=default_stats_cache(),
        help="directory for cached real-image feature statistics ('none' to disable)",
    )
    g = p.add_argument_group("stage2 sampling (defaults: the GPT config's sample section)")
    g.add_argument("--temperature", type=float, default=None)
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--guidance", type=float, default=None)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--condition",
        choices=("reference", "map"),
        default="",
        help="z_s from (real image, map) as in the paper, or from the map alone (encode_semantic; coupled models); "
        "default: what the GPT was trained on (its config's condition)",
    )
    g.add_argument(
        "--diversity-maps",
        type=int,
        default=32,
        help="diversity rows: K draws for each of the first N held-out maps (0: off; svq_fast/eval/diversity.py)",
    )
    g.add_argument("--diversity-draws", type=int, default=4, help="K of the diversity rows (>= 2)")
    g.add_argument(
        "--diagnostics-guidance",
        type=float,
        default=3.0,
        help="guidance scale of the diagnostic table's guided row (0: no diagnostic sampling rows)",
    )
    p.add_argument("--cpu", action="store_true", help="stay on the CPU even when a GPU is present")
    p.add_argument(
        "--allow-stage1-mismatch",
        action="store_true",
        help="stage2: use the stage-1 export even if its weights differ from the ones the GPT was trained on",
    )
    args = p.parse_args(argv)
    if args.mode == "stage1" and not args.stage1:
        p.error("--mode stage1 needs --stage1 EXPORT_DIR")
    if args.mode == "stage2" and not args.gpt:
        p.error("--mode stage2 needs --gpt EXPORT_DIR")
    return EvalConfig(**vars(args))


def main(argv=None) -> int:
    try:
        run_evaluation(parse_args(argv))
    except (EvaluationError, ExportMismatch) as e:  # nothing scored, or an export refused: one line naming the file
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

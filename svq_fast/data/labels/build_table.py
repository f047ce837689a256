"""Build `unified.csv`, the unified label space of ADE20k, Cityscapes and COCO-Stuff, from the three class lists.

    python -m svq_fast.data.labels.build_table            # rewrite unified.csv beside this file, print the count
    python -m svq_fast.data.labels.build_table --check    # exit 1 if unified.csv differs from what this builds

Inputs (copied verbatim from the datasets' published class lists, see /shared/data/README.md of the project):
`ade20k_150.csv` (pixel value = id, 0 = other), `cityscapes_labels.csv` (labelIds 0..33 and the 19 train ids),
`cocostuff_182.csv` (id 1..182; in the PNG maps a pixel holds id - 1 and 255 = unlabeled).

How the merge is decided (every merge is listed by hand below, nothing is matched automatically):
1. Every ADE20k class is a unified class, in ADE20k order: unified id = ADE20k id - 1. ADE20k's classes are
   already disjoint, so none of them merge with each other.
2. A COCO-Stuff class merges into an ADE20k class when they name the same thing:
   a. same name, or the COCO name is in ADE20k's synonym list (couch / sofa, pavement / sidewalk, carpet / rug,
      stone / rock, street sign / signboard, motorcycle / minibike "motorbike", tv / television receiver,
      clothes / apparel, sports ball / ball, ground-other / earth "ground");
   b. COCO's thing + stuff twins of one concept (door + door-stuff, mirror + mirror-stuff, desk + desk-stuff,
      window + window-other, dining table + table) and its "-other" catch-alls (building-other, sky-other,
      plant-other, food-other, water-other);
   c. COCO's material variants of a surface that ADE20k and Cityscapes label with one class whatever the
      material (wall-brick/-concrete/-panel/-stone/-tile/-wood/-other -> wall, floor-* -> floor,
      ceiling-* -> ceiling), and clouds -> sky (ADE20k and Cityscapes label clouds as sky). Without this the
      same pixels would carry different classes depending on the source dataset.
   Not merged (kept as their own classes): hyponyms that are separate objects, e.g. COCO's ten animals vs ADE's
   "animal", wine glass vs "glass", laptop vs "computer", potted plant vs "plant" + "pot", bush vs "plant",
   dirt vs "earth"/"land" (ambiguous between two ADE classes), cupboard vs "cabinet", boat stays with "boat"
   only (ADE also has "ship").
3. The 19 Cityscapes evaluation classes map onto those classes (vegetation -> tree, terrain -> grass,
   traffic sign -> signboard, motorcycle -> minibike, train -> COCO's train); only "rider" is new.
   Cityscapes ids whose train id is 255 (void, parking, rail track, guard rail, bridge, tunnel, polegroup,
   caravan, trailer) map to ignore, as in the Cityscapes benchmark; so do ADE20k 0 and COCO-Stuff 255.
The paper's 243 counts each dataset's "unlabeled" as a class (20 + 150 + 183); here unlabeled is the ignore
value 255, not a class.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys

from svq_fast.data.labels import IGNORE

HERE = os.path.dirname(os.path.abspath(__file__))

# Unified names for ADE20k-based classes where ADE's first synonym is an unusual word for the thing.
RENAME = {
    "windowpane": "window",
    "television receiver": "television",
    "minibike": "motorcycle",
}

# COCO-Stuff name -> ADE20k name (rule 2 of the module docstring). Every key is checked to exist.
COCO_TO_ADE = {
    # 2a: things with the same name or an ADE synonym
    "person": "person",
    "bicycle": "bicycle",
    "car": "car",
    "motorcycle": "minibike",  # ADE: "minibike motorbike"
    "airplane": "airplane",
    "bus": "bus",
    "truck": "truck",
    "boat": "boat",
    "traffic light": "traffic light",
    "street sign": "signboard",  # ADE: "signboard sign"
    "bench": "bench",
    "sports ball": "ball",
    "bottle": "bottle",
    "plate": "plate",
    "chair": "chair",
    "couch": "sofa",  # ADE: "sofa couch lounge"
    "bed": "bed",
    "toilet": "toilet",
    "tv": "television receiver",  # ADE: "... tv tv set ..."
    "microwave": "microwave",
    "oven": "oven",
    "sink": "sink",
    "refrigerator": "refrigerator",
    "book": "book",
    "clock": "clock",
    "vase": "vase",
    # 2a: stuff with the same name or an ADE synonym
    "blanket": "blanket",
    "bridge": "bridge",
    "cabinet": "cabinet",
    "carpet": "rug",  # ADE: "rug carpet carpeting"
    "clothes": "apparel",  # ADE: "apparel wearing apparel dress clothes"
    "counter": "counter",
    "curtain": "curtain",
    "fence": "fence",
    "flower": "flower",
    "grass": "grass",
    "ground-other": "earth",  # ADE: "earth ground"
    "hill": "hill",
    "house": "house",
    "light": "light",  # both: light sources
    "mountain": "mountain",
    "pavement": "sidewalk",  # ADE: "sidewalk pavement"
    "pillow": "pillow",
    "railing": "railing",
    "river": "river",
    "road": "road",
    "rock": "rock",
    "rug": "rug",
    "sand": "sand",
    "sea": "sea",
    "shelf": "shelf",
    "skyscraper": "skyscraper",
    "stairs": "stairs",  # ADE: "stairs steps" (ADE's "stairway" is a separate class)
    "stone": "rock",  # ADE: "rock stone"
    "tent": "tent",
    "towel": "towel",
    "tree": "tree",
    "window-blind": "blind",  # ADE: "blind screen"
    # 2b: COCO thing/stuff twins and "-other" catch-alls
    "door": "door",
    "door-stuff": "door",
    "mirror": "mirror",
    "mirror-stuff": "mirror",
    "desk": "desk",
    "desk-stuff": "desk",
    "window": "windowpane",
    "window-other": "windowpane",
    "dining table": "table",
    "table": "table",
    "building-other": "building",
    "sky-other": "sky",
    "plant-other": "plant",
    "food-other": "food",
    "water-other": "water",
    # 2c: material variants of one surface; clouds are sky in ADE20k and Cityscapes
    "wall-brick": "wall",
    "wall-concrete": "wall",
    "wall-other": "wall",
    "wall-panel": "wall",
    "wall-stone": "wall",
    "wall-tile": "wall",
    "wall-wood": "wall",
    "floor-marble": "floor",
    "floor-other": "floor",
    "floor-stone": "floor",
    "floor-tile": "floor",
    "floor-wood": "floor",
    "ceiling-other": "ceiling",
    "ceiling-tile": "ceiling",
    "clouds": "sky",
}

# Cityscapes evaluation class -> ("ade20k" | "cocostuff" | "new", name) (rule 3).
CITYSCAPES_TO = {
    "road": ("ade20k", "road"),
    "sidewalk": ("ade20k", "sidewalk"),
    "building": ("ade20k", "building"),
    "wall": ("ade20k", "wall"),
    "fence": ("ade20k", "fence"),
    "pole": ("ade20k", "pole"),
    "traffic light": ("ade20k", "traffic light"),
    "traffic sign": ("ade20k", "signboard"),
    "vegetation": ("ade20k", "tree"),
    "terrain": ("ade20k", "grass"),
    "sky": ("ade20k", "sky"),
    "person": ("ade20k", "person"),
    "rider": ("new", "rider"),
    "car": ("ade20k", "car"),
    "truck": ("ade20k", "truck"),
    "bus": ("ade20k", "bus"),
    "train": ("cocostuff", "train"),
    "motorcycle": ("ade20k", "minibike"),
    "bicycle": ("ade20k", "bicycle"),
}

COLUMNS = ["id", "name", "ade20k", "cityscapes", "cityscapes_train", "cocostuff", "merged_from"]


def _read(name: str) -> list[dict]:
    with open(os.path.join(HERE, name), newline="") as f:
        return list(csv.DictReader(f))


def build_rows() -> list[dict]:
    """Rows of the unified table: one per class (ids 0..N-1), then the ignore row (id 255)."""
    ade = _read("ade20k_150.csv")
    coco = _read("cocostuff_182.csv")
    cs = [r for r in _read("cityscapes_labels.csv") if int(r["id"]) >= 0]  # -1 (license plate): instance files only
    ade_by_name = {r["name"]: int(r["id"]) for r in ade}
    coco_by_name = {r["name"]: int(r["id"]) for r in coco}
    for c, a in COCO_TO_ADE.items():
        if c not in coco_by_name or a not in ade_by_name:
            raise KeyError(f"COCO_TO_ADE entry {c!r} -> {a!r}: unknown name")

    rows: list[dict] = []
    for r in ade:  # rule 1: unified id = ADE id - 1
        assert int(r["id"]) == len(rows) + 1, "ADE20k ids must be 1..150 in order"
        rows.append(dict(name=RENAME.get(r["name"], r["name"]), ade=[int(r["id"])], cs=[], cst=[], coco=[], src=[]))
        rows[-1]["src"].append(f"ade20k:{r['name']}")
    for r in coco:  # rule 2: merge into ADE or append
        cid = int(r["id"])
        if r["name"] in COCO_TO_ADE:
            row = rows[ade_by_name[COCO_TO_ADE[r["name"]]] - 1]
        else:
            rows.append(dict(name=r["name"], ade=[], cs=[], cst=[], coco=[], src=[]))
            row = rows[-1]
        row["coco"].append(cid)
        row["src"].append(f"cocostuff:{r['name']}")
    ignore = dict(name="ignore", ade=[0], cs=[], cst=[IGNORE], coco=[0], src=[])
    for r in cs:  # rule 3
        lid, tid = int(r["id"]), int(r["train_id"])
        if tid == IGNORE:
            ignore["cs"].append(lid)
            continue
        where, name = CITYSCAPES_TO[r["name"]]
        if where == "ade20k":
            row = rows[ade_by_name[name] - 1]
        elif where == "cocostuff":
            row = next(x for x in rows if f"cocostuff:{name}" in x["src"])
        else:
            rows.append(dict(name=name, ade=[], cs=[], cst=[], coco=[], src=[]))
            row = rows[-1]
        row["cs"].append(lid)
        row["cst"].append(tid)
        row["src"].append(f"cityscapes:{r['name']}")
    if len({r["name"] for r in rows}) != len(rows):
        raise ValueError("unified class names are not unique")
    if len(rows) >= IGNORE:
        raise ValueError(f"{len(rows)} unified classes do not fit uint8 below the ignore id {IGNORE}")
    out = []
    for i, r in enumerate(rows + [ignore]):
        out.append(
            {
                "id": IGNORE if r is ignore else i,
                "name": r["name"],
                "ade20k": " ".join(map(str, r["ade"])),
                "cityscapes": " ".join(map(str, r["cs"])),
                "cityscapes_train": " ".join(map(str, r["cst"])),
                "cocostuff": " ".join(map(str, r["coco"])),
                "merged_from": "; ".join(r["src"])
                if r is not ignore
                else "ade20k:other; cocostuff:unlabeled; cityscapes: ids with train_id 255",
            }
        )
    return out


def render_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(HERE, "unified.csv"))
    p.add_argument("--check", action="store_true", help="compare with --out instead of writing it")
    args = p.parse_args(argv)
    rows = build_rows()
    text = render_csv(rows)
    n = len(rows) - 1
    merged = sum(len(r["merged_from"].split("; ")) > 1 for r in rows[:-1])
    print(f"unified label space: {n} classes (ids 0..{n - 1}) + ignore {IGNORE}; {merged} merge several sources")
    if args.check:
        with open(args.out) as f:
            same = f.read() == text
        print(f"{args.out}: {'up to date' if same else 'OUT OF DATE, rerun without --check'}")
        return 0 if same else 1
    with open(args.out, "w") as f:
        f.write(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

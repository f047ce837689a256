"""make_shards converters on fixture trees in each real layout, with planted bad files; reject limit; resume."""

import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from svq_fast.data import labels
from svq_fast.data.convert import ConvertSpec, TooManyRejects, convert
from svq_fast.data.loader import list_shards
from svq_fast.data.make_shards import main, write_dataset, write_synthetic
from svq_fast.data.shards import decode_sample
from svq_fast.data.sources import list_items


def _read_all(out):
    """{key: (image, label, meta)} of every sample in the shards under `out`."""
    samples = {}
    for path in list_shards(out):
        with tarfile.open(path) as tar:
            members = {}
            for m in tar.getmembers():
                key, suffix = m.name.split(".", 1)
                members.setdefault(key, {})[suffix] = tar.extractfile(m).read()
        for key, mem in members.items():
            samples[key] = decode_sample(mem, where=key)
    return samples


def _rejects(out):
    with open(os.path.join(out, "rejects.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("dataset", ["ade20k", "cityscapes", "cocostuff", "folder"])
def test_converter_layouts_and_rejects(tmp_path, fx, dataset):
    root, out = str(tmp_path / "raw"), str(tmp_path / "shards")
    tree = fx.build_tree(root, dataset, "val", n_good=7, bad=fx.BAD_KINDS)
    index = write_dataset(
        dataset,
        root,
        out,
        split="val",
        size=16,
        samples_per_shard=3,
        processes=1,
        progress=False,
        max_reject_fraction=0.5,
    )
    assert index["num_samples"] == 7 and index["num_inputs"] == 13 and index["num_rejected"] == 6
    assert sum(s["samples"] for s in index["shards"]) == 7
    # balanced: 13 inputs dealt into ceil(13 / 3) = 5 shards of 2 or 3 inputs each
    assert len(index["shards"]) == 5
    manifests = [json.load(open(os.path.join(out, "manifests", s["name"] + ".json"))) for s in index["shards"]]
    assert sorted(m["inputs"] for m in manifests) == [2, 2, 3, 3, 3]

    rejects = {r["id"]: r for r in _rejects(out)}
    assert len(rejects) == 6
    for kind, fid in tree["bad"].items():
        assert fid in rejects, f"{kind} not rejected"
        assert fx.BAD_REASON[kind] in rejects[fid]["reason"], (kind, rejects[fid]["reason"])
        assert rejects[fid]["file"].endswith(os.path.basename(fx.LAYOUTS[dataset]["image"](root, "val", fid)))

    samples = _read_all(out)
    assert len(samples) == 7 and index["num_samples"] == len(samples)
    assert {m["id"] for _, _, m in samples.values()} == set(tree["good"])
    for image, label, meta in samples.values():
        assert image.shape == (16, 16, 3) and label.shape == (16, 16)
        assert meta["dataset"] == dataset and meta["orig_size"] == [fx.H, fx.W]
        assert ((label < labels.NUM_CLASSES) | (label == 255)).all()
    # the car|sky map: remapped through the LUT, nearest resize, center crop keeps both halves
    first = next(v for v in samples.values() if v[2]["id"] == tree["good"][0])
    car, sky = labels.CLASS_NAMES.index("car"), labels.CLASS_NAMES.index("sky")
    assert first[1][:, 0].tolist() == [car] * 16 and first[1][:, -1].tolist() == [sky] * 16
    hist = {int(k): v for k, v in index["class_histogram"].items()}
    assert sum(hist.values()) == 7 * 16 * 16


def test_too_many_rejects_fails_loudly(tmp_path, fx, capsys):
    root, out = str(tmp_path / "raw"), str(tmp_path / "shards")
    fx.build_tree(root, "cocostuff", "train", n_good=9, bad=("unknown_id", "all_unlabeled"))
    argv = [
        "--dataset",
        "cocostuff",
        "--root",
        root,
        "--split",
        "train",
        "--out",
        out,
        "--size",
        "16",
        "--processes",
        "1",
        "--no-progress",
    ]
    assert main(argv) == 2  # 2 of 11 rejected > 5 %
    err = capsys.readouterr().err
    assert "2 of 11 inputs rejected" in err and os.path.join(out, "rejects.jsonl") in err
    assert not os.path.exists(os.path.join(out, "index.json"))
    assert len(_rejects(out)) == 2
    with pytest.raises(TooManyRejects):
        write_dataset("cocostuff", root, out, size=16, processes=1, progress=False, max_reject_fraction=0.1)
    # a higher limit passes and reuses the shards written by the failed runs
    assert main(argv + ["--max-reject-fraction", "0.2"]) == 0
    assert "1 shards reused" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "index.json")))["num_samples"] == 9


def test_missing_root_is_a_clear_error(tmp_path, capsys):
    assert main(["--dataset", "ade20k", "--root", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "ADE20k images: expected the directory" in capsys.readouterr().err


def _snapshot(out):
    return {
        f: (os.stat(os.path.join(out, f)).st_mtime_ns, open(os.path.join(out, f), "rb").read())
        for f in sorted(os.listdir(out))
        if f.endswith(".tar")
    }


@pytest.mark.timeout(60)
def test_resume_skips_complete_shards_and_matches_a_clean_run(tmp_path, fx, monkeypatch):
    root = str(tmp_path / "raw")
    fx.build_tree(root, "ade20k", "train", n_good=12)
    items = list_items("ade20k", root, "train")
    spec = ConvertSpec(
        dataset="ade20k",
        split="train",
        label_table="ade20k",
        size=16,
        crop="random",
        samples_per_shard=3,
        prefix="ade20k-train",
    )
    clean = str(tmp_path / "clean")
    convert(items, clean, spec, processes=1, progress=False)

    # an interrupted run: the 8th item's load dies; shards finished before it are kept
    out = str(tmp_path / "resumed")
    calls = {"n": 0}
    real_load = type(items[0]).load

    def dying_load(self):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real_load(self)

    monkeypatch.setattr(type(items[0]), "load", dying_load)
    with pytest.raises(KeyboardInterrupt):
        convert(items, out, spec, processes=1, progress=False)
    monkeypatch.setattr(type(items[0]), "load", real_load)
    done = _snapshot(out)
    assert 1 <= len(done) < 4 and not any(f.endswith(".tmp") for f in os.listdir(out))

    index = convert(items, out, spec, processes=1, progress=False)
    assert index["shards_reused"] == len(done)
    after = _snapshot(out)
    for name, (mtime, _) in done.items():
        assert after[name][0] == mtime, f"{name} was rewritten"
    assert {k: v[1] for k, v in after.items()} == {k: v[1] for k, v in _snapshot(clean).items()}

    # a shard deleted later is redone, the others are kept; a changed setting redoes everything
    os.remove(os.path.join(out, "ade20k-train-000001.tar"))
    assert convert(items, out, spec, processes=1, progress=False)["shards_reused"] == 3
    spec2 = ConvertSpec(**{**spec.__dict__, "size": 12})
    assert convert(items, out, spec2, processes=1, progress=False)["shards_reused"] == 0


@pytest.mark.timeout(60)
def test_cli_multiprocess_train_split(tmp_path, fx):
    root, out = str(tmp_path / "raw"), str(tmp_path / "shards")
    fx.build_tree(root, "cityscapes", "train", n_good=10)

    def argv(out, processes):
        return [
            "--dataset",
            "cityscapes",
            "--root",
            root,
            "--split",
            "train",
            "--out",
            out,
            "--size",
            "16",
            "--samples-per-shard",
            "4",
            "--processes",
            str(processes),
            "--no-progress",
        ]

    assert main(argv(out, 2)) == 0
    index = json.load(open(os.path.join(out, "index.json")))
    assert [s["samples"] for s in index["shards"]] == [3, 3, 4]  # balanced: 10 into ceil(10/4) = 3 shards
    samples = _read_all(out)
    assert len(samples) == 10
    # train crops are random but deterministic per file: the same with one process
    out1 = str(tmp_path / "one")
    assert main(argv(out1, 1)) == 0
    s1 = _read_all(out1)
    for k in samples:
        assert np.array_equal(samples[k][1], s1[k][1]) and samples[k][2] == s1[k][2]
    crops = {tuple(m["crop_top_left"]) for _, _, m in samples.values()}
    assert len(crops) > 1, "train crops should vary"


def test_synthetic_writer_and_disjoint_splits(tmp_path):
    tr = write_synthetic(
        str(tmp_path / "tr"), split="train", size=32, num_samples=10, samples_per_shard=4, processes=1, progress=False
    )
    write_synthetic(str(tmp_path / "va"), split="val", size=32, num_samples=5, processes=1, progress=False)
    assert tr["num_samples"] == 10 and [s["samples"] for s in tr["shards"]] == [3, 3, 4]
    assert tr["label_space"] == "synthetic" and tr["num_classes"] == 16
    ktr, kva = set(_read_all(str(tmp_path / "tr"))), set(_read_all(str(tmp_path / "va")))
    assert len(ktr) == 10 and len(kva) == 5 and not ktr & kva
    img, lab, meta = _read_all(str(tmp_path / "tr"))["syn000000003"]
    from svq_fast.data.synthetic import SyntheticSpec, render_scene

    ref_img, ref_lab = render_scene(SyntheticSpec(size=32, seed=0), 3)
    assert np.array_equal(img, ref_img) and np.array_equal(lab, ref_lab)  # PNG: lossless


def test_label_mode_rgb_is_rejected(tmp_path, fx):
    root = str(tmp_path / "raw")
    fx.build_tree(root, "folder", "train", n_good=2)
    bad = os.path.join(root, "labels", "img0001.png")
    Image.fromarray(np.zeros((fx.H, fx.W, 3), np.uint8)).save(bad)
    index = write_dataset(
        "folder", root, str(tmp_path / "o"), size=16, processes=1, progress=False, max_reject_fraction=0.5
    )
    assert index["num_samples"] == 1
    assert "mode RGB" in _rejects(str(tmp_path / "o"))[0]["reason"]

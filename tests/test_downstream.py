"""benchmarks/downstream.py on tiny data: defect-folder loading, the cut-paste baseline builder, the
evaluation selection, a segmenter that learns an obvious defect, and the train command's JSON."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from edgeinspect.data.fewshot import fewshot_split
from edgeinspect.data.mvtec import read_image, resize_image
from edgeinspect.generation.writer import GenerationError, GenerationWriter

try:
    from tests.conftest import load_benchmark, make_mvtec
except ImportError:
    from conftest import load_benchmark, make_mvtec


def _downstream():
    return load_benchmark("downstream")


ds = _downstream()


def square_defects(n: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noisy gray images, each with a bright square at a random place, and the squares' masks."""
    rng = np.random.default_rng(seed)
    images = rng.integers(90, 150, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        y, x = rng.integers(0, size - 12, 2)
        masks[i, y:y + 10, x:x + 10] = True
    images[masks] = 250
    return images, masks


def normals(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(90, 150, (n, size, size, 3), dtype=np.uint8)


def tiny_settings(**kw):
    base = dict(image_size=48, steps=40, batch_size=8, encoder_weights=None, encoder_lr=1e-3, decoder_lr=3e-3,
                decoder_channels=16, seed=0)
    return ds.SegmenterSettings(**{**base, **kw})


# --------------------------------------------------------------------------- defect folders


def write_folder(path, n=3, size=20):
    w = GenerationWriter(path, {"method": "test"}, total=n)
    images, masks = square_defects(n, size, seed=1)
    for i in range(n):
        w.write(i, images[i], masks[i], {"defect_type": "scratch"})
    return images, masks


def test_load_generated_reads_every_indexed_item_and_resizes(tmp_path):
    images, masks = write_folder(tmp_path / "gen", n=3, size=20)
    cv2.imwrite(str(tmp_path / "gen/images/000007.png"), np.zeros((20, 20, 3), np.uint8))  # orphan: not indexed
    d = ds.load_generated(tmp_path / "gen", 20)
    assert d.ids == ["0", "1", "2"] and d.settings == {"method": "test"}
    np.testing.assert_array_equal(d.images, images)
    np.testing.assert_array_equal(d.masks, masks)
    big = ds.load_generated(tmp_path / "gen", 40)
    assert big.images.shape == (3, 40, 40, 3) and big.masks.dtype == bool
    assert big.masks.sum() == 4 * masks.sum()  # nearest neighbour: every mask pixel becomes 2x2


def test_load_generated_errors(tmp_path):
    with pytest.raises(GenerationError, match="no index.json"):
        ds.load_generated(tmp_path / "nothing", 20)
    write_folder(tmp_path / "gen")
    (tmp_path / "gen/images/000001.png").unlink()
    with pytest.raises(GenerationError, match="item 1 points to a missing file images/000001.png"):
        ds.load_generated(tmp_path / "gen", 20)
    GenerationWriter(tmp_path / "empty", {}, total=2)
    with pytest.raises(GenerationError, match="lists no items"):
        ds.load_generated(tmp_path / "empty", 20)


# --------------------------------------------------------------------------- dataset side


@pytest.fixture
def dataset(tmp_path):
    # make_mvtec names test/good and test/scratch files alike (000.png...), as MVTec AD does
    root = make_mvtec(tmp_path / "cat", n_train=4, n_good=3, n_defect=9, size=(40, 56))
    split = fewshot_split(root, adabldm_per_type=2)
    split.save(tmp_path / "split.json")
    return root, split


def test_evaluation_set_selects_by_type_and_name(dataset):
    root, split = dataset
    ev = ds.load_evaluation(root, split, 32)
    assert ev.types.count("good") == 3  # kept although their names are also few-shot names
    assert sorted(n for n, t in zip(ev.names, ev.types) if t == "scratch") == sorted(split.evaluation["scratch"])
    assert ev.images.shape == (9, 32, 32, 3) and ev.masks[np.array(ev.types) == "scratch"].any(axis=(1, 2)).all()


def test_cutpaste_builder_writes_composites_of_the_split_seeds(dataset, tmp_path):
    root, split = dataset
    out = ds.build_cutpaste(root, split, "adabldm", per_type=4, size=32, out=tmp_path / "cp", progress=False)
    d = ds.load_generated(out, 32)
    index = json.loads((out / "index.json").read_text())
    assert len(d.ids) == 4 and index["settings"]["seeds"] == "adabldm"
    for k, item in index["items"].items():
        assert item["defect_type"] == "scratch" and item["seed_file"] in split.adabldm_seeds["scratch"]
        normal = resize_image(read_image(root / "train/good" / item["normal_file"]), 32)
        changed = (d.images[int(k)] != normal).any(axis=2)
        assert not (changed & ~d.masks[int(k)]).any()  # only the pasted pixels differ
        assert d.masks[int(k)].sum() == item["mask_pixels"] == item["placement"]["area"] > 0
    again = ds.build_cutpaste(root, split, "adabldm", per_type=4, size=32, out=tmp_path / "cp2", progress=False)
    for name in ("images/000003.png", "masks/000003.png"):
        assert (out / name).read_bytes() == (again / name).read_bytes()


def test_cutpaste_edge_band_keeps_edge_seeds_on_an_edge(dataset, tmp_path):
    from edgeinspect.data.trimap import frame_contact

    root, split = dataset
    first = sorted(split.adabldm_seeds["scratch"])[0]  # this seed's defect becomes a chip off the top edge
    mask = np.zeros((40, 56), np.uint8)
    mask[0:9, 20:34] = 255
    cv2.imwrite(str(root / "ground_truth/scratch" / f"{Path(first).stem}_mask.png"), mask)
    out = ds.build_cutpaste(root, split, "adabldm", per_type=8, size=32, out=tmp_path / "edge", progress=False,
                            edge_band=3)
    index = json.loads((out / "index.json").read_text())
    assert (index["settings"]["edge_band"], index["settings"]["edge_turns"]) == (3, "half")
    d = ds.load_generated(out, 32)
    for k, item in index["items"].items():
        assert item["placement"]["edge"] == (item["seed_file"] == first)
        if item["placement"]["edge"]:  # on the top or bottom edge, as half turns keep it
            assert set(frame_contact(d.masks[int(k)], 3)) in ({"top"}, {"bottom"})
    assert any(item["placement"]["edge"] for item in index["items"].values())


def test_cutpaste_roundtrip_passes_every_composite_through_the_autoencoder(dataset, tmp_path, monkeypatch):
    root, split = dataset
    seen = []

    def fake(checkpoint, size):  # the autoencoder itself is tested in test_adabldm
        assert (str(checkpoint), size) == ("ckpt", 32)
        return lambda image: seen.append(image.copy()) or 255 - image

    monkeypatch.setattr(ds, "autoencoder_roundtrip", fake)
    plain = ds.load_generated(ds.build_cutpaste(root, split, "adabldm", 4, 32, tmp_path / "a", progress=False), 32)
    out = ds.build_cutpaste(root, split, "adabldm", 4, 32, tmp_path / "b", progress=False, roundtrip="ckpt")
    through = ds.load_generated(out, 32)
    assert len(seen) == 4 and np.array_equal(through.images, 255 - plain.images)
    assert np.array_equal(through.masks, plain.masks)  # the labels stay the composites' exact masks
    assert json.loads((out / "index.json").read_text())["settings"]["roundtrip"] == "ckpt"


# --------------------------------------------------------------------------- the segmenter


def test_segmenter_learns_an_obvious_defect():
    size = 48
    defects, masks = square_defects(24, size, seed=0)
    train = ds.DefectImages(defects, masks, [str(i) for i in range(24)], {})
    model, stats = ds.train_segmenter(normals(24, size, seed=1), train, tiny_settings(), progress=False)
    assert stats["steps"] == 40 and stats["train_seconds"] > 0 and np.isfinite(stats["final_loss"])
    test_defects, test_masks = square_defects(8, size, seed=2)
    ev = ds.EvaluationSet(np.concatenate([normals(8, size, seed=3), test_defects]),
                          np.concatenate([np.zeros((8, size, size), bool), test_masks]),
                          ["good"] * 8 + ["square"] * 8, [str(i) for i in range(16)])
    res = ds.evaluate_segmenter(model, ev, tiny_settings())
    assert res["pixel_auroc"] > 0.9 and res["image_auroc"] > 0.9
    assert res["pixel_ap"] > 0.8  # 4 % of the defect images' pixels are defect: chance AP is 0.02
    assert set(res["per_type"]) == {"square"} and res["per_type"]["square"]["n_images"] == 8
    assert res["n_normal_images"] == 8 and res["n_defect_images_evaluated"] == 8


def test_training_is_deterministic():
    size = 32
    defects, masks = square_defects(6, size, seed=0)
    train = ds.DefectImages(defects, masks, [str(i) for i in range(6)], {})
    s = tiny_settings(image_size=size, steps=3)
    maps = [ds.predict_maps(ds.train_segmenter(normals(6, size, 1), train, s, progress=False)[0], defects[:2])
            for _ in range(2)]
    np.testing.assert_array_equal(maps[0], maps[1])


def test_training_input_errors():
    d = ds.DefectImages(*square_defects(2, 32, 0), ["0", "1"], {})
    with pytest.raises(ValueError, match=r"normals must be uint8 \(N, 48, 48, 3\)"):
        ds.train_segmenter(normals(2, 32, 0), d, tiny_settings(), progress=False)


def test_image_scores_take_the_blurred_maximum():
    maps = np.zeros((2, 16, 16), np.float32)
    maps[0, 3, 3] = 1.0  # a single hot pixel is damped by the blur ...
    maps[1, 6:10, 6:10] = 0.6  # ... a blob is not
    raw = ds.image_scores(maps, 0)
    blurred = ds.image_scores(maps, 1.0)
    assert raw[0] > raw[1] and blurred[1] > blurred[0]


def test_train_command_writes_results_json(dataset, tmp_path):
    root, _ = dataset
    defects = tmp_path / "gen"
    write_folder(defects, n=4, size=32)
    out = tmp_path / "results.json"
    out.write_text(json.dumps({"earlier": {"pixel_ap": 0.5}}))
    ds.main(["train", "--data", str(root), "--split", str(tmp_path / "split.json"), "--defects", str(defects),
             "--name", "squares", "--steps", "2", "--size", "32", "--threads", "1", "--out", str(out), "--quiet"])
    res = json.loads(out.read_text())
    assert res["earlier"] == {"pixel_ap": 0.5}  # merged, not overwritten
    r = res["squares"]
    assert {"pixel_ap", "pixel_auroc", "image_auroc", "per_type", "train_seconds", "steps",
            "n_defect_images"} <= set(r)
    assert r["steps"] == 2 and r["n_defect_images"] == 4 and set(r["per_type"]) == {"scratch"}
    assert 0 <= r["pixel_ap"] <= 1 and 0 <= r["pixel_auroc"] <= 1
    with pytest.raises(SystemExit, match="one --name per --defects"):
        ds.main(["train", "--data", str(root), "--split", str(tmp_path / "split.json"), "--defects", str(defects),
                 "--defects", str(defects), "--name", "a", "--steps", "1", "--out", str(out)])


def test_cutpaste_roundtrip_takes_a_diad_runs_autoencoder(tmp_path):
    """--roundtrip with the base autoencoder's (DiAD) run: the image comes back through that autoencoder."""
    import torch

    from edgeinspect.data.mvtec import tensor_to_image, uint8_to_model
    from edgeinspect.runtime.torch_backend import load_diad
    from tests.test_export import make_tiny_run

    run = make_tiny_run(tmp_path / "run", overrides={"model": {"vae": {"kind": "anchored"}}})
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    got = ds.autoencoder_roundtrip(run, 64)(image)
    _, model = load_diad(run)
    with torch.no_grad():
        x = uint8_to_model(torch.from_numpy(image).permute(2, 0, 1)[None])
        want = tensor_to_image(model.vae.decode(model.vae.encode(x).latent_dist.mean).sample[0])
    assert got.shape == image.shape and np.array_equal(got, want)
    with pytest.raises(ValueError, match="works at 64 px, not --size 128"):
        ds.autoencoder_roundtrip(run, 128)

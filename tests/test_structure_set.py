"""benchmarks/structure_mtd.py: the structure test set (a border strip moved into the middle, a border strip
covered) changes each normal image exactly inside its mask, with normal pixels only, and reads as MVTec."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edgeinspect.data.mvtec import MVTecFolder
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("structure_mtd")


def tile(seed: int, h: int = 40, w: int = 50) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(60, 120, size=(h, w), dtype=np.uint8)
    image[:, 1] = 250  # the tile's edge line, in the left border strip
    return image


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "src"
    for split in ("train/good", "test/good"):
        (root / split).mkdir(parents=True)
    for i in range(3):
        Image.fromarray(tile(i)).save(root / "train" / "good" / f"n{i}.png")
        Image.fromarray(tile(10 + i)).save(root / "test" / "good" / f"t{i}.png")
    return root


def test_each_change_lies_inside_its_mask_and_copies_normal_pixels(bench, source, tmp_path):
    out = tmp_path / "structure"
    counts = bench.build_structure_set(source, out, seed=3)
    assert counts == {"good": 3, "moved": 3, "missing": 3}
    for i in range(3):
        original = np.asarray(Image.open(source / "test" / "good" / f"t{i}.png"))
        assert np.array_equal(np.asarray(Image.open(out / "test" / "good" / f"t{i}.png")), original)
        for kind in ("moved", "missing"):
            changed = np.asarray(Image.open(out / "test" / kind / f"t{i}.png"))
            mask = np.asarray(Image.open(out / "ground_truth" / kind / f"t{i}_mask.png")) > 0
            assert mask.any() and changed.shape == original.shape
            assert np.array_equal(changed[~mask], original[~mask])  # nothing outside the mask moves
            assert (changed[mask] != original[mask]).mean() > 0.5   # and the masked region did change
            # every new pixel is a normal pixel of the same image (a copy, no synthetic texture)
            assert set(np.unique(changed[mask])) <= set(np.unique(original))
        moved_mask = np.asarray(Image.open(out / "ground_truth" / "moved" / f"t{i}_mask.png")) > 0
        cols = np.flatnonzero(moved_mask.any(0))
        assert 0.3 * 50 <= cols[0] and cols[-1] < 0.7 * 50  # pasted in the middle of the tile


def test_the_set_is_seeded_and_reads_as_a_category(bench, source, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    bench.build_structure_set(source, a, seed=1)
    bench.build_structure_set(source, b, seed=1)
    for p in sorted((a / "test").rglob("*.png")):
        assert np.array_equal(np.asarray(Image.open(p)), np.asarray(Image.open(b / p.relative_to(a))))
    split = MVTecFolder(a, "test", 32)
    assert sorted({s.defect_type for s in split.samples}) == ["good", "missing", "moved"]
    _, masks, labels = split.load_all()
    assert int(labels.sum()) == 6 and all(masks[i].any() for i in range(len(labels)) if labels[i])
    assert len(MVTecFolder(a, "train", 32)) == 3  # train/ is the source's training normals


def test_empty_source_is_refused(bench, tmp_path):
    (tmp_path / "src" / "test" / "good").mkdir(parents=True)
    with pytest.raises(SystemExit, match="holds no images"):
        bench.build_structure_set(tmp_path / "src", tmp_path / "out")

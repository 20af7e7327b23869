"""The generation output folder: atomic items, resume without duplicates or gaps, settings guard."""

import json

import cv2
import numpy as np
import pytest

from edgeinspect.generation.writer import GenerationError, GenerationWriter, load_index


def _item(i):
    rng = np.random.default_rng(i)
    return rng.integers(0, 256, (8, 10, 3), dtype=np.uint8), rng.random((8, 10)) > 0.7


def test_items_round_trip(tmp_path):
    w = GenerationWriter(tmp_path, {"seed": 3, "steps": (1, 2)}, total=3)
    img, mask = _item(0)
    w.write(0, img, mask, {"seed": 3})
    assert w.pending() == [1, 2]
    back = cv2.cvtColor(cv2.imread(str(tmp_path / "images/000000.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, img)
    np.testing.assert_array_equal(cv2.imread(str(tmp_path / "masks/000000.png"), 0) > 127, mask)
    index = load_index(tmp_path)
    assert index["items"]["0"]["mask_pixels"] == int(mask.sum())
    assert index["settings"] == {"seed": 3, "steps": [1, 2]}


def test_killed_job_resumes_without_duplicates_or_gaps(tmp_path):
    settings = {"seed": 0}
    w = GenerationWriter(tmp_path, settings, total=5)
    for i in w.pending()[:2]:
        w.write(i, *_item(i), {"i": i})
    # a crash after the PNGs of item 2 but before its index entry: an orphan, not an item
    cv2.imwrite(str(tmp_path / "images/000002.png"), np.zeros((8, 10, 3), np.uint8))
    w2 = GenerationWriter(tmp_path, settings, total=5)
    assert w2.pending() == [2, 3, 4]
    for i in w2.pending():
        w2.write(i, *_item(i), {"i": i})
    items = load_index(tmp_path)["items"]
    assert sorted(map(int, items)) == [0, 1, 2, 3, 4]
    assert [items[str(i)]["i"] for i in range(5)] == list(range(5))
    back = cv2.cvtColor(cv2.imread(str(tmp_path / "images/000002.png")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(back, _item(2)[0])
    assert not list(tmp_path.rglob("*.tmp*"))


def test_other_settings_refused(tmp_path):
    GenerationWriter(tmp_path, {"seed": 0, "steps": 50}, total=3).write(1, *_item(1), {})
    with pytest.raises(GenerationError, match="differs in: steps"):
        GenerationWriter(tmp_path, {"seed": 0, "steps": 20}, total=3)
    with pytest.raises(GenerationError, match="beyond the requested total"):
        GenerationWriter(tmp_path, {"seed": 0, "steps": 50}, total=1)
    w = GenerationWriter(tmp_path, {"seed": 0, "steps": 50}, total=4)  # extending a job is fine
    assert w.pending() == [0, 2, 3]


def test_bad_items_and_missing_files(tmp_path):
    w = GenerationWriter(tmp_path, {}, total=2)
    with pytest.raises(ValueError, match="uint8"):
        w.write(0, np.zeros((8, 10, 3), np.float32), np.zeros((8, 10), bool), {})
    with pytest.raises(ValueError, match="does not match"):
        w.write(0, np.zeros((8, 10, 3), np.uint8), np.zeros((8, 9), bool), {})
    with pytest.raises(IndexError):
        w.write(2, *_item(0), {})
    w.write(1, *_item(1), {})
    (tmp_path / "masks/000001.png").unlink()
    with pytest.raises(GenerationError, match="missing file masks/000001.png"):
        load_index(tmp_path)
    with pytest.raises(GenerationError, match="no index.json"):
        load_index(tmp_path / "nowhere")
    assert json.loads((tmp_path / "index.json").read_text())["total"] == 2

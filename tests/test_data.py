import cv2
import numpy as np
import pytest
import torch

from edgeinspect.data.mvtec import DatasetError, MVTecFolder, image_to_tensor, read_image, tensor_to_image


def test_nonsquare_grayscale_resized_and_masks_stay_binary(synthetic_mvtec):
    ds = MVTecFolder(synthetic_mvtec, "test", image_size=32)
    assert [s.defect_type for s in ds.samples] == ["good", "good", "scratch", "scratch"]
    img, mask = ds.load(2)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    assert (img[..., 0] == img[..., 1]).all()  # gray replicated
    assert mask.dtype == bool and mask.any()
    # 10:20 x 20:34 of a 40x56 image; nearest neighbour samples src floor(i*1.25), floor(j*1.75): rows 8..15, cols 12..19
    rows, cols = np.nonzero(mask)
    assert rows.min() == 8 and rows.max() == 15 and cols.min() == 12 and cols.max() == 19
    images, masks, labels = ds.load_all()
    assert images.shape == (4, 3, 32, 32) and masks.shape == (4, 32, 32)
    assert labels.tolist() == [0, 0, 1, 1] and not masks[:2].any()


def test_missing_mask_is_an_error(synthetic_mvtec):
    (synthetic_mvtec / "ground_truth/scratch/000_mask.png").unlink()
    with pytest.raises(DatasetError, match="no ground-truth mask"):
        MVTecFolder(synthetic_mvtec, "test")


def test_layout_errors(tmp_path, synthetic_mvtec):
    with pytest.raises(DatasetError, match="not an MVTec-layout"):
        MVTecFolder(tmp_path / "missing", "train")
    with pytest.raises(DatasetError, match="no folder"):
        MVTecFolder(synthetic_mvtec, "test", defect_types=["hole"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="cannot read"):
        read_image(bad)


def test_exclude_and_roundtrip(synthetic_mvtec):
    ds = MVTecFolder(synthetic_mvtec, "test", 32, exclude={"000.png"})
    assert len(ds) == 2
    all_test = MVTecFolder(synthetic_mvtec, "test", 32)
    one = all_test.samples[0].path
    by_type = MVTecFolder(synthetic_mvtec, "test", 32, exclude={f"{one.parent.name}/{one.name}"})
    assert len(by_type) == len(all_test) - 1  # "<type>/<name>", as the selection lists write them
    assert one not in [s.path for s in by_type.samples]
    with pytest.raises(DatasetError, match="match no image"):  # a typo must not leave a seen image in
        MVTecFolder(synthetic_mvtec, "test", 32, exclude={"000.png", "good/nope.png"})
    img = read_image(synthetic_mvtec / "train/good/000.png")
    assert np.array_equal(tensor_to_image(image_to_tensor(img)), img)
    assert image_to_tensor(img).min() >= -1 and image_to_tensor(img).max() <= 1


def test_color_and_16bit(tmp_path):
    bgr = np.zeros((8, 8, 3), np.uint8)
    bgr[..., 0] = 200  # blue in BGR
    cv2.imwrite(str(tmp_path / "c.png"), bgr)
    assert read_image(tmp_path / "c.png")[0, 0].tolist() == [0, 0, 200]
    cv2.imwrite(str(tmp_path / "d.png"), np.full((8, 8), 65535, np.uint16))
    assert read_image(tmp_path / "d.png")[0, 0].tolist() == [255, 255, 255]


def test_real_sample_loads(sample_root):
    ds = MVTecFolder(sample_root, "test", 64)
    assert {s.defect_type for s in ds.samples} == {"good", "blowhole", "break", "crack"}
    _, masks, labels = ds.load_all()
    assert all(masks[i].any() for i in range(len(ds)) if labels[i] == 1)
    assert torch.is_tensor(masks)


def test_frame_and_heatmap_keeps_the_frame_and_scales_the_map():
    from edgeinspect.data.visualize import frame_and_heatmap

    frame = np.full((30, 50, 3), 128, np.uint8)  # not square: the picture keeps the frame's aspect
    amap = np.zeros((8, 8), np.float32)
    amap[:4] = 2.0  # top half at the scale's top, bottom half at its bottom
    mask = np.zeros((8, 8), bool)
    mask[6:, 6:] = True
    tile = frame_and_heatmap(frame, amap, 0.0, 1.0, mask, caption="crack: score 0.5")
    assert tile.shape == (18 + 30, 100, 3)
    bar = tile[:18]
    assert (bar == 255).mean() > 0.5 and (bar == 0).any()  # the caption bar: black text on white
    left, right = tile[18:, :50], tile[18:, 50:]
    assert (left == frame).all()
    hot, cold = right[2, 10], right[25, 10]  # jet: red at vmax, blue at vmin
    assert hot[0] > hot[2] and cold[2] > cold[0]
    assert (right[-1, -1] == 255).all()  # the defect's outline in white, at the frame's size

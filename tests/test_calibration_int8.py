"""INT8 calibration data without a GPU: batches, the keyed cache, the pipeline's preprocessing and the
inputs recorded from the pipeline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from edgeinspect.calibration.int8 import (
    CalibrationBatchStream,
    CalibrationCache,
    bundle_image_preprocess,
    calibration_cache_key,
    image_preprocess,
    record_role_inputs,
)

try:
    from tests.test_export import tiny_bundle
except ImportError:
    from test_export import tiny_bundle

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "mtd_sample"




def _items(n: int, shape=(3, 4, 4)) -> list[np.ndarray]:
    return [np.full(shape, i, np.float32) for i in range(n)]


def test_stream_batches_the_last_one_short_or_dropped_and_reset():
    s = CalibrationBatchStream(_items(10), lambda x: x, batch_size=4)
    assert len(s) == 3 and s.input_names == ("image",)
    b1, b2, b3 = s.next_batch(), s.next_batch(), s.next_batch()
    assert s.next_batch() is None
    assert b1["image"].shape == (4, 3, 4, 4) and b1["image"].dtype == np.float32 and b1["image"].flags.c_contiguous
    assert b1["image"][:, 0, 0, 0].tolist() == [0, 1, 2, 3] and b2["image"][:, 0, 0, 0].tolist() == [4, 5, 6, 7]
    assert b3["image"][:, 0, 0, 0].tolist() == [8, 9]  # short: no item repeated
    s.reset()
    assert s.next_batch()["image"][0, 0, 0, 0] == 0
    assert [b["image"][0, 0, 0, 0] for b in s] == [0, 4, 8]  # iterating starts over
    assert s.batch(1)["image"][:, 0, 0, 0].tolist() == [4, 5, 6, 7]
    with pytest.raises(IndexError):
        s.batch(3)
    fixed = CalibrationBatchStream(_items(10), lambda x: x, batch_size=4, drop_last=True)
    assert len(fixed) == 2 and [len(b["image"]) for b in fixed] == [4, 4]
    assert len(CalibrationBatchStream(_items(100), lambda x: x, 4, max_batches=5)) == 5


def test_stream_checks_items():
    with pytest.raises(ValueError, match="fewer than one batch"):
        CalibrationBatchStream(_items(3), lambda x: x, batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="no calibration items"):
        CalibrationBatchStream([], lambda x: x, batch_size=1)
    mixed = CalibrationBatchStream([np.zeros((3, 4, 4)), np.zeros((3, 5, 5))], lambda x: x, batch_size=2)
    with pytest.raises(ValueError, match=r"item 1 .*shape \(3, 5, 5\).*\(3, 4, 4\)"):
        mixed.next_batch()
    two = CalibrationBatchStream(_items(2), lambda x: {"sample": x}, 1, input_names=("sample", "timestep"))
    with pytest.raises(KeyError, match="timestep"):
        two.next_batch()


def test_stream_of_named_inputs():
    s = CalibrationBatchStream(range(6), lambda i: {"sample": np.full((4, 2, 2), i), "timestep": np.float32(10 * i)},
                               batch_size=3, input_names=("sample", "timestep"))
    b = s.next_batch()
    assert b["sample"].shape == (3, 4, 2, 2) and b["timestep"].tolist() == [0.0, 10.0, 20.0]


def test_image_preprocessing_is_the_pipelines():
    from edgeinspect.data.mvtec import image_to_tensor, read_image, resize_image

    p = sorted((SAMPLE / "train" / "good").glob("*.jpg"))[0]
    got = image_preprocess(64)(p)["image"]
    ref = image_to_tensor(resize_image(read_image(p), 64)).numpy()
    assert got.shape == (3, 64, 64) and np.array_equal(got, ref)
    from edgeinspect.runtime.bundle_loading import load_bundle

    b = load_bundle(tiny_bundle()[1])
    assert bundle_image_preprocess(b, "features")(p)["image"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="record_role_inputs"):
        bundle_image_preprocess(b, "unet")


def test_cache_round_trip_and_key(tmp_path):
    path = tmp_path / "engines" / "int8" / "vae_encoder.ranges.json"
    key = calibration_cache_key(onnx_sha256="ab" * 32, images=["a.png", "b.png"], method="entropy")
    assert key != calibration_cache_key(onnx_sha256="ab" * 32, images=["a.png"], method="entropy")
    assert key != calibration_cache_key(onnx_sha256="ab" * 32, images=["a.png", "b.png"], method="minmax")
    c = CalibrationCache(path, key)
    assert c.read() is None
    c.write(b'{"ranges": 1}')
    assert c.read() == b'{"ranges": 1}'
    assert sorted(p.name for p in path.parent.iterdir()) == ["vae_encoder.ranges.json", "vae_encoder.ranges.json.json"]
    assert CalibrationCache(path, "another key").read() is None  # made for another graph/images: recalibrate
    assert CalibrationCache(path).read() is not None  # unkeyed: any result
    path.write_bytes(b'{"ranges": 2}')  # replaced without its key (a write killed in between): not trusted
    assert c.read() is None
    c.write(b'{"ranges": 1}')
    c.meta_path.write_text("{broken")
    assert c.read() is None


def test_unet_inputs_recorded_from_the_pipeline():
    from edgeinspect.data.mvtec import image_to_tensor, read_image, resize_image
    from edgeinspect.runtime.bundle_loading import bundle_pipeline

    pipe = bundle_pipeline(tiny_bundle()[1], intra_op_threads=1)
    frames = torch.stack([image_to_tensor(resize_image(read_image(p), 64))
                          for p in sorted((SAMPLE / "train" / "good").glob("*.jpg"))[:3]])
    before = pipe.nets
    items = record_role_inputs(pipe, "unet", frames, batch_size=2)
    assert pipe.nets is before
    steps = len(pipe.timesteps)
    assert len(items) == 3 * steps
    assert set(items[0]) == {"sample", "timestep", "encoder_hidden_states", "hint"}
    assert items[0]["sample"].shape == (4, 32, 32) and items[0]["timestep"].shape == ()
    stream = CalibrationBatchStream(items, lambda x: x, 2, input_names=tuple(items[0]))
    b = stream.next_batch()
    assert b["sample"].shape == (2, 4, 32, 32) and b["timestep"].shape == (2,)
    assert record_role_inputs(pipe, "unet", frames, max_items=2).__len__() == 2

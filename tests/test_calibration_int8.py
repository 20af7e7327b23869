"""The TensorRT INT8 entropy calibrator without tensorrt: batch feeding, the keyed cache, the calibrator's
behaviour (with host buffers standing in for device ones), the TensorRT subclass against a stand-in
base class, inputs recorded from the pipeline, and the clear errors when tensorrt is missing or too new."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeinspect.calibration.int8 import (
    CalibrationBatchStream,
    CalibrationCache,
    CalibratorLogic,
    bundle_image_preprocess,
    calibration_cache_key,
    entropy_calibrator_class,
    image_preprocess,
    make_entropy_calibrator,
    record_role_inputs,
)
from edgeinspect.export.tensorrt import TensorRTUnavailableError

try:
    from tests.test_export import tiny_bundle
except ImportError:
    from test_export import tiny_bundle

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "mtd_sample"




def host_buffer(a: np.ndarray):
    """Stands in for the CUDA copy: (buffer kept alive, its address)."""
    b = np.array(a, copy=True)
    return b, b.ctypes.data


def _items(n: int, shape=(3, 4, 4)) -> list[np.ndarray]:
    return [np.full(shape, i, np.float32) for i in range(n)]


def test_stream_batches_drop_the_incomplete_last_one_and_reset():
    s = CalibrationBatchStream(_items(10), lambda x: x, batch_size=4)
    assert len(s) == 2 and s.input_names == ("image",)
    b1, b2 = s.next_batch(), s.next_batch()
    assert s.next_batch() is None
    assert b1["image"].shape == (4, 3, 4, 4) and b1["image"].dtype == np.float32 and b1["image"].flags.c_contiguous
    assert b1["image"][:, 0, 0, 0].tolist() == [0, 1, 2, 3] and b2["image"][:, 0, 0, 0].tolist() == [4, 5, 6, 7]
    s.reset()
    assert s.next_batch()["image"][0, 0, 0, 0] == 0
    assert [b["image"][0, 0, 0, 0] for b in s] == [0, 4]  # iterating starts over
    wrap = CalibrationBatchStream(_items(10), lambda x: x, batch_size=4, drop_last=False)
    last = list(wrap)[-1]["image"][:, 0, 0, 0].tolist()
    assert len(wrap) == 3 and last == [8, 9, 0, 1]  # filled up with the first items
    assert len(CalibrationBatchStream(_items(100), lambda x: x, 4, max_batches=5)) == 5


def test_stream_checks_items():
    with pytest.raises(ValueError, match="fewer than one batch"):
        CalibrationBatchStream(_items(3), lambda x: x, batch_size=4)
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
    path = tmp_path / "engines" / "vae_encoder.int8.calib"
    key = calibration_cache_key(onnx_sha256="ab" * 32, images=["a.png", "b.png"], batch=4)
    assert key != calibration_cache_key(onnx_sha256="ab" * 32, images=["a.png"], batch=4)
    c = CalibrationCache(path, key)
    assert c.read() is None
    c.write(b"TRT-8601-EntropyCalibration2\ninput: 3c010a14\n")
    assert c.read() == b"TRT-8601-EntropyCalibration2\ninput: 3c010a14\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["vae_encoder.int8.calib", "vae_encoder.int8.calib.json"]
    assert CalibrationCache(path, "another key").read() is None  # made for another graph/images: recalibrate
    assert CalibrationCache(path).read() is not None  # unkeyed: any table
    c.meta_path.write_text("{broken")
    assert c.read() is None


def test_calibrator_logic_feeds_batches_in_the_order_tensorrt_asks(tmp_path):
    stream = CalibrationBatchStream(range(8), lambda i: {"a": np.full((2,), i), "b": np.full((3,), -i)}, 4,
                                    input_names=("a", "b"))
    cache = CalibrationCache(tmp_path / "t.calib", "k")
    cal = CalibratorLogic(stream, cache, to_device=host_buffer)
    assert cal.get_batch_size() == 4 and cal.read_calibration_cache() is None
    ptrs = cal.get_batch(["b", "a"])
    assert len(ptrs) == 2 and all(isinstance(p, int) for p in ptrs)
    b_buf, a_buf = cal._held
    assert ptrs == [b_buf.ctypes.data, a_buf.ctypes.data]
    assert a_buf[:, 0].tolist() == [0, 1, 2, 3] and b_buf[:, 0].tolist() == [0, -1, -2, -3]
    assert cal.get_batch(["a", "b"]) is not None and cal.get_batch(["a", "b"]) is None
    assert cal.batches_served == 2
    cal.write_calibration_cache(memoryview(b"table"))
    assert cal.read_calibration_cache() == b"table"
    stream.reset()
    with pytest.raises(KeyError, match="'c'"):
        cal.get_batch(["a", "c"])


def test_clear_error_without_tensorrt(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    stream = CalibrationBatchStream(_items(4), lambda x: x, 2)
    with pytest.raises(TensorRTUnavailableError, match="'tensorrt' is not installed.*edgeinspect\\[gpu\\]"):
        make_entropy_calibrator(stream)


def test_tensorrt_without_implicit_int8_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="11.4.0"))
    with pytest.raises(TensorRTUnavailableError, match="removed in TensorRT 11.*Q/DQ|QuantizeLinear"):
        entropy_calibrator_class()


def test_the_calibrator_subclasses_tensorrts_entropy_calibrator(monkeypatch, tmp_path):
    class IInt8EntropyCalibrator2:  # stand-in for the TensorRT 10 base class
        def __init__(self):
            self.base_initialised = True

    fake = types.SimpleNamespace(__version__="10.99.0-test", IInt8EntropyCalibrator2=IInt8EntropyCalibrator2)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    stream = CalibrationBatchStream(_items(4), lambda x: x, 2)
    cal = make_entropy_calibrator(stream, tmp_path / "x.calib", to_device=host_buffer)
    assert isinstance(cal, IInt8EntropyCalibrator2) and isinstance(cal, CalibratorLogic) and cal.base_initialised
    assert type(cal).__name__ == "EntropyCalibrator" and isinstance(cal.cache, CalibrationCache)
    assert cal.get_batch_size() == 2 and len(cal.get_batch(["image"])) == 1
    assert entropy_calibrator_class() is type(cal)  # built once per TensorRT module


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

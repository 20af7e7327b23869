"""The work of `edgeinspect test` and `edgeinspect predict`: a detector from a run folder (torch) or a
bundle (onnxruntime, TensorRT), scored on a test split (metrics, latency, overlays) or on image files."""

from __future__ import annotations

from pathlib import Path

from edgeinspect.evaluation.evaluate import (
    diad_evaluation,
    load_eval_split,
    predict_files,
    use_threads,
    write_evaluation_outputs,
)
from edgeinspect.evaluation.glad import glad_evaluation
from edgeinspect.runtime.run_detector import load_detector
from edgeinspect.runtime.glad import GLADPipeline


def evaluate_detector(model: Path | None, data_root: Path, out_json: Path | None = None, overrides: dict | None = None,
                      exclude_file: Path | None = None, progress: bool = True, overlays_dir: Path | None = None,
                      max_overlays: int = 24, latency_repeats: int = 10, threads: int | None = None, *,
                      bundle: Path | None = None, backend: str = "torch", precision: str = "fp32") -> dict:
    """`edgeinspect test`: the result JSON (also written to `out_json`, with the maps beside it)."""
    detector = load_detector(model, bundle, backend, overrides=overrides, precision=precision,
                             intra_op_threads=threads)
    use_threads(detector.cfg, threads)
    split = load_eval_split(data_root, detector.cfg.model.image_size, exclude_file, detector.pipeline.frame_size)
    glad = isinstance(detector.pipeline, GLADPipeline)
    result, arrays = (glad_evaluation if glad else diad_evaluation)(detector, split, progress, latency_repeats)
    scores, maps = arrays.pop("scores"), arrays.pop("maps")
    write_evaluation_outputs(result, split, scores, maps, out_json, overlays_dir, max_overlays, **arrays)
    return result


GLAD_FIELDS = ("fire_step",)  # per-frame fields of a GLAD result that `predict` reports


def predict_detector(inputs: list[Path], out_dir: Path, model: Path | None = None, *, bundle: Path | None = None,
                     backend: str = "torch", precision: str = "fp32", overrides: dict | None = None,
                     threshold: float | None = None, threads: int | None = None) -> list[dict]:
    """`edgeinspect predict`: score image files with a run (torch) or a bundle; `threshold` is the
    image-score verdict threshold (GLAD: not the ADP one)."""
    detector = load_detector(model, bundle, backend, overrides=overrides, precision=precision,
                             intra_op_threads=threads)
    cfg, pipe = detector.cfg, detector.pipeline
    use_threads(cfg, threads)
    return predict_files(pipe, pipe.frame_size, cfg.inference.batch_size, inputs, out_dir, threshold,
                         fields=GLAD_FIELDS if isinstance(pipe, GLADPipeline) else ())

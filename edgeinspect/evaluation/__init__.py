"""Scoring a detector on data: `edgeinspect test` (a test split: metrics, latency, overlays), `predict`
(image files) and `glad-threshold` (GLAD's ADP settings from normals).

    commands.py  evaluate_detector / predict_detector: a run (torch) or a bundle (onnxruntime, TensorRT)
    evaluate.py  the test-split loop, batch-1 latency, result JSON and overlays; DiAD's result settings
    glad.py      GLAD's additions (ADP firing statistics) and the glad-threshold proposal
    metrics.py   image/pixel AUROC, AP, F1max, PRO
    machine.py   the machine a result was measured on (for benchmark reports)
"""

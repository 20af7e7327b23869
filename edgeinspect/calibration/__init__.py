"""Thresholds and score normalisation for a bundle; the TensorRT INT8 calibrator.

    thresholds.py  the statistics: split-conformal threshold at a target false-reject rate, F1-optimal
                   threshold, (s - median) / (p99 - median) normalisation (no networks involved)
    data.py        held-out normals; labelled defects from an MVTec folder or a JSON index of generated pairs
    calibrate.py   score through the bundle's pipeline (onnxruntime), fit, store with set_calibration
    verdict.py     Verdict: score -> normalised score and OK/NG from a bundle's calibration (for the daemon)
    int8.py        TensorRT INT8 entropy calibrator (tensorrt imported lazily), batch stream and cache
    cli.py         the `edgeinspect calibrate` verb (add_calibrate_parser)

Heavy imports stay inside these modules, so importing the package is cheap.
"""

"""Thresholds and score normalisation for a bundle; explicit INT8 (Q/DQ) graphs for TensorRT.

    thresholds.py  the statistics: split-conformal threshold at a target false-reject rate, F1-optimal
                   threshold, (s - median) / (p99 - median) normalisation (no networks involved)
    data.py        held-out normals; labelled defects from an MVTec folder or a JSON index of generated pairs
    calibrate.py   score through the bundle's pipeline (onnxruntime), fit, store with set_calibration; the
                   verdict it records is read by runtime/postprocess.PostProcessor
    adp.py         GLAD's ADP firing threshold and SAFF weight bounds from normal frames
    int8.py        INT8 calibration data: batch stream, keyed cache, image preprocessing, recorded role inputs
    qdq.py         INT8 Q/DQ graphs with onnxruntime's quantize_static (entropy calibration on the same normals
                   as the thresholds), written into the bundle for TensorRT's strongly typed INT8
    cli.py         the `edgeinspect calibrate` verb (add_calibrate_parser; --int8 runs qdq first)

Heavy imports stay inside these modules, so importing the package is cheap.
"""

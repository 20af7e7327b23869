"""The line in miniature (the README's main job), after `edgeinspect train` has produced RUN:

    export RUN to a bundle -> calibrate it on the sample -> serve it over ZeroMQ ->
    stream the sample's test frames from two simulated cameras -> print each verdict and the
    line's metrics -> write heat-map overlays -> shut the daemon down gracefully.

    python scripts/line_demo.py --run runs/demo --data data/mtd_sample
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from edgeinspect.calibration.calibrate import calibrate_bundle
from edgeinspect.export.bundle import export_bundle
from edgeinspect.evaluation.metrics import auroc
from edgeinspect.runtime.daemon.camera import CameraStreamer, StreamOptions, load_frames
from edgeinspect.runtime.daemon.launch import start_daemon
from edgeinspect.data.visualize import heatmap_overlay, label, write_png


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, required=True, help="trained run folder")
    ap.add_argument("--data", type=Path, required=True, help="MVTec-layout folder whose test/ is streamed")
    ap.add_argument("--cameras", type=int, default=2)
    args = ap.parse_args()

    bundle = args.run / "bundle"
    if not (bundle / "manifest.json").is_file():
        print(f"exporting {args.run} -> {bundle}")
        export_bundle(args.run, bundle, precision=("fp32",))
    # The sample has 8 test normals: too few for a false-reject guarantee, so the demo takes the
    # F1-optimal threshold on the sample's labelled defects (a real line calibrates on >= 100 normals).
    calibrate_bundle(bundle, normals=args.data, defects=args.data, verdict_from="f1", progress=False)

    frames = load_frames(args.data / "test", encoding="file")  # the camera's own JPEG bytes
    truth = {f.name: Path(f.name).parent.name for f in frames}
    overlays = args.run / "line_overlays"
    records: list[dict] = []

    def on_reply(camera: str, frame, reply) -> None:
        if reply.type != "result":
            return
        kind = truth[frame.name]
        records.append({"camera": camera, "frame": frame.name, "type": kind, "score": reply["score"],
                        "verdict": reply.get("verdict"), "latency_ms": reply.latency_ms})
        amap = reply.anomaly_map()
        if amap is not None:
            rgb = np.ascontiguousarray(frame.image[:, :, 2::-1]) if frame.image.ndim == 3 else \
                np.repeat(frame.image[:, :, None], 3, axis=2)
            tile = np.concatenate([rgb, heatmap_overlay(rgb, amap, 0.0, max(float(amap.max()), 1e-6))], axis=1)
            write_png(overlays / f"{kind}_{Path(frame.name).stem}.png",
                      label(tile, f"{kind}: {reply['score']:.4f} {reply.get('verdict')}"))

    daemon = start_daemon(bundle)
    try:
        # each camera streams its share of the frames once
        shares = [frames[i::args.cameras] for i in range(args.cameras)]
        summary = None
        for i, share in enumerate(shares):
            opts = StreamOptions(cameras=1, return_map=True, timeout_ms=60000, camera_prefix=f"cam{i}-")
            summary = CameraStreamer(daemon.endpoint, share, opts, on_reply=on_reply).run()
    finally:
        code = daemon.terminate()
    print(f"\n{'frame':44s} {'type':9s} {'score':>9s}  verdict")
    for r in sorted(records, key=lambda r: r["frame"]):
        print(f"{r['frame']:44s} {r['type']:9s} {r['score']:9.5f}  {r['verdict']}")
    labels = np.array([r["type"] != "good" for r in records], int)
    scores = np.array([r["score"] for r in records])
    ng = np.array([r["verdict"] == "NG" for r in records])
    line = {
        "frames": len(records),
        "image_auroc": auroc(labels, scores) if 0 < labels.sum() < len(labels) else None,
        "accuracy": float((ng == labels.astype(bool)).mean()),
        "defects_caught": f"{int((ng & (labels == 1)).sum())}/{int(labels.sum())}",
        "normals_rejected": f"{int((ng & (labels == 0)).sum())}/{int((labels == 0).sum())}",
        "latency_ms_p50": float(np.median([r["latency_ms"] for r in records])),
        "daemon_exit_code": code,
    }
    print(json.dumps(line, indent=2))
    (args.run / "line_summary.json").write_text(json.dumps({"line": line, "frames": records}, indent=2))
    print(f"overlays: {overlays}/   summary: {args.run / 'line_summary.json'}")
    return 0 if code == 0 and summary is not None else 1


if __name__ == "__main__":
    sys.exit(main())

"""From a trained run to what a line PC runs.

    roles.py     what a method exports: one RoleExport per network role, from a registry
                 (`register_role`), so other methods add their networks without changes here
    diad.py      the DiAD roles: vae_encoder, hint_encoder, unet (SG fused), vae_decoder, features,
                 and the SG network alone (guidance)
    onnx.py      torch -> checked ONNX (named, dynamic axes, external data over 2 GB), parity helpers
    fp16.py      fp16 variants with fragile ops and the timestep path in fp32, checked before writing
    bundle.py    the deployable bundle (export_bundle, set_calibration); loading: runtime/bundle_loading.py
    tensorrt.py  TensorRT profiles, cache keys and engine builds (on the target machine)
    cli.py       the `edgeinspect export` verb (add_export_parser)

Heavy imports stay inside these modules, so importing the package (and the CLI) is cheap.
"""

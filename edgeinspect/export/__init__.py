"""From a trained run to what a line PC runs.

    roles.py     what a method exports: one RoleExport per network role, from a registry
                 (`register_role`), so other methods add their networks without changes here
    diad.py      the DiAD roles: vae_encoder, hint_encoder, unet (SG fused), vae_decoder, features,
                 and the SG network alone (guidance)
    adabldm.py   the AdaBLDM roles, one defect type per bundle: vae_encoder, trimap_encoder, unet (its
                 trimap control fused), vae_decoder, the control branch alone (control); and the
                 bundle's contexts, decoder weights and seed masks
    dualanodiff.py  the DualAnoDiff roles: vae_encoder, dual_unet (or dual_unet_plain without BCM),
                 vae_decoder; and the whole/part/empty contexts
    onnx.py      torch -> checked ONNX (named, dynamic axes, external data over 2 GB), parity helpers
    fp16.py      fp16 variants with fragile ops and the timestep path in fp32, checked before writing
    bundle.py    the deployable bundle (export_bundle, set_calibration); loading: runtime/bundle_loading.py
    tensorrt.py  TensorRT profiles, cache keys and engine builds (on the target machine)
    cli.py       the `edgeinspect export` verb (add_export_parser)

Heavy imports stay inside these modules, so importing the package (and the CLI) is cheap.
"""

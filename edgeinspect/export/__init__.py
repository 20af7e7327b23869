"""From a trained run to what a line PC runs.

    roles.py     what a method exports: one RoleExport per network role, from a registry
                 (`register_role`), so other methods add their networks without changes here
    methods.py   every method's roles registered (imports the method modules), build_role_exports
    examples.py  example and probe inputs, sizes and dynamic-axis names every method's builders share
    diad.py      the DiAD roles: vae_encoder, hint_encoder, unet (SG fused), vae_decoder, features,
                 and the SG network alone (guidance)
    adabldm.py   the AdaBLDM roles, one defect type per bundle: vae_encoder, trimap_encoder, unet (its
                 trimap control fused), vae_decoder, the control branch alone (control); and the
                 bundle's contexts, decoder weights and seed masks
    dualanodiff.py  the DualAnoDiff roles: vae_encoder, dual_unet (or dual_unet_plain without BCM),
                 vae_decoder; and the whole/part/empty contexts
    onnx.py      torch -> checked ONNX (named, dynamic axes, external data over 2 GB), parity helpers
    fp16.py      fp16 variants with fragile ops and the timestep path in fp32, checked before writing
    bundle.py    the deployable bundle (export_bundle); loading and updating it: runtime/bundle_loading.py,
                 runtime/bundle_update.py; TensorRT engines: runtime/tensorrt_engines.py
    cli.py       the `edgeinspect export` verb (add_export_parser)

Optional heavy packages (tensorrt, onnxscript) are imported where they are used.
"""

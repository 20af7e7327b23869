"""Generation jobs: defective images with exact masks, from a trained run (torch) or a bundle.

    adabldm.py, adabldm_bundle.py          AdaBLDM jobs (blended sampling + decoder adaptation)
    dualanodiff.py, dualanodiff_bundle.py  DualAnoDiff jobs (dual-branch sampling)
    writer.py                              the atomic, resumable output folder (PNG pairs + index)
    cli.py                                 the `edgeinspect generate` verb
"""

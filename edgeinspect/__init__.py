"""edgeinspect: diffusion-based visual inspection (DiAD, GLAD, AdaBLDM, DualAnoDiff) from training to the line."""

__version__ = "0.1.0"

"""vdm: video diffusion models (CogVideoX / DiTCtrl family)."""

from vdm.reproducible import pin_mkl

pin_mkl()  # before torch's first matrix product in this process and the ones it starts (vdm/reproducible.py)

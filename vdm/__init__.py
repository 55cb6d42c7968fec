"""vdm: video diffusion models (CogVideoX / DiTCtrl family)."""

"""Diffusion core: discretizations, preconditioning, loss, guidance and samplers (SPEC §3–4)."""

from .denoiser import DiscreteDenoiser, EpsScaling, VideoScaling, VScaling, X0Scaling
from .discretization import Discretization, LegacyDDPM, ZeroSNRDDPM
from .guiders import DynamicCFG, IdentityGuider, VanillaCFG
from .loss import VideoDiffusionLoss
from .samplers import GridSampler, VideoDDIMSampler, VPODEDPMPP2MSampler, VPSDEDPMPP2MSampler
from .timestep_sampling import DiscreteTimestepSampler
from .weighting import EpsWeighting, UnitWeighting, VWeighting

__all__ = [
    "Discretization",
    "ZeroSNRDDPM",
    "LegacyDDPM",
    "DiscreteDenoiser",
    "VideoScaling",
    "VScaling",
    "EpsScaling",
    "X0Scaling",
    "VWeighting",
    "EpsWeighting",
    "UnitWeighting",
    "DiscreteTimestepSampler",
    "VideoDiffusionLoss",
    "IdentityGuider",
    "VanillaCFG",
    "DynamicCFG",
    "GridSampler",
    "VideoDDIMSampler",
    "VPSDEDPMPP2MSampler",
    "VPODEDPMPP2MSampler",
]

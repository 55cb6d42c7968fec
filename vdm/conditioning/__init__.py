"""Conditioning: embedders of batch entries (captions, ...) gathered by a GeneralConditioner."""

from vdm.conditioning.conditioner import GeneralConditioner
from vdm.conditioning.low_resolution import LowResolutionVideo
from vdm.conditioning.text import TextEmbedder

__all__ = ["GeneralConditioner", "LowResolutionVideo", "TextEmbedder"]

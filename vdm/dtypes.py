"""Torch dtypes from config values ("bfloat16", "float16", ...)."""

from __future__ import annotations

import torch

from vdm.errors import BadInput


def resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype), None)
    if not isinstance(resolved, torch.dtype):
        raise BadInput(f"dtype={dtype!r} is not a torch dtype; use e.g. 'float32', 'bfloat16', 'float16'")
    return resolved

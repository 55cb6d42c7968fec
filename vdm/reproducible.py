"""Bit-reproducible CPU maths across processes: MKL's conditional numerical reproducibility.

Without it, MKL may pick a GEMM code path by the memory alignment of its operands (seen on CPUs with
AVX512-BF16 and AMX), and a process that resumed from a checkpoint allocates its tensors differently from
one that trained straight through: the same step then rounds differently (98 of 114 weights a few ulp apart
after a 20-step resume), though each process is deterministic on its own. `MKL_CBWR=AUTO,STRICT` fixes the
code path per CPU and makes it independent of alignment, at no measured cost.

MKL reads `MKL_CBWR` once, at its first call, so the setting must be in the environment before anything
multiplies a matrix. `import vdm` sets it (unless the environment names another mode): every entry point
(train.py, sample.py, `python -m vdm...`), the processes torchrun or accelerate starts for them, any
subprocess they spawn and the test suite import vdm first. `mkl_mode()` reads back what MKL uses.
"""

from __future__ import annotations

import ctypes
import os
import sys
from pathlib import Path

MKL_CBWR = "AUTO,STRICT"
_MKL_CBWR_ALL, _MKL_CBWR_AUTO, _MKL_CBWR_STRICT = ~0, 2, 0x10000


def pin_mkl() -> None:
    """Ask MKL for `MKL_CBWR=AUTO,STRICT` unless the environment already names a mode (inherited by
    every process started from this one)."""
    os.environ.setdefault("MKL_CBWR", MKL_CBWR)


def mkl_mode() -> str | None:
    """The mode MKL computes in ("AUTO,STRICT", "OFF", ...), or None where torch is not built with MKL (or
    not imported). Reading the mode starts MKL: call it after the environment is set."""
    if "torch" not in sys.modules:
        return None
    import torch

    if not torch.backends.mkl.is_available():
        return None
    library = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        get = ctypes.CDLL(str(library)).mkl_serv_cbwr_get
    except (OSError, AttributeError):  # another platform's library, or MKL linked without its service layer
        return None
    get.argtypes, get.restype = [ctypes.c_int], ctypes.c_int
    mode = get(_MKL_CBWR_ALL)
    branch = {1: "OFF", _MKL_CBWR_AUTO: "AUTO", 3: "COMPATIBLE"}.get(mode & 0xFFFF, f"branch {mode & 0xFFFF}")
    return f"{branch},STRICT" if mode & _MKL_CBWR_STRICT else branch


def warn_unless_pinned(log) -> None:
    """A warning when MKL computes without the pinned mode (torch multiplied matrices before vdm was
    imported, or the environment chose another mode): results may then differ in their last bits between a
    resumed process and an uninterrupted one."""
    mode = mkl_mode()
    if mode not in (None, MKL_CBWR):
        log.warning("MKL computes with MKL_CBWR=%s, not %s: a resumed run may differ from an uninterrupted one in "
                    "the last bits; import vdm before torch's first matrix product, or set MKL_CBWR=%s",
                    mode, MKL_CBWR, MKL_CBWR)

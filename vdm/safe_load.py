"""Reading torch pickle files that may come from someone else (run folders are shared, checkpoints are
downloaded) without running code: `torch.load(weights_only=True)` plus, at most, the numpy globals that an RNG
state needs; a file whose pickle names any other Python global is refused in one line naming the file and the
global, and nothing in it runs."""

from __future__ import annotations

import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vdm.errors import BadInput

# `np.random.get_state()` is a tuple holding a uint32 ndarray (SAT's DeepSpeed saves, vdm checkpoints written
# before their RNG state was stored as tensors). These are the globals that ndarray's pickle names:
# - `_reconstruct(subtype, shape, dtype)` is `ndarray.__new__`: it allocates an array, and `subtype` can only be
#   ndarray, the one array class allowed; numpy 1.x writes it as numpy.core.*, numpy 2.x as numpy._core.*.
# - `ndarray`: the subtype above, and the class whose `__setstate__` copies the pickled bytes into the array (an
#   object array takes a list of already-unpickled objects, which pass this same allowlist).
# - `dtype`, called as `dtype("u4", False, True)`, and `UInt32DType`, its class, whose `__setstate__` (byte order,
#   flags) `weights_only` applies only to allowed classes. Neither imports, evaluates or calls anything.
_RECONSTRUCT = np.empty(0).__reduce__()[0]  # whichever of numpy.core / numpy._core the installed numpy has
NUMPY_RNG_GLOBALS = [(_RECONSTRUCT, "numpy.core.multiarray._reconstruct"),
                     (_RECONSTRUCT, "numpy._core.multiarray._reconstruct"),
                     np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def short(e: BaseException) -> str:
    """The last line of an exception's message (torch puts the cause there)."""
    text = str(e).strip()
    return text.splitlines()[-1].strip() if text else type(e).__name__


def load_safely(path: str | Path, accepted: str = "tensors, plain data and numpy RNG state",
                advice: str = "re-create the file where you trust its source", mmap: bool = False) -> Any:
    """`torch.load` of `path` that executes nothing: tensors, plain Python data (dicts, lists, tuples, numbers,
    strings) and numpy RNG state; a refused global, or a file torch cannot read, is a one-line ValueError
    naming the file. `accepted` and `advice` finish the refusal's sentence."""
    path = Path(path)
    try:
        with torch.serialization.safe_globals(NUMPY_RNG_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        # torch names a refused global ("GLOBAL os.system") or a refused class to rebuild ("but got <class '…'>").
        found = re.search(r"GLOBAL (\S+)|but got <class '([^']+)'>", str(e))
        if found is None:
            raise BadInput(f"{path} is not a readable torch checkpoint ({short(e)})") from None
        raise BadInput(f"{path} contains the Python global {found.group(1) or found.group(2)}, which vdm refuses to "
                       f"execute: only {accepted} are accepted. {advice[0].upper()}{advice[1:]}") from None
    except (RuntimeError, KeyError, EOFError, OSError) as e:
        raise BadInput(f"{path} is not a readable torch checkpoint ({type(e).__name__}: {short(e)})") from None

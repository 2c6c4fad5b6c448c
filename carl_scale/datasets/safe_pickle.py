"""Read a pickle someone else wrote without running anything it holds.

``pickle.load`` calls whatever a file names (``os.system`` included). The published CARL code
keeps its dataset lists in pickles, so reading them needs an unpickler that admits only data:

* plain containers and scalars (no globals needed: pickle has opcodes for them), ``set``,
  ``frozenset``, ``bytearray``, ``collections.OrderedDict``, and ``_codecs.encode`` for latin1 only
  (how protocol 2 writes ``bytes``);
* NumPy arrays and scalars (``numpy.core``/``numpy._core`` ``multiarray._reconstruct``,
  ``multiarray.scalar`` and ``numeric._frombuffer``, ``ndarray``, ``dtype``): NumPy restores them from raw bytes;
* torch tensors, which the published lists hold (``frame_label = torch.from_numpy(...)``):
  ``torch._utils._rebuild_tensor[_v2]`` from a storage, and the storage's bytes (a ``torch.save``
  of it, which ``torch.storage._load_from_bytes`` would load with ``weights_only=False``) through
  ``torch.load(weights_only=True)`` instead.

Any other global is refused with :class:`UnsafePickleError`, naming it; nothing after it runs.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any


class UnsafePickleError(ValueError):
    """A pickle that names something other than plain data."""


def _storage_from_bytes(data: bytes):
    import torch

    return torch.load(io.BytesIO(data), weights_only=True)


def _latin1_bytes(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for ``bytes``; other codecs are refused."""
    if not isinstance(text, str) or encoding.lower().replace("-", "") != "latin1":
        raise UnsafePickleError(f"_codecs.encode with {encoding!r}: only latin1 bytes are read")
    return text.encode("latin1")


def _allowed() -> dict[tuple[str, str], Any]:
    import numpy as np
    import torch

    numpy_core = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        numpy_core[(mod, "_reconstruct")] = np.ndarray.__reduce__(np.zeros(0))[0]
        numpy_core[(mod, "scalar")] = np.float64(0).__reduce__()[0]
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol 5's out-of-band form
        numpy_core[(mod, "_frombuffer")] = np.zeros(1).__reduce_ex__(5)[0]
    return {
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): bytearray,
        ("collections", "OrderedDict"): OrderedDict, ("_codecs", "encode"): _latin1_bytes,
        **numpy_core,
        ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    }


class _DataOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.allowed = _allowed()

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # written by Python 2
            module = "builtins"
        if module.startswith("numpy.dtypes") and name.endswith("DType"):  # NumPy 2's dtype classes
            import numpy

            return getattr(numpy.dtypes, name)
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self.source} holds a {module}.{name} object: refused. Only plain containers, NumPy arrays and "
                f"tensors are read from a pickle (anything else could run code when loaded); if you wrote this "
                f"file yourself, store plain data in it")
        return found

    def persistent_load(self, pid):
        raise UnsafePickleError(f"{self.source} uses persistent ids (a torch.save file?), not a plain pickle")


def load_data_pickle(path: str | Path) -> Any:
    """The data a pickle file holds, admitting only what the module docstring lists."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found")
    with open(path, "rb") as f:
        try:
            return _DataOnlyUnpickler(f, str(path)).load()
        except UnsafePickleError:
            raise
        except Exception as exn:  # truncated, not a pickle, ...
            raise ValueError(f"{path} cannot be read as a pickle ({type(exn).__name__}: {exn})") from None

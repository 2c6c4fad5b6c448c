"""Read a pickle someone else wrote without running anything it holds.

``pickle.load`` calls whatever a file names (``os.system`` included). The published CARL code
keeps its dataset lists in pickles, so reading them needs an unpickler that admits only data:

* plain containers and scalars (no globals needed: pickle has opcodes for them), ``set``,
  ``frozenset``, ``bytearray``, ``collections.OrderedDict``, and ``_codecs.encode`` for latin1 only
  (how protocol 2 writes ``bytes``);
* NumPy arrays and scalars (``numpy.core``/``numpy._core`` ``multiarray._reconstruct``,
  ``multiarray.scalar`` and ``numeric._frombuffer``, ``ndarray``, ``dtype``): NumPy restores them
  from raw bytes, so never of a dtype that holds Python objects (those bytes would be read as
  object addresses), and ``ndarray`` only as ``_reconstruct``'s argument, never called;
* torch tensors, which the published lists hold (``frame_label = torch.from_numpy(...)``):
  ``torch._utils._rebuild_tensor[_v2]`` from a storage, and the storage's bytes (a ``torch.save``
  of it, which ``torch.storage._load_from_bytes`` would load with ``weights_only=False``) through
  ``torch.load(weights_only=True)`` instead.

Any other global is refused with :class:`UnsafePickleError`, naming it; nothing after it runs.
BUILD (which sets an object's state or attributes) is refused on anything but NumPy arrays and
dtypes: on one of the functions above it would change how later data loads in this process.
"""

from __future__ import annotations

import io
import math
import pickle
from collections import OrderedDict
from pathlib import Path
from typing import Any


MAX_ITEMSIZE = 1 << 26  # bytes per NumPy item: 64 MiB (a string of 16M characters)


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


def _holds_objects(dtype) -> bool:
    """Whether a NumPy dtype has Python objects anywhere (itself, a field, a sub-array), read from
    its structure: a dtype built from pickled state can carry flags that say otherwise."""
    if dtype.kind == "O":
        return True
    if dtype.subdtype is not None and _holds_objects(dtype.subdtype[0]):
        return True
    return any(_holds_objects(f[0]) for f in (dtype.fields or {}).values())


def _raw_bytes_dtype(dtype, what: str):
    """``dtype`` if its values can be made from raw bytes; one holding objects would read those
    bytes as object addresses (a crash, or worse)."""
    import numpy as np

    if not isinstance(dtype, np.dtype) or _holds_objects(dtype):
        raise UnsafePickleError(f"{what} of dtype {dtype!r} from raw bytes: refused (objects are never read from bytes)")
    return dtype


class _NDArrayType:
    """What a pickle gets for ``numpy.ndarray``: a name for ``_reconstruct`` to receive, never a
    constructor (``ndarray(shape, dtype, buffer)`` would take any bytes as any dtype)."""

    def __call__(self, *args, **kwargs):
        raise UnsafePickleError("numpy.ndarray called directly: refused (arrays are read by _reconstruct only)")


def _allowed() -> dict[tuple[str, str], Any]:
    import numpy as np
    import torch

    ndarray = _NDArrayType()
    reconstruct = np.ndarray.__reduce__(np.zeros(0))[0]
    scalar = np.float64(0).__reduce__()[0]
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]

    def _reconstruct(cls, shape, dtype_char):  # an empty array, its data set by BUILD (checked there)
        if cls is not ndarray:
            raise UnsafePickleError(f"_reconstruct of {cls!r}: only numpy.ndarray is read")
        if not (isinstance(shape, tuple) and all(isinstance(n, int) for n in shape) and 0 in shape):
            # (NumPy writes (0,): the data comes with BUILD; a large shape would allocate from 72 bytes)
            raise UnsafePickleError(f"_reconstruct of shape {shape!r}: only empty arrays are made before their data")
        return reconstruct(np.ndarray, shape, dtype_char)

    def _dtype(spec, align=False, copy=False):  # a type code only ("f8", "V12", "<U5"): fields come with BUILD
        if not isinstance(spec, str) or np.dtype(spec).kind in "Mm":  # (datetime states crash NumPy's BUILD)
            raise UnsafePickleError(f"numpy.dtype({spec!r}): only plain type codes are read")
        if np.dtype(spec).itemsize > MAX_ITEMSIZE:  # (each scalar of it would be that many bytes)
            raise UnsafePickleError(f"numpy.dtype({spec!r}): items of over {MAX_ITEMSIZE} bytes refused")
        return np.dtype(spec, bool(align), bool(copy))

    def _bytearray(data=b"", encoding=None):  # its bytes from the file, never a size to fill
        if isinstance(data, str) and encoding is not None:
            return bytearray(_latin1_bytes(data, encoding))
        if not isinstance(data, (bytes, bytearray)) or encoding is not None:
            raise UnsafePickleError("bytearray of anything but bytes: refused")
        return bytearray(data)

    def _scalar(dtype, data=None):  # its bytes, exactly one item's (NumPy writes them; none would fill one)
        dtype = _raw_bytes_dtype(dtype, "a NumPy scalar")
        if not isinstance(data, bytes) or len(data) != dtype.itemsize:
            raise UnsafePickleError(f"a NumPy scalar of {dtype} from {type(data).__name__} data: refused")
        return scalar(dtype, data)

    def _frombuffer(buf, dtype, shape, order):  # from the file's bytes only (an array's would be a view of it)
        if type(buf) not in (bytes, bytearray):
            raise UnsafePickleError(f"an array viewing a {type(buf).__name__}: refused (only bytes are read)")
        return frombuffer(buf, _raw_bytes_dtype(dtype, "a NumPy array"), shape, order)

    def _tensor(rebuild):
        def rebuilt(storage, offset, size, stride, *rest):  # [requires_grad, backward_hooks, metadata]
            if len(rest) > 1 and rest[1]:
                raise UnsafePickleError("a tensor with backward hooks: refused (hooks are code)")
            ok = (isinstance(storage, torch.storage.TypedStorage) and isinstance(offset, int) and offset >= 0
                  and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)
                  and all(isinstance(n, int) and n >= 0 for n in (*size, *stride)))
            # within its storage (torch would grow a short one: the rest uninitialised memory)
            if not ok or (0 not in size and offset + sum((n - 1) * st for n, st in zip(size, stride))
                          >= storage._size()):  # (its element count; size() warns)
                raise UnsafePickleError(f"a tensor of size {size}, stride {stride} at {offset} beyond its storage: "
                                        f"refused")
            return rebuild(storage, offset, size, stride, *rest)
        return rebuilt

    numpy_core = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        numpy_core[(mod, "_reconstruct")] = _reconstruct
        numpy_core[(mod, "scalar")] = _scalar
    for mod in ("numpy.core.numeric", "numpy._core.numeric"):  # protocol 5's out-of-band form
        numpy_core[(mod, "_frombuffer")] = _frombuffer
    return {
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "bytearray"): _bytearray,
        ("collections", "OrderedDict"): OrderedDict, ("_codecs", "encode"): _latin1_bytes,
        **numpy_core,
        ("numpy", "ndarray"): ndarray, ("numpy", "dtype"): _dtype,
        ("torch._utils", "_rebuild_tensor"): _tensor(torch._utils._rebuild_tensor),
        ("torch._utils", "_rebuild_tensor_v2"): _tensor(torch._utils._rebuild_tensor_v2),
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    }


def _dtype_from_state(target, state, source: str):
    """The dtype a pickled dtype's BUILD describes, made anew: a plain one in its byte order, a
    structured one from names, formats and offsets (NumPy checks them), a sub-array from its base.
    Never a dtype holding objects inside a structure (its bytes could be read as addresses)."""
    import numpy as np

    def refuse(why: str):
        raise UnsafePickleError(f"{source} holds a dtype {why}: refused")

    if not (isinstance(state, tuple) and len(state) in (8, 9) and state[0] in (3, 4)):
        refuse("whose state is not NumPy's")
    _, order, sub, names, fields, size, _, _ = state[:8]
    if order not in ("<", ">", "|", "="):
        refuse(f"of byte order {order!r}")
    if sub is not None:
        if names is not None or not (isinstance(sub, tuple) and len(sub) == 2 and isinstance(sub[0], np.dtype)
                                     and isinstance(sub[1], tuple) and all(isinstance(n, int) for n in sub[1])):
            refuse("with a malformed sub-array")
        built = np.dtype((sub[0], sub[1]))
    elif names is not None:
        if not (isinstance(names, tuple) and isinstance(fields, dict) and set(fields) == set(names)
                and all(isinstance(fields[n], tuple) and len(fields[n]) == 2 and isinstance(fields[n][0], np.dtype)
                        and isinstance(fields[n][1], int) for n in names) and isinstance(size, int)):
            refuse("with malformed fields")
        built = np.dtype({"names": list(names), "formats": [fields[n][0] for n in names],
                          "offsets": [fields[n][1] for n in names], "itemsize": size})
    else:
        built = target if order in ("|", "=") or target.byteorder == "|" else target.newbyteorder(order)
    if (names is not None or sub is not None) and _holds_objects(built):
        refuse("with objects inside a structure")
    return built


class _DataOnlyUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcodes can be overridden; the C one's cannot), admitting
    only the globals of :func:`_allowed` and BUILD only on NumPy arrays and dtypes: BUILD sets
    state or attributes, and on anything else (one of the functions handed out above, say) it
    would change how the rest of this process loads data."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source
        self.allowed = _allowed()
        self._built: set[int] = set()
        self._keep: list = []

    def find_class(self, module: str, name: str):
        if module == "__builtin__":  # written by Python 2
            module = "builtins"
        found = self.allowed.get((module, name))
        if found is None:
            raise UnsafePickleError(
                f"{self.source} holds a {module}.{name} object: refused. Only plain containers, NumPy arrays and "
                f"tensors are read from a pickle (anything else could run code when loaded); if you wrote this "
                f"file yourself, store plain data in it")
        return found

    def load_build(self):
        import numpy as np

        state, target = self.stack.pop(), self.stack[-1]
        if isinstance(target, np.dtype):
            # Never dtype.__setstate__: it changes the dtype in place (arrays already made with it, or
            # NumPy's shared float64, would then read their bytes as other fields, objects included)
            # and crashes on some states. A new dtype is built from the state, with NumPy's checks.
            built = _dtype_from_state(target, state, self.source)
            self.stack[-1] = built
            for key, value in list(self.memo.items()):
                if value is target:
                    self.memo[key] = built
            return
        if type(target) is not np.ndarray:
            raise UnsafePickleError(f"{self.source} sets the state of a {type(target).__name__}: refused (only "
                                    f"NumPy arrays and dtypes are restored that way)")
        if id(target) in self._built:
            raise UnsafePickleError(f"{self.source} sets an array's state twice: refused")
        dtype = state[2] if isinstance(state, tuple) and len(state) == 5 else None
        raw = not isinstance(state[4], list) if dtype is not None else True
        shape = state[1] if dtype is not None else None
        if not isinstance(dtype, np.dtype) or (raw and _holds_objects(dtype)) or (not raw and dtype.kind != "O") \
                or not (isinstance(shape, tuple) and all(isinstance(n, int) and n >= 0 for n in shape)) \
                or (not raw and len(state[4]) != math.prod(shape)):  # (NumPy reads past a short list)
            raise UnsafePickleError(f"{self.source} holds an array whose state is not a NumPy array's: refused")
        self._built.add(id(target))
        self._keep.append(target)  # (its id stays its own while the load runs)
        self.stack.append(state)
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build

    def _dict_only(self, target) -> None:
        if not isinstance(target, dict):  # (an array's items are its memory: NumPy never pickles them so)
            raise UnsafePickleError(f"{self.source} sets items of a {type(target).__name__}: refused")

    def load_setitem(self):
        self._dict_only(self.stack[-3])
        super().load_setitem()

    def load_setitems(self):
        self._dict_only(self.metastack[-1][-1])
        super().load_setitems()

    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems

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
        except UnsafePickleError as exn:
            if str(path) in str(exn):
                raise
            raise UnsafePickleError(f"{path}: {exn}") from None  # (a check that had no file name to give)
        except Exception as exn:  # truncated, not a pickle, ...
            raise ValueError(f"{path} cannot be read as a pickle ({type(exn).__name__}: {exn})") from None

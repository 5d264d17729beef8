"""The tensors of a TorchScript archive, read without running any of it.

``torch.jit.load`` compiles the archive's code and runs it: a class's ``__setstate__`` executes
while the file is still being loaded, so an archive given as weights could write files or worse
before anything is checked (``torch.load(weights_only=True)`` refuses TorchScript archives
outright). OpenAI's CLIP release is such an archive, so it is read here the way
``weights_only`` reads a pickle: ``data.pkl`` goes through an unpickler that only rebuilds
tensors (any other global is refused), every TorchScript class becomes an inert record of its
attributes, and each tensor's bytes come straight from ``data/<key>``. The module tree of
records gives ``state_dict()``'s names: each class's parameters and buffers as declared in the
archive's ``code/`` (read as text, never compiled). An archive whose classes restore their own
state (``__setstate__``) is refused: its tensors only mean something after that code ran.
"""

from __future__ import annotations

import collections
import pickle
import re
import zipfile
from pathlib import Path

import torch

from loftup.storage.errors import WeightsError

__all__ = ["is_torchscript", "read_torchscript"]

_CLASS = re.compile(r"^class (\w+)\(\w+\):\n((?:  .*\n|\n)*)", re.M)
_NAMES = re.compile(r'"([^"]+)"')


def is_torchscript(path: str | Path) -> bool:
    """A zip holding ``constants.pkl`` (how torch itself tells TorchScript from a saved state)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in zf.namelist())


class _Record:
    """A TorchScript object as data: the attributes its pickle holds, nothing it would run."""

    qualname = ""

    def __setstate__(self, state):
        self.__dict__["_state"] = state


class _StorageKind:
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("a tensor without a storage record")
    t = torch.empty((0,), dtype=storage.dtype)
    return t.set_(storage._untyped_storage, int(offset), tuple(size), tuple(stride))


def _identity(value, *_):
    return value


# The storage types a tensor record may name (torch's legacy names) and their element types.
_STORAGES = {
    "UntypedStorage": torch.uint8,
    "ByteStorage": torch.uint8,
    "CharStorage": torch.int8,
    "ShortStorage": torch.int16,
    "IntStorage": torch.int32,
    "LongStorage": torch.int64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}

# Every global a weights-only TorchScript pickle may name, and what it becomes here.
_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_floatlist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str):
        import io

        super().__init__(io.BytesIO(data))
        self.zf, self.prefix = zf, prefix
        self.classes: dict[str, type] = {}
        self.storages: dict[str, torch.storage.TypedStorage] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            if key not in self.classes:
                self.classes[key] = type(name, (_Record,), {"qualname": key})
            return self.classes[key]
        if module == "torch" and name in _STORAGES:
            return _StorageKind(_STORAGES[name])
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"the archive names {module}.{name}, which weights-only reading does not run")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unknown persistent record {pid!r:.80}")
        _, kind, key, _location, numel = pid
        if not isinstance(kind, _StorageKind) or not isinstance(key, str) or type(numel) is not int:
            raise pickle.UnpicklingError(f"malformed storage record {pid!r:.80}")
        if key not in self.storages:
            try:
                raw = self.zf.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise pickle.UnpicklingError(f"no data/{key} record in the archive") from None
            want = numel * torch.empty((), dtype=kind.dtype).element_size()
            if len(raw) != want:
                raise pickle.UnpicklingError(f"data/{key} holds {len(raw)} bytes, its record says {want}")
            untyped = torch.UntypedStorage.from_buffer(raw, dtype=torch.uint8) if raw else torch.UntypedStorage(0)
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=untyped, dtype=kind.dtype, _internal=True)
        return self.storages[key]


def _declared(zf: zipfile.ZipFile, prefix: str, qualname: str) -> set[str] | None:
    """Names of ``__parameters__`` and ``__buffers__`` of a class in the archive's code, None when
    the class is not found; a WeightsError when it restores its own state."""
    module, _, name = qualname.rpartition(".")
    try:
        code = zf.read(f"{prefix}code/{module.replace('.', '/')}.py").decode()
    except (KeyError, UnicodeDecodeError):
        return None
    for m in _CLASS.finditer(code + "\n"):
        if m.group(1) != name:
            continue
        body = m.group(2)
        if re.search(r"^  def __setstate__\(", body, re.M):
            raise WeightsError(f"class {name} restores its own state with code (__setstate__)")
        names = set()
        for line in body.splitlines():
            if line.startswith(("  __parameters__ = ", "  __buffers__ = ")):
                names.update(_NAMES.findall(line))
        return names
    return None


def _collect(obj, zf, prefix, out: dict, path: str, seen: set) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    state = obj.__dict__.get("_state")
    if state is None:
        return
    if not isinstance(state, dict):
        raise WeightsError(f"class {obj.qualname.rpartition('.')[2]} restores its own state with code (__setstate__)")
    declared = _declared(zf, prefix, obj.qualname)
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            if declared is None or key in declared:
                out[path + key] = value
        elif isinstance(value, _Record):
            _collect(value, zf, prefix, out, f"{path}{key}.", seen)


def read_torchscript(path: str | Path) -> dict[str, torch.Tensor]:
    """``state_dict()`` of the TorchScript module archived at ``path``, on the CPU, with no code
    of the archive run. A WeightsError (one line) when it cannot be read that way."""
    p = Path(path)
    with zipfile.ZipFile(p) as zf:
        names = [n for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
        if len(names) != 1:
            raise WeightsError(f"cannot read weights {p}: not a TorchScript module archive (no single data.pkl)")
        prefix = names[0][: -len("data.pkl")]
        order = f"{prefix}byteorder"
        if order in zf.namelist() and zf.read(order).strip() not in (b"little", b""):
            raise WeightsError(f"cannot read weights {p}: big-endian TorchScript archives are not supported")
        unpickler = _Unpickler(zf.read(names[0]), zf, prefix)
        try:
            root = unpickler.load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, RuntimeError) as exc:
            raise WeightsError(f"cannot read weights {p}: {exc}") from None
        if not isinstance(root, _Record):
            raise WeightsError(f"cannot read weights {p}: the archive holds no TorchScript module")
        state: dict[str, torch.Tensor] = {}
        try:
            _collect(root, zf, prefix, state, "", set())
        except WeightsError as exc:
            raise WeightsError(
                f"refusing TorchScript archive {p}: {exc}, which would run at load; "
                f"export its state_dict to .safetensors instead"
            ) from None
    return {k: v.detach() for k, v in state.items()}

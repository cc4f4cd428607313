"""Reader for PyTorch `torch.save` zip checkpoints (`.pth` / `.pt`), without importing torch.

A torch.save file is an uncompressed (ZIP_STORED) zip archive:

    <archive>/data.pkl          the pickled object (protocol 2); tensors are pickled as
                                torch._utils._rebuild_tensor_v2(storage, storage_offset, size,
                                stride, requires_grad, backward_hooks), and each storage as a
                                persistent id ('storage', torch.<Type>Storage, key, location, numel)
    <archive>/data/<key>        the raw little-endian bytes of storage <key>
    <archive>/byteorder, version, .format_version, .storage_alignment, .data/serialization_id

`data.pkl` is read by a restricted unpickler: `find_class` hands out only inert stand-ins for
the handful of globals a state dict of tensors needs, and refuses every other global before
anything runs, so a malicious checkpoint cannot execute code. Tensor bytes are never read at
open: each SourceTensor's `load()` returns a zero-copy slice of the memory-mapped file when the
tensor is contiguous, or gathers a strided view into C order otherwise.
"""
from __future__ import annotations

import collections
import io
import mmap
import os
import pickle
import pickletools
import struct
import zipfile
import zlib

import numpy as np

from formats.errors import BadInput
from formats.quants import QuantType, by_name

from .base import Checkpoint, SourceTensor

ZIP_LOCAL = struct.Struct("<4sHHHHHIIIHH")  # signature .. name length, extra length (30 bytes)
ZIP_LOCAL_MAGIC = b"PK\x03\x04"
MAX_EXPANDED_BYTES = 1 << 30  # cap on stride-0 views bigger than their storage


# --- inert stand-ins for the allowed pickle globals -----------------------------------------

class _StorageType:
    """Stands in for `torch.FloatStorage` & co. Not callable: only used as a marker."""

    __slots__ = ("type_name", "dtype", "itemsize", "qtype")

    def __init__(self, type_name: str, dtype: str, itemsize: int, qtype: str | None):
        self.type_name = type_name
        self.dtype = dtype
        self.itemsize = itemsize
        self.qtype = qtype

    def __repr__(self):
        return f"torch.{self.type_name}"

    def __setstate__(self, state):
        raise TypeError(f"BUILD applied to {self!r}")


class _Marker:
    """Stands in for a torch dtype or class object (torch.float32, torch.Tensor, ...)."""

    __slots__ = ("qualname",)

    def __init__(self, qualname: str):
        self.qualname = qualname

    def __repr__(self):
        return self.qualname

    def __setstate__(self, state):
        raise TypeError(f"BUILD applied to {self.qualname}")


_STORAGE_TYPES = {t.type_name: t for t in (
    _StorageType("FloatStorage", "float32", 4, "F32"),
    _StorageType("HalfStorage", "float16", 2, "F16"),
    _StorageType("BFloat16Storage", "bfloat16", 2, "BF16"),
    # Known, so the error can name the dtype; tensors of these types are refused.
    _StorageType("DoubleStorage", "float64", 8, None),
    _StorageType("LongStorage", "int64", 8, None),
    _StorageType("IntStorage", "int32", 4, None),
    _StorageType("ShortStorage", "int16", 2, None),
    _StorageType("CharStorage", "int8", 1, None),
    _StorageType("ByteStorage", "uint8", 1, None),
    _StorageType("BoolStorage", "bool", 1, None),
    _StorageType("ComplexFloatStorage", "complex64", 8, None),
    _StorageType("ComplexDoubleStorage", "complex128", 16, None),
    _StorageType("UntypedStorage", "untyped bytes", 1, None),
)}

_MARKERS = {("torch", n): _Marker(f"torch.{n}") for n in ("float32", "float16", "bfloat16",
                                                           "Tensor")}
_MARKERS[("torch.nn.parameter", "Parameter")] = _Marker("torch.nn.parameter.Parameter")
_MARKERS[("torch.nn", "Parameter")] = _Marker("torch.nn.Parameter")


class _Storage:
    """A lazy typed storage: the zip member holding it and how to read its elements."""

    __slots__ = ("stype", "key", "location", "numel")

    def __init__(self, stype: _StorageType, key: str, location, numel: int):
        self.stype = stype
        self.key = key
        self.location = location
        self.numel = numel

    def __setstate__(self, state):
        raise TypeError("BUILD applied to a storage")


class _Tensor:
    """What `_rebuild_tensor_v2` returns here: the view description, no data."""

    __slots__ = ("storage", "storage_offset", "size", "stride")

    def __init__(self, storage, storage_offset, size, stride):
        self.storage = storage
        self.storage_offset = storage_offset
        self.size = size
        self.stride = stride

    def __setstate__(self, state):
        raise TypeError("BUILD applied to a tensor")


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks, state=None):
    if not isinstance(data, _Tensor):
        raise TypeError("_rebuild_parameter applied to something that is not a tensor")
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if not any(func is f for f in _TENSOR_BUILDERS) or func.fn is _rebuild_from_type_v2 \
            or not isinstance(new_type, _Marker) or not isinstance(args, tuple):
        raise TypeError("_rebuild_from_type_v2 with unexpected arguments")
    return func(*args)


class _Callable:
    """One of our stand-in functions as handed to the unpickler (BUILD cannot alter it)."""

    __slots__ = ("qualname", "fn")

    def __init__(self, qualname: str, fn):
        self.qualname = qualname
        self.fn = fn

    def __call__(self, *args):
        return self.fn(*args)

    def __setstate__(self, state):
        raise TypeError(f"BUILD applied to {self.qualname}")

    def __repr__(self):
        return self.qualname


_FUNCTIONS = {(m, n): _Callable(f"{m}.{n}", fn) for (m, n), fn in {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
}.items()}
# Builds a plain ordered dict from values the unpickler made itself: harmless (and, being a
# built-in type, immune to BUILD).
_FUNCTIONS[("collections", "OrderedDict")] = collections.OrderedDict
_TENSOR_BUILDERS = tuple(f for (m, _), f in _FUNCTIONS.items() if m != "collections")


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles `data.pkl` with an allow-list of globals; everything else is refused."""

    def __init__(self, data: bytes, path: str, member: str):
        super().__init__(io.BytesIO(data))
        self._path = path
        self._member = member

    def find_class(self, module, name):
        key = (module, name)
        if key in _FUNCTIONS:
            return _FUNCTIONS[key]
        if key in _MARKERS:
            return _MARKERS[key]
        if module in ("torch", "torch.storage") and name in _STORAGE_TYPES:
            return _STORAGE_TYPES[name]
        raise BadInput(f"forbidden pickle global '{module}.{name}' in {self._member}: only state "
                       "dicts of tensors can be read (refused before running anything)",
                       path=self._path)

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise BadInput(f"unsupported persistent id {_short(pid)} in {self._member}",
                           path=self._path)
        _, stype, key, location, numel = pid
        if not isinstance(stype, _StorageType):
            raise BadInput(f"persistent id names storage type {_short(stype)}, not a torch "
                           f"storage type, in {self._member}", path=self._path)
        if not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise BadInput(f"malformed storage persistent id {_short(pid)} in {self._member}",
                           path=self._path)
        return _Storage(stype, key, location, numel)


def _short(obj, limit: int = 80) -> str:
    text = " ".join(repr(obj).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# --- the checkpoint ---------------------------------------------------------------------------

class PytorchCheckpoint(Checkpoint):
    format_name = "pytorch"

    def __init__(self, path):
        super().__init__(path)
        try:
            size = os.path.getsize(path)
        except OSError as e:
            raise BadInput(f"cannot read: {e.strerror or e}", path=path) from None
        self._size = size
        with open(path, "rb") as f:
            head = f.read(512)
            if len(head) < 4:
                raise BadInput(f"file is {size} bytes: too short to be a PyTorch checkpoint",
                               path=path, offset=0)
            if not head.startswith(ZIP_LOCAL_MAGIC):
                raise BadInput(self._not_zip_reason(head), path=path, offset=0)
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._buf = memoryview(self._mm)
            f.seek(0)
            try:
                zf = zipfile.ZipFile(f)
            except (zipfile.BadZipFile, zipfile.LargeZipFile, NotImplementedError, ValueError,
                    OSError, EOFError) as e:
                raise BadInput(f"not a readable zip archive, or truncated ({_short(e)})",
                               path=path) from None
            with zf:
                self._members = {i.filename: i for i in zf.infolist()}
                prefix = self._find_archive_prefix()
                self._prefix = prefix
                data = self._read_small(zf, f"{prefix}/data.pkl")
                self.info = dict(archive=prefix)
                for key, member in (("byteorder", "byteorder"), ("version", "version"),
                                    ("format_version", ".format_version"),
                                    ("storage_alignment", ".storage_alignment")):
                    name = f"{prefix}/{member}"
                    if name in self._members:
                        try:
                            self.info[key] = self._read_small(zf, name).decode("ascii").strip()
                        except UnicodeDecodeError:
                            raise BadInput(f"member {name!r} is not ASCII", path=path) from None
        if self.info.get("byteorder", "little") != "little":
            raise BadInput(f"checkpoint was saved with byteorder {self.info['byteorder']!r}; "
                           "only little-endian checkpoints are supported", path=path)
        obj = self._unpickle(data, f"{prefix}/data.pkl")
        self._build(obj)

    # zip structure ---------------------------------------------------------------------------

    @staticmethod
    def _not_zip_reason(head: bytes) -> str:
        if head[:1] == b"\x80":
            return ("legacy (pre-zip) PyTorch pickle; re-save it with a torch newer than 1.6 "
                    "(torch.save without _use_new_zipfile_serialization=False)")
        if len(head) >= 262 and head[257:262] == b"ustar":
            return "legacy tar-format PyTorch checkpoint; re-save it with a torch newer than 1.6"
        return "not a PyTorch zip checkpoint (no zip local-file signature at byte 0)"

    def _find_archive_prefix(self) -> str:
        names = list(self._members)
        if not names:
            raise BadInput("zip archive is empty: not a torch.save checkpoint", path=self.path)
        first = names[0].split("/", 1)[0]
        if f"{first}/data.pkl" in self._members:
            return first
        candidates = [n[:-len("/data.pkl")] for n in names
                      if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(candidates) == 1:
            return candidates[0]
        if len(candidates) > 1:
            raise BadInput(f"zip holds {len(candidates)} data.pkl records "
                           f"({', '.join(candidates[:3])}...): ambiguous", path=self.path)
        if any(n.split("/", 1)[-1] in ("constants.pkl",) or "/code/" in n for n in names):
            raise BadInput("TorchScript archive (torch.jit.save), not a state dict; save "
                           "model.state_dict() with torch.save instead", path=self.path)
        raise BadInput("zip has no <archive>/data.pkl member: not a torch.save checkpoint",
                       path=self.path)

    def _read_small(self, zf: zipfile.ZipFile, name: str) -> bytes:
        info = self._members[name]
        if info.file_size > 1 << 31:
            raise BadInput(f"member {name!r} is implausibly large ({info.file_size} bytes)",
                           path=self.path, offset=info.header_offset)
        try:
            return zf.read(info)
        except (zipfile.BadZipFile, NotImplementedError, RuntimeError, ValueError, OSError,
                EOFError, zlib.error) as e:
            raise BadInput(f"cannot read zip member {name!r}: {_short(e)}", path=self.path,
                           offset=info.header_offset) from None

    def _member_data(self, name: str, tensor: str) -> tuple[int, int]:
        """(absolute data offset, byte length) of an uncompressed member, validated."""
        info = self._members[name]
        hdr = info.header_offset
        if hdr + ZIP_LOCAL.size > self._size:
            raise BadInput(f"zip member {name!r}: local header past end of file (truncated)",
                           path=self.path, tensor=tensor, offset=hdr)
        sig, _ver, flags, method, _t, _d, _crc, _cs, _us, nlen, elen = \
            ZIP_LOCAL.unpack_from(self._buf, hdr)
        if sig != ZIP_LOCAL_MAGIC:
            raise BadInput(f"zip member {name!r}: bad local header signature",
                           path=self.path, tensor=tensor, offset=hdr)
        if flags & 1:
            raise BadInput(f"zip member {name!r} is encrypted", path=self.path, tensor=tensor,
                           offset=hdr)
        if method != zipfile.ZIP_STORED or info.compress_type != zipfile.ZIP_STORED:
            raise BadInput(f"zip member {name!r} is compressed (method {method}); torch.save "
                           "writes storages uncompressed (ZIP_STORED) and so must any "
                           "re-packer", path=self.path, tensor=tensor, offset=hdr)
        start = hdr + ZIP_LOCAL.size + nlen + elen
        if info.compress_size != info.file_size or start + info.file_size > self._size:
            raise BadInput(f"zip member {name!r} needs {info.file_size} bytes at offset "
                           f"{start}, file is {self._size} bytes (truncated)",
                           path=self.path, tensor=tensor, offset=start)
        return start, info.file_size

    # pickle ----------------------------------------------------------------------------------

    def _prescan(self, data: bytes, member: str) -> None:
        """Walk the opcodes before unpickling: refuse what could exhaust memory or time.

        The C unpickler sizes its memo table by the largest index a PUT names, so a crafted
        `LONG_BINPUT 2**31` would allocate gigabytes before anything else happens.
        """
        limit = len(data)
        try:
            for op, arg, pos in pickletools.genops(data):
                if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and not 0 <= int(arg) <= limit:
                    raise BadInput(f"{member}: memo index {arg} at pickle byte {pos} is "
                                   "implausible for a pickle this size", path=self.path)
                if op.name in ("NEXT_BUFFER", "READONLY_BUFFER"):
                    raise BadInput(f"{member}: out-of-band pickle buffers are not supported",
                                   path=self.path)
        except BadInput:
            raise
        except Exception as e:  # noqa: BLE001 - pickletools reports bad data as ValueError &c.
            raise BadInput(f"malformed {member}: {_short(e, 120)}", path=self.path) from None

    def _unpickle(self, data: bytes, member: str):
        self._prescan(data, member)
        try:
            return _RestrictedUnpickler(data, self.path, member).load()
        except BadInput as e:
            if e.path is None:
                raise BadInput(e.message, path=self.path, tensor=e.tensor,
                               offset=e.offset) from None
            raise
        except RecursionError:
            raise BadInput(f"{member} nests too deeply", path=self.path) from None
        except MemoryError:
            raise BadInput(f"{member} asks for more memory than available", path=self.path) \
                from None
        except Exception as e:  # noqa: BLE001 - only our stand-ins ran; any failure = bad file
            raise BadInput(f"malformed {member}: {type(e).__name__}: {_short(e, 120)}",
                           path=self.path) from None

    def _build(self, obj) -> None:
        if not isinstance(obj, dict):
            kind = "a tensor" if isinstance(obj, _Tensor) else f"a {type(obj).__name__}"
            raise BadInput(f"data.pkl holds {kind}, expected a dict of tensors (a state dict)",
                           path=self.path)
        state = obj
        if not any(isinstance(v, _Tensor) for v in obj.values()):
            for key in ("state_dict", "model"):
                inner = obj.get(key)
                if isinstance(inner, dict) and any(isinstance(v, _Tensor)
                                                   for v in inner.values()):
                    state = inner
                    self.info["unwrapped"] = key
                    break
        extra = {}
        for key, value in obj.items():
            if state is not obj and value is state:
                continue
            if state is obj and isinstance(value, _Tensor):
                continue
            extra[str(key)] = _summary(value)
        if state is not obj:
            for key, value in state.items():
                if not isinstance(value, _Tensor):
                    extra[f"{self.info['unwrapped']}.{key}"] = _summary(value)
        if extra:
            self.info["extra"] = extra
        shared: dict[str, list[str]] = {}
        for key, value in state.items():
            if not isinstance(value, _Tensor):
                continue
            if not isinstance(key, str):
                raise BadInput(f"state dict key {_short(key)} is not a string", path=self.path)
            self.tensors[key] = self._source_tensor(key, value)
            shared.setdefault(value.storage.key, []).append(key)
        multi = {k: v for k, v in shared.items() if len(v) > 1}
        if multi:
            self.info["shared_storages"] = multi

    def _source_tensor(self, name: str, t: _Tensor) -> SourceTensor:
        st = t.storage
        if not isinstance(st, _Storage):
            raise BadInput(f"tensor storage is {_short(st)}, not a storage (malformed data.pkl)",
                           path=self.path, tensor=name)
        stype = st.stype
        if stype.qtype is None:
            raise BadInput(f"dtype {stype.dtype} (torch.{stype.type_name}) is not supported: "
                           "only float32, float16 and bfloat16 tensors can be read",
                           path=self.path, tensor=name)
        qtype: QuantType = by_name(stype.qtype)
        size, stride, soff = t.size, t.stride, t.storage_offset
        if not (isinstance(size, (tuple, list)) and isinstance(stride, (tuple, list))
                and all(_is_int(d) and d >= 0 for d in size)
                and all(_is_int(s) and s >= 0 for s in stride)
                and len(size) == len(stride) and _is_int(soff) and soff >= 0):
            raise BadInput(f"malformed tensor view: size {_short(size)}, stride {_short(stride)}"
                           f", storage offset {_short(soff)}", path=self.path, tensor=name)
        size, stride = tuple(size), tuple(stride)
        member = f"{self._prefix}/data/{st.key}"
        if member not in self._members:
            raise BadInput(f"storage member {member!r} is missing from the archive",
                           path=self.path, tensor=name)
        data_off, member_bytes = self._member_data(member, name)
        item = stype.itemsize
        if st.numel * item > member_bytes:
            raise BadInput(f"storage {member!r} holds {member_bytes} bytes but declares "
                           f"{st.numel} {stype.dtype} elements ({st.numel * item} bytes)",
                           path=self.path, tensor=name, offset=data_off)
        numel = 1
        for d in size:
            numel *= d
        offset = data_off + soff * item
        if numel == 0:
            return SourceTensor(name, size, qtype, self.path, offset,
                                load=lambda: np.zeros(0, np.uint8))
        last = soff + sum((d - 1) * s for d, s in zip(size, stride))
        if last >= st.numel:
            raise BadInput(f"tensor of shape {size} with stride {stride} at storage offset "
                           f"{soff} extends past its storage (element {last} of {st.numel})",
                           path=self.path, tensor=name, offset=offset)
        if numel > st.numel and numel * item > MAX_EXPANDED_BYTES:
            raise BadInput(f"tensor of shape {size} with stride {stride} is a broadcast view "
                           f"of a {st.numel}-element storage that would expand to "
                           f"{numel * item} bytes", path=self.path, tensor=name, offset=offset)
        expect = 1
        contiguous = True
        for d, s in zip(reversed(size), reversed(stride)):
            if d != 1 and s != expect:
                contiguous = False
                break
            expect *= d
        nbytes = numel * item
        if contiguous:
            load = (lambda o=offset, n=nbytes: np.frombuffer(self._buf, np.uint8, n, o))
        else:
            load = (lambda o=data_off, n=st.numel, so=soff, sz=size, sd=stride, i=item:
                    self._gather(o, n, so, sz, sd, i))
        return SourceTensor(name, size, qtype, self.path, offset, load=load)

    def _gather(self, data_off, numel, soff, size, stride, item) -> np.ndarray:
        base = np.frombuffer(self._buf, np.dtype(f"<u{item}") if item > 1 else np.uint8,
                             numel, data_off)
        view = np.lib.stride_tricks.as_strided(base[soff:], shape=size,
                                               strides=tuple(s * item for s in stride),
                                               writeable=False)
        return np.ascontiguousarray(view).reshape(-1).view(np.uint8)

    def close(self) -> None:
        # Arrays handed out may still view the map; let the GC close it when they are gone.
        self.tensors = {}


def _summary(value):
    """A small, printable stand-in for a non-tensor value of the checkpoint (for `info`)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value if not isinstance(value, str) or len(value) <= 200 else value[:197] + "..."
    if isinstance(value, (_Marker, _StorageType)):
        return repr(value)
    if isinstance(value, _Tensor):
        return "<tensor, ignored>"
    if isinstance(value, dict):
        n = sum(isinstance(v, _Tensor) for v in value.values())
        return f"<dict of {len(value)} items ({n} tensors), ignored>"
    if isinstance(value, (list, tuple)) and len(value) <= 16 and all(
            v is None or isinstance(v, (bool, int, float, str)) for v in value):
        return list(value)
    return f"<{type(value).__name__}, ignored>"

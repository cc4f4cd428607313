"""The canonical RWKV model: version, hyper-parameters, and tensors in forward order.

Whatever the checkpoint format, a Model presents the tensors exactly as rwkv.cpp stores them
(names, shapes and the pre-computed transforms of rwkv_spec.md section 3), loading and
transforming one tensor at a time when asked.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from formats.arch import (HParams, RwkvVersion as V, detect_version,  # noqa: F401
                          expected_shapes, forward_order)
from formats.errors import BadInput
from formats.quants import NonFiniteValue, QuantType, by_name, first_non_finite

from .names import canonical_name, layer_of

_V7_MIX = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"]
from .readers import Checkpoint, SourceTensor, open_checkpoint

F32 = by_name("F32")

@dataclass
class ModelTensor:
    """One canonical tensor: its stored name and shape, and how to get its values."""

    name: str
    shape: tuple[int, ...]
    source: SourceTensor            # where its data comes from (the first source if several)
    transformed: bool               # values differ from the source bytes (transform applied)
    _compute: Callable[[], np.ndarray] = field(repr=False)

    @property
    def source_type(self) -> QuantType:
        return F32 if self.transformed else self.source.qtype

    @property
    def layer(self) -> int | None:
        return layer_of(self.name)

    def values(self) -> np.ndarray:
        """float32 values in the stored shape; refuses NaN/Inf with the offending element."""
        x = np.asarray(self._compute(), dtype=np.float32).reshape(self.shape)
        self._check_finite(x, 0)
        return x

    def _check_finite(self, x: np.ndarray, first: int) -> None:
        idx = first_non_finite(x)
        if idx >= 0:
            raise self._non_finite(first + idx, x.reshape(-1)[idx])

    def _non_finite(self, element: int, value) -> BadInput:
        """The error for a NaN/Inf at flat `element` of this tensor (byte offset when the source
        stores one element per unit)."""
        offset = None
        if not self.transformed and not self.source.qtype.is_block:
            offset = self.source.offset + element * self.source.qtype.block_bytes
        return BadInput(f"non-finite weight {np.float32(value)} at element {element}",
                        path=self.source.path, tensor=self.name, offset=offset)

    def raw(self) -> np.ndarray:
        """The source bytes, valid only for an untransformed tensor."""
        assert not self.transformed
        return self.source.raw()

    @property
    def n_rows(self) -> int:
        return int(np.prod(self.shape[:-1])) if len(self.shape) > 1 else 1

    def raw_rows(self, r0: int, r1: int) -> np.ndarray:
        """Source bytes of rows [r0, r1) (rows run along the last dimension)."""
        rb = self.source.qtype.row_bytes(self.shape[-1])
        return self.raw()[r0 * rb:r1 * rb]

    def values_rows(self, r0: int, r1: int) -> np.ndarray:
        """float32 values of rows [r0, r1) as (r1 - r0, row length), checked finite."""
        cols = self.shape[-1]
        if self.transformed:
            x = self.values().reshape(-1, cols)[r0:r1]
        else:
            x = self.source.qtype.dequantize(self.raw_rows(r0, r1), (r1 - r0, cols))
            self._check_finite(x, r0 * cols)
        return x

    def quantize_rows(self, qtype: QuantType, r0: int, r1: int, importance=None) -> np.ndarray:
        """Rows [r0, r1) stored as `qtype`: uint8 (r1 - r0, row bytes), NaN/Inf refused as in
        values(). An untransformed tensor goes from its source bytes into the quantizer (fused,
        without a float32 copy, for F32/F16/BF16 sources and block types). `importance` (per
        column) selects the type's importance-weighted quantizer, where it has one."""
        if importance is not None and qtype.weighted is not None:
            return qtype.quantize_weighted(self.values_rows(r0, r1), importance)
        if self.transformed:
            return qtype.quantize(self.values_rows(r0, r1))
        cols = self.shape[-1]
        try:
            return qtype.quantize_from(self.source.qtype, self.raw_rows(r0, r1), cols)
        except NonFiniteValue as e:
            raise self._non_finite(r0 * cols + e.element, e.value) from None


class Model:
    """A checkpoint seen as rwkv.cpp's canonical model."""

    def __init__(self, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        self.path = checkpoint.path
        self._raw_source = not checkpoint.stored_form
        self._by_canon: dict[str, SourceTensor] = {}
        for t in checkpoint:
            canon = canonical_name(t.name)
            if canon is None:
                raise BadInput("tensor name not known for any RWKV version", path=self.path,
                               tensor=t.name, offset=t.offset)
            if canon in self._by_canon:
                raise BadInput(f"tensor maps to {canon!r}, which another tensor also maps to",
                               path=self.path, tensor=t.name)
            self._by_canon[canon] = t
        if "emb.weight" not in self._by_canon:
            raise BadInput("no emb.weight: not an RWKV checkpoint (unknown architecture)",
                           path=self.path)
        self.version = detect_version(self._by_canon)
        self.hparams = self._hparams()
        self.tensors: dict[str, ModelTensor] = self._build_tensors()
        self._check_shapes()

    # -- hyper-parameters ---------------------------------------------------------------
    def _shape(self, name: str) -> tuple[int, ...]:
        if name not in self._by_canon:
            raise BadInput(f"missing tensor {name!r} required by RWKV v{self.version.label}",
                           path=self.path)
        return self._by_canon[name].shape

    def _hparams(self) -> HParams:
        v = self.version
        n_vocab, n_embd = self._shape("emb.weight")
        layers = {layer_of(n) for n in self._by_canon} - {None}
        n_layer = max(layers) + 1 if layers else 0
        if n_layer == 0 or layers != set(range(n_layer)):
            raise BadInput(f"layers are not numbered 0..N-1 (found {sorted(layers)})",
                           path=self.path)
        ffn_size = self._shape("blocks.0.ffn.key.weight")[0]
        n_head = head_size = 0
        lora = {}
        if v in (V.V5_1, V.V5_2):
            n_head = self._shape("blocks.0.att.time_decay")[0]
        elif v is V.V6:
            n_head = self._shape("blocks.0.att.time_faaaa")[0]
            w1 = self._shape("blocks.0.att.time_maa_w1")
            d1 = self._shape("blocks.0.att.time_decay_w1")
            # Raw checkpoints hold these as (C, 5D) and (C, Dw); rwkv.cpp stores them transposed.
            lora = {"maa": (w1[1] if self._raw_source else w1[0]) // 5,
                    "decay": d1[1] if self._raw_source else d1[0]}
        elif v is V.V7:
            n_head = self._shape("blocks.0.att.r_k")[0]
            src = 1 if n_layer > 1 else 0
            for lora_name in ("w", "a", "v", "g"):
                layer = src if lora_name == "v" else 0
                if lora_name == "v" and n_layer == 1:
                    lora["v"] = 0
                    continue
                s = self._shape(f"blocks.{layer}.att.{lora_name}1")
                lora[lora_name] = s[1] if self._raw_source else s[0]
        if n_head:
            if n_embd % n_head:
                raise BadInput(f"n_embd {n_embd} is not a multiple of the head count {n_head}",
                               path=self.path)
            head_size = n_embd // n_head
        return HParams(v, n_vocab, n_embd, n_layer, ffn_size, n_head, head_size, lora)

    # -- tensors ------------------------------------------------------------------------
    def _build_tensors(self) -> dict[str, ModelTensor]:
        hp = self.hparams
        shapes = expected_shapes(hp)
        out = {}
        for name in forward_order(hp):
            if self._raw_source and name.endswith("att.x_rwkvag"):
                prefix = name[: -len("x_rwkvag")]
                # rwkv.cpp concatenates att.x_* in state-dict key order and reads the slices as
                # r, w, k, v, a, g; placing them by name converts any key order right.
                parts = [self._source(prefix + m) for m in _V7_MIX]
                out[name] = ModelTensor(
                    name, shapes[name], parts[0], True,
                    lambda parts=parts: np.concatenate(
                        [p.to_float32().astype(np.float64).reshape(1, 1, -1) for p in parts]))
                continue
            src = self._source(name)
            if not self._raw_source:
                out[name] = ModelTensor(name, shapes[name], src, False, src.to_float32)
                continue
            transform = self._transform_for(name)
            if transform is None:
                out[name] = ModelTensor(name, shapes[name], src, False,
                                        lambda s=src: s.to_float32())
            else:
                out[name] = ModelTensor(name, shapes[name], src, True,
                                        lambda s=src, f=transform: f(s.to_float32()))
        return out

    def _source(self, name: str) -> SourceTensor:
        if name not in self._by_canon:
            raise BadInput(f"missing tensor {name!r} required by RWKV v{self.version.label}",
                           path=self.path)
        return self._by_canon[name]

    def _transform_for(self, name: str):
        """The raw -> stored transform of rwkv_spec.md section 3 (None: values unchanged).

        Arithmetic runs in float64 and is rounded once to float32.
        """
        v, hp = self.version, self.hparams
        H, S = hp.n_head, hp.head_size
        tail = name.split(".", 2)[-1] if name.startswith("blocks.") else name
        f64 = lambda x: x.astype(np.float64)  # noqa: E731
        if ".time_" in name:
            squeeze = lambda x: f64(x).squeeze()  # noqa: E731
        else:
            squeeze = f64
        if v is V.V4 and tail == "att.time_decay":
            return lambda x: -np.exp(squeeze(x))
        if v is V.V5_1 and tail == "att.time_decay":
            return lambda x: np.exp(-np.exp(squeeze(x))).reshape(H, 1, 1)
        if v is V.V5_1 and tail == "att.time_first":
            return lambda x: np.exp(squeeze(x)).reshape(H, 1, 1)
        if v is V.V5_2 and tail == "att.time_decay":
            return lambda x: np.exp(-np.exp(squeeze(x))).reshape(H, S, 1)
        if v in (V.V5_2, V.V6) and tail == "att.time_faaaa":
            return lambda x: squeeze(x).reshape(H, S, 1)
        if v is V.V6 and tail == "att.time_decay":
            return lambda x: squeeze(x).reshape(H, S, 1)
        if v is V.V6 and tail in ("att.time_maa_w1", "att.time_decay_w1", "att.time_decay_w2"):
            return lambda x: np.ascontiguousarray(squeeze(x).T)
        if v is V.V6 and tail == "att.time_maa_w2":
            return lambda x: np.ascontiguousarray(squeeze(x).transpose(0, 2, 1))
        if v is V.V7 and tail in ("att.w1", "att.a1", "att.v1", "att.g1",
                                  "att.w2", "att.a2", "att.v2", "att.g2"):
            return lambda x: np.ascontiguousarray(f64(x).T)
        if ".time_" in name:
            return lambda x: squeeze(x)
        return None

    def _check_shapes(self) -> None:
        known = set(self.tensors) | {n for n in self._by_canon if ".att.x_" in n and
                                     n.split(".")[-1] in _V7_MIX}
        for canon, src in self._by_canon.items():
            if canon not in known:
                raise BadInput(f"tensor {canon!r} does not belong to an RWKV "
                               f"v{self.version.label} model", path=self.path, tensor=src.name)
        for name, t in self.tensors.items():
            n_src = int(np.prod(t.source.shape)) * (6 if name.endswith("x_rwkvag") else 1)
            ok = (n_src == int(np.prod(t.shape))) if t.transformed else \
                tuple(t.source.shape) == tuple(t.shape)
            if not ok:
                raise BadInput(f"shape {t.source.shape} does not match the expected {t.shape} "
                               f"for RWKV v{self.version.label}", path=self.path,
                               tensor=t.source.name, offset=t.source.offset)

    # -- access -------------------------------------------------------------------------
    def __iter__(self):
        """Tensors in forward order."""
        return iter(self.tensors.values())

    def __getitem__(self, name: str) -> ModelTensor:
        return self.tensors[name]

    def source_order(self) -> list[str]:
        """Canonical names in the checkpoint's own order (v7 x_* collapse into x_rwkvag)."""
        order = []
        for canon in self._by_canon:
            if ".att.x_" in canon and canon.split(".")[-1] in _V7_MIX:
                canon = canon.rsplit(".", 1)[0] + ".x_rwkvag"
            if canon not in order:
                order.append(canon)
        return order

    def close(self) -> None:
        self.checkpoint.close()


def load_model(path) -> Model:
    return Model(open_checkpoint(path))

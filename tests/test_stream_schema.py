"""docs/format.md, formats/board_constants.py and the construct schema in formats/stream.py must
agree, and the bytes they describe must be the bytes construct builds.

(a) every `<!-- schema: X -->` table of docs/format.md against the construct struct X (field
    names, C types, offsets and sizes), the enum tables, the type table and the tensor-order
    tables against formats/quants.py and host/model.py;
(b) every constant in formats/board_constants.py against the construct schema;
(c) golden bytes: headers and records built with construct, checked at the constants' offsets,
    and a stream written from the document's rules alone, validated by the reference reader.
"""
from __future__ import annotations

import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from construct import (Array, Checksum, ChecksumError, Const, ConstError, Container, FormatField, Padded,
                       Pass, RawCopy, StringEncoded, Struct)

from formats import board_constants as B
from formats import stream as S
from formats.arch import RwkvVersion
from formats.quants import BUILTIN_TYPES as TYPES, by_name
from host.model import HParams, expected_shapes, forward_order

DOC = Path(__file__).resolve().parent.parent / "docs" / "format.md"

# ---------------------------------------------------------------------------------------------
# Reading docs/format.md

_MARKER = re.compile(r"^<!--\s*(schema|order|golden):\s*(\S+)\s*-->\s*$")


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _doc_sections() -> dict[tuple[str, str], object]:
    """(marker kind, name) -> list of row dicts (tables) or the text of a code block (golden)."""
    lines = DOC.read_text(encoding="utf-8").splitlines()
    out = {}
    for i, line in enumerate(lines):
        m = _MARKER.match(line.strip())
        if not m:
            continue
        key = (m.group(1), m.group(2))
        assert key not in out, f"docs/format.md has two {key} markers"
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        if key[0] == "golden":
            assert lines[j].startswith("```"), f"{key}: a code block must follow the marker"
            k = j + 1
            while not lines[k].startswith("```"):
                k += 1
            out[key] = "\n".join(lines[j + 1:k])
            continue
        assert lines[j].startswith("|"), f"{key}: a table must follow the marker"
        head = [c.split()[0].lower() if c else c for c in _cells(lines[j])]
        assert set(lines[j + 1].replace("|", "").replace(" ", "")) <= set("-:"), key
        rows = []
        k = j + 2
        while k < len(lines) and lines[k].startswith("|"):
            cells = _cells(lines[k])
            assert len(cells) == len(head), f"{key}: row {lines[k]!r} has the wrong cell count"
            rows.append({h: c.replace("`", "") for h, c in zip(head, cells)})
            k += 1
        out[key] = rows
    return out


SECTIONS = _doc_sections()


def doc_table(name: str, kind: str = "schema") -> list[dict]:
    assert (kind, name) in SECTIONS, f"docs/format.md lacks a `<!-- {kind}: {name} -->` table"
    return SECTIONS[(kind, name)]


def _pad(n: int, a: int) -> int:
    return (-n) % a


def _doc_eval(expr: str, env: dict) -> int:
    """An offset or count written in the document: integers, + - ·, n_types, pad4(...)..."""
    expr = expr.replace("·", "*").replace("−", "-")
    assert re.fullmatch(r"[\w\s+*()\-]+", expr), f"unexpected expression {expr!r} in the doc"
    return int(eval(expr, {"__builtins__": {}},  # noqa: S307 - whitelisted characters only
                    dict(env, pad4=lambda x: _pad(x, 4), pad16=lambda x: _pad(x, 16))))


def _doc_hf_formula() -> str:
    m = re.search(r"`HF = ([^`]+)`", DOC.read_text(encoding="utf-8"))
    assert m, "docs/format.md must define `HF = ...` (the bytes the header CRC covers)"
    return m.group(1)


# ---------------------------------------------------------------------------------------------
# Reading the construct schema

# Structs a table may name as an element type (e.g. TypeEntry[n_types]).
NAMED = {id(S.TypeEntry): "TypeEntry"}
BASE_SIZES = {"u8": 1, "i8": 1, "u16": 2, "u32": 4, "u64": 8, "f32": 4, "char": 1,
              "TypeEntry": S.TypeEntry.sizeof()}
_FMT = {"<B": "u8", "<b": "i8", "<H": "u16", "<L": "u32", "<I": "u32", "<Q": "u64",
        "<f": "f32"}


def _count_expr(count) -> str:
    if isinstance(count, int):
        return str(count)
    m = re.fullmatch(r"this\['(\w+)'\]", repr(count))
    assert m, f"array count {count!r} is not a plain this.field"
    return m.group(1)


def c_type(sc) -> str | None:
    """The document's type for a construct field; None for zero padding (any `u8[...]`)."""
    if isinstance(sc, Const):
        return f"char[{len(sc.value)}]"
    if isinstance(sc, FormatField):
        assert sc.fmtstr in _FMT, f"field format {sc.fmtstr!r} is not little-endian u8..u64/f32"
        return _FMT[sc.fmtstr]
    if isinstance(sc, StringEncoded):
        return f"char[{sc.sizeof()}]"
    if isinstance(sc, Checksum):
        return c_type(sc.checksumfield)
    if isinstance(sc, Array):
        elem = NAMED.get(id(sc.subcon)) or c_type(sc.subcon)
        return f"{elem}[{_count_expr(sc.count)}]"
    if isinstance(sc, Padded) and isinstance(sc.subcon, type(Pass)):
        return None
    raise AssertionError(f"no document type for {sc!r}")


def schema_fields(struct: Struct, ctx: dict) -> list[tuple[str, str | None, int, int]]:
    """(name, doc type, offset, size) of every field, RawCopy'd sub-structs flattened; offsets
    are sums of subcon sizes, with variable sizes evaluated for the counts in ctx."""
    ctx = dict(ctx)
    out = []
    off = 0

    def walk(st: Struct, base: int):
        nonlocal off
        start = off
        for sc in st.subcons:
            if isinstance(sc.subcon, RawCopy):
                walk(sc.subcon.subcon, off)
                ctx[sc.name] = Container(data=bytes(off - base))
                continue
            size = sc.sizeof(**ctx)
            out.append((sc.name, c_type(sc.subcon), off, size))
            off += size
        return off - start

    walk(struct, 0)
    return out


def header_fields_size(n_types: int, n_tensors: int) -> int:
    return sum(f[3] for f in schema_fields(S.HeaderFields, dict(n_types=n_types,
                                                                n_tensors=n_tensors)))


def fixed_offsets(struct: Struct) -> dict[str, int]:
    """Offsets of the fields before the first variable-size one."""
    out, off = {}, 0
    for sc in struct.subcons:
        try:
            size = sc.sizeof()
        except Exception:
            break
        out[sc.name] = off
        off += size
    return out


# ---------------------------------------------------------------------------------------------
# (a) document <-> schema

COUNTS = [(1, 1), (2, 3), (3, 5), (8, 340), (5, 65535)]
DOC_STRUCTS = {"StreamHeader": S.StreamHeader, "TypeEntry": S.TypeEntry,
               "RecordHeader": S.RecordHeader, "PayloadCrc": S.PayloadCrc,
               "IndexEntry": S.IndexEntry}


def test_every_struct_of_the_schema_has_a_table():
    covered = set(DOC_STRUCTS) | {"HeaderFields", "RecordFields"}   # flattened into the above
    structs = {n for n, v in vars(S).items() if isinstance(v, Struct)}
    assert structs <= covered, f"structs without a table in docs/format.md: {structs - covered}"
    assert S.StreamHeader.subcons[0].subcon.subcon is S.HeaderFields
    assert S.RecordHeader.subcons[0].subcon.subcon is S.RecordFields


@pytest.mark.parametrize("name", sorted(DOC_STRUCTS))
@pytest.mark.parametrize("n_types,n_tensors", COUNTS)
def test_doc_table_matches_struct(name, n_types, n_tensors):
    ctx = dict(n_types=n_types, n_tensors=n_tensors)
    schema = schema_fields(DOC_STRUCTS[name], ctx)
    rows = doc_table(name)
    assert [r["field"] for r in rows] == [f[0] for f in schema], f"{name}: field names/order"
    env = dict(ctx, HF=_doc_eval(_doc_hf_formula(), ctx))
    for row, (field, ctype, off, size) in zip(rows, schema):
        m = re.fullmatch(r"(\w+)(?:\[(.+)\])?", row["type"])
        assert m and m.group(1) in BASE_SIZES, f"{name}.{field}: unknown type {row['type']!r}"
        if ctype is None:
            assert m.group(1) == "u8" and m.group(2), f"{name}.{field}: padding is u8[...]"
        else:
            assert row["type"] == ctype, f"{name}.{field}: doc {row['type']}, schema {ctype}"
        count = _doc_eval(m.group(2), env) if m.group(2) else 1
        assert BASE_SIZES[m.group(1)] * count == size, f"{name}.{field}: size"
        assert _doc_eval(row["offset"], env) == off, f"{name}.{field}: offset"


@pytest.mark.parametrize("n_types,n_tensors", COUNTS)
def test_doc_header_size_formulas(n_types, n_tensors):
    ctx = dict(n_types=n_types, n_tensors=n_tensors)
    hf = header_fields_size(n_types, n_tensors)
    assert _doc_eval(_doc_hf_formula(), ctx) == hf
    stream_header = schema_fields(S.StreamHeader, ctx)
    total = stream_header[-1][2] + stream_header[-1][3]
    assert total == hf + 4 + _pad(hf + 4, 16) and total % S.ALIGN == 0


def test_doc_enums():
    kinds = {int(r["value"], 0): r["kind"] for r in doc_table("RecordKind")}
    assert kinds == {int(k): k.name for k in S.RecordKind}
    assert all(S.RecordKind.is_optional(v) == (v >= 0x8000) for v in kinds)
    toks = {int(r["value"]): r["tokenizer"].split(":")[0] for r in doc_table("Tokenizer")}
    assert toks == {int(t): t.name for t in S.Tokenizer}
    arch = {int(r["value"]): r["arch"] for r in doc_table("arch")}
    assert arch == {int(v): "v" + v.label for v in RwkvVersion}


def test_doc_type_table_matches_quants():
    rows = doc_table("quants")
    assert [(int(r["id"]), r["name"], int(r["block_size"]), int(r["block_bytes"]),
             r["bits/weight"] if r["bits/weight"] == "variable" else float(r["bits/weight"]))
            for r in rows] == \
        [(q.id, q.name, q.block_size, q.block_bytes,
          "variable" if q.variable else q.bits_per_weight) for q in TYPES]
    name_size = dict((f[0], f[3]) for f in schema_fields(S.TypeEntry, {}))["name"]
    assert all(len(q.name) < name_size and q.id < 256 for q in TYPES)


# -- block layouts: a decoder written from the document's table must match formats/quants.py

_FIELD_SIZE = {"d": 2, "m": 2, "f32": 4, "f16": 2, "u16": 2, "i8": 1, "u8": 1, "u32": 4}


def _doc_block_layouts() -> dict[str, tuple[dict, str]]:
    """name -> ({field: (offset, size)}, value formula), from the table after section 7's."""
    text = DOC.read_text(encoding="utf-8")
    start = text.index("| type | layout | value of element e |")
    out = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        name, layout, value = _cells(line)
        fields = {}
        for m in re.finditer(r"@(\d+) ([^`]+)`", layout):
            off, spec = int(m.group(1)), m.group(2).strip()
            fm = re.fullmatch(r"(\w+): (\w+)(?:\[(\d+)\])?", spec)
            if fm:   # "qs: u8[16]"
                fields[fm.group(1)] = (off, _FIELD_SIZE[fm.group(2)] * int(fm.group(3) or 1))
            else:    # "d", "f32", "u16 b"
                fields[spec.split()[-1]] = (off, _FIELD_SIZE[spec.split()[0]])
        out[name] = (fields, value)
    return out


def _doc_decode(name: str, fields: dict, value: str, raw: np.ndarray, bb: int) -> np.ndarray:
    blocks = raw.reshape(-1, bb)

    def f16(field):
        o, _ = fields[field]
        return blocks[:, o:o + 2].copy().view("<f2").astype(np.float32)

    if name == "F32":
        return blocks.copy().view("<f4").reshape(-1)
    if name == "F16":
        return f16("f16").reshape(-1)
    if name == "BF16":
        return (blocks.copy().view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(-1)
    o, n = fields["qs"]
    qs = blocks[:, o:o + n]
    if n == 32:                                           # Q8_0: one signed byte per element
        q = qs.view(np.int8).astype(np.int32)
    else:                                                 # split nibbles: j and j + 16
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)
        if "qh" in fields:                                # bit e of a LE u32 is bit 4 of q_e
            o, _ = fields["qh"]
            b = blocks[:, o:o + 4].astype(np.uint32)
            qh = b[:, 0] | b[:, 1] << 8 | b[:, 2] << 16 | b[:, 3] << 24
            q |= (((qh[:, None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.int32)
    sub = re.search(r"− (\d+)\)", value)
    x = (q - int(sub.group(1)) if sub else q).astype(np.float32) * f16("d")
    if "+ m" in value:
        x = x + f16("m")
    return x.reshape(-1)


# The simple layouts, decoded from the doc's table; the k-quants' and QX's layouts are proven
# by tests/test_kquants.py (gguf reads our blocks) and tests/test_qx.py.
@pytest.mark.parametrize("qtype", [q for q in TYPES if q.block_size <= 32 and not q.variable],
                         ids=lambda q: q.name)
def test_doc_block_layout_decodes_like_quants(qtype):
    fields, value = _doc_block_layouts()[qtype.name]
    ends = sorted((o, o + s) for o, s in fields.values())
    assert ends[0][0] == 0 and ends[-1][1] == qtype.block_bytes, qtype.name
    assert all(a[1] == b[0] for a, b in zip(ends, ends[1:])), f"{qtype.name}: gaps/overlaps"
    rng = np.random.default_rng(qtype.id)
    n_blocks = 64
    raw = rng.integers(0, 256, n_blocks * qtype.block_bytes, dtype=np.uint8)
    blocks = raw.reshape(n_blocks, qtype.block_bytes)
    finite = rng.standard_normal((n_blocks, qtype.block_bytes // 2)).astype(np.float32)
    if qtype.name == "F32":
        blocks[:] = finite[:, :1].view(np.uint8)
    elif qtype.name in ("F16", "BF16"):
        blocks[:] = np.float16(finite[:, :1]).view(np.uint8) if qtype.name == "F16" else \
            (finite[:, :1].view(np.uint32) >> 16).astype("<u2").view(np.uint8)
    else:
        for f in ("d", "m"):
            if f in fields:
                o = fields[f][0]
                blocks[:, o:o + 2] = finite[:, :1].astype("<f2").view(np.uint8)
    n = n_blocks * qtype.block_size
    got = _doc_decode(qtype.name, fields, value, raw, qtype.block_bytes)
    want = qtype.dequantize(raw, (n,))
    np.testing.assert_array_equal(got, want)


# -- tensor order

SYMS = dict(C=64, V=96, F=224, H=4, S=16, D=32, Dw=64, Rw=32, Ra=32, Rv=32, Rg=96)


def _hparams(version: RwkvVersion, n_layer: int) -> HParams:
    lora = {RwkvVersion.V6: dict(maa=SYMS["D"], decay=SYMS["Dw"]),
            RwkvVersion.V7: dict(w=SYMS["Rw"], a=SYMS["Ra"], v=SYMS["Rv"], g=SYMS["Rg"])}
    heads = (0, 0) if version is RwkvVersion.V4 else (SYMS["H"], SYMS["S"])
    return HParams(version, SYMS["V"], SYMS["C"], n_layer, SYMS["F"], *heads,
                   lora.get(version, {}))


def _doc_shape(text: str) -> tuple[int, ...]:
    text = text.replace("·", "*")
    assert re.fullmatch(r"\([\w\s,*]+\)", text), text
    return tuple(eval(text, {"__builtins__": {}}, dict(SYMS)))  # noqa: S307


@pytest.mark.parametrize("version", list(RwkvVersion), ids=lambda v: v.name)
def test_doc_tensor_order_matches_model(version):
    rows = doc_table(version.name, "order")
    assert [int(r["#"]) for r in rows] == list(range(len(rows)))
    common = {r["tensor"]: _doc_shape(r["shape"]) for r in doc_table("common", "order")}
    hp = _hparams(version, 3)
    names, shapes = forward_order(hp), expected_shapes(hp)
    want = list(common)[:3]
    for i in range(hp.n_layer):
        for r in rows:
            if version is RwkvVersion.V7 and i == 0 and r["tensor"] in ("att.v0", "att.v1",
                                                                         "att.v2"):
                continue
            want.append(f"blocks.{i}.{r['tensor']}")
    want += list(common)[3:]
    assert names == want
    doc_shapes = dict(common, **{f"blocks.{i}.{r['tensor']}": _doc_shape(r["shape"])
                                 for i in range(hp.n_layer) for r in rows})
    assert {n: shapes[n] for n in names} == {n: doc_shapes[n] for n in names}
    per_layer = {"V4": 18, "V5_1": 20, "V5_2": 22, "V6": 28, "V7": 28}[version.name]
    assert len(rows) == per_layer        # the counts written in section 8's prose
    assert len(names) == 6 + hp.n_layer * per_layer - (3 if version is RwkvVersion.V7 else 0)


# ---------------------------------------------------------------------------------------------
# (b) board constants <-> schema

def _flat_offsets(struct: Struct) -> dict[str, int]:
    return {f[0]: f[2] for f in schema_fields(struct, dict(n_types=0, n_tensors=0))}


def test_board_constants_match_schema():
    checked = set()

    def check(name, value):
        assert getattr(B, name) == value, f"board_constants.{name} = {getattr(B, name)!r}, " \
                                          f"the schema implies {value!r}"
        checked.add(name)

    magic = S.HeaderFields.subcons[0].subcon
    assert isinstance(magic, Const)
    check("STREAM_MAGIC", magic.value)
    check("STREAM_MAGIC", S.MAGIC)
    check("STREAM_MAJOR", S.MAJOR)
    check("ALIGN", S.ALIGN)

    header = fixed_offsets(S.HeaderFields)
    check("HEADER_FIXED_SIZE", _flat_offsets(S.HeaderFields)["types"])
    check("HEADER_OFFSETS", {k: v for k, v in header.items() if not k.startswith("reserved")})

    check("TYPE_ENTRY_SIZE", S.TypeEntry.sizeof())
    check("TYPE_ENTRY_SIZE", S.TYPE_ENTRY_SIZE)
    entry = _flat_offsets(S.TypeEntry)
    check("TYPE_ENTRY_OFFSETS", {k: v for k, v in entry.items() if not k.startswith("reserved")})
    check("TYPE_NAME_SIZE", dict((f[0], f[3]) for f in schema_fields(S.TypeEntry, {}))["name"])

    check("RECORD_HEADER_SIZE", S.RecordHeader.sizeof())
    check("RECORD_HEADER_SIZE", S.RECORD_HEADER_SIZE)
    record = _flat_offsets(S.RecordHeader)
    check("RECORD_OFFSETS", {k: v for k, v in record.items() if not k.startswith("reserved")})
    assert B.RECORD_OFFSETS["header_crc"] == 28 == B.RECORD_HEADER_SIZE - 4
    check("RECORD_CRC_SIZE", S.PayloadCrc.sizeof())

    check("KIND_TENSOR", S.RecordKind.TENSOR)
    check("KIND_END", S.RecordKind.END)
    check("KIND_INDEX", S.RecordKind.INDEX)
    assert S.RecordKind.is_optional(B.KIND_OPTIONAL_MIN)
    assert not S.RecordKind.is_optional(B.KIND_OPTIONAL_MIN - 1)
    assert S.RecordKind.is_optional(B.KIND_INDEX)
    checked.add("KIND_OPTIONAL_MIN")

    # The flag bits are documented in the schema's comments and in the doc's tables.
    doc_bit = lambda table, field: 1 << int(re.search(r"bit (\d+)", next(  # noqa: E731
        r["meaning"] for r in doc_table(table) if r["field"] == field)).group(1))
    check("TYPE_FLAG_VARIABLE", doc_bit("TypeEntry", "flags"))
    check("RECORD_FLAG_ROW_TABLE", doc_bit("RecordHeader", "flags"))

    public = {n for n in vars(B) if n.isupper()}
    assert public == checked, f"constants without a check: {public - checked}"


def test_board_constants_are_naturally_aligned():
    header = schema_fields(S.HeaderFields, dict(n_types=0, n_tensors=0))
    for name, ctype, off, size in header + schema_fields(S.RecordHeader, {}):
        if ctype in ("u16", "u32", "u64", "f32"):
            assert off % size == 0, f"{name} at {off} is not {size}-byte aligned"
    assert B.HEADER_FIXED_SIZE % 16 == 0 and B.TYPE_ENTRY_SIZE % 16 == 0


# ---------------------------------------------------------------------------------------------
# (c) golden bytes

HEADER_VALUES = dict(
    major=1, minor=0, header_size=192, arch=70, tokenizer=1, flags=0, n_vocab=65536,
    n_embd=768, n_layer=12, ffn_size=3072, n_head=12, head_size=64, lora_maa=0, lora_decay=0,
    lora_w=64, lora_a=64, lora_v=32, lora_g=128, ln_eps=1e-5, gn_eps=64e-5, n_tensors=3,
    n_types=2, reserved0=0, emb_offset=224, emb_row_bytes=1536, reserved1=0,
    body_size=0x1_2345_6780, index_offset=0x1_2345_6790)
TYPES_VALUES = [dict(id=1, flags=0, block_size=1, block_bytes=2, reserved=0, name="F16",
                     param0=0, param1=0),
                dict(id=7, flags=0, block_size=32, block_bytes=24, reserved=0, name="Q5_1",
                     param0=0xDEADBEEF, param1=5)]
PLAN = [1, 7, 1]
_PACK = {"u8": "<B", "u16": "<H", "u32": "<I", "u64": "<Q", "f32": "<f"}


def _build_header() -> bytes:
    fields = dict(HEADER_VALUES, types=TYPES_VALUES, plan=PLAN)
    return S.StreamHeader.build(dict(fields=dict(value=fields), header_crc=None))


def test_golden_header_bytes():
    data = _build_header()
    hf = 112 + 32 * 2 + 3 + 1
    assert len(data) == 192 == hf + 4 + _pad(hf + 4, 16) == HEADER_VALUES["header_size"]
    assert data[:8] == b"RWKS\x01\x00\x00\x00"
    assert data[B.HEADER_OFFSETS["magic"]:][:4] == B.STREAM_MAGIC
    types = {f[0]: f[1] for f in schema_fields(S.HeaderFields, dict(n_types=2, n_tensors=3))}
    for name, off in B.HEADER_OFFSETS.items():
        if name == "magic":
            continue
        (got,) = struct.unpack_from(_PACK[types[name]], data, off)
        want = HEADER_VALUES[name]
        assert got == (np.float32(want) if types[name] == "f32" else want), name
    assert data[B.HEADER_OFFSETS["arch"]] == 70
    assert data[B.HEADER_OFFSETS["body_size"]:][:8] == bytes.fromhex("8067452301000000")
    assert data[B.HEADER_OFFSETS["ln_eps"]:][:4] == bytes.fromhex("acc52737")
    for k, entry in enumerate(TYPES_VALUES):
        base = B.HEADER_FIXED_SIZE + k * B.TYPE_ENTRY_SIZE
        o = B.TYPE_ENTRY_OFFSETS
        assert data[base + o["id"]] == entry["id"]
        assert data[base + o["flags"]] == entry["flags"]
        assert struct.unpack_from("<HH", data, base + o["block_size"]) == \
            (entry["block_size"], entry["block_bytes"])
        assert data[base + o["name"]:][:B.TYPE_NAME_SIZE] == \
            entry["name"].encode().ljust(B.TYPE_NAME_SIZE, b"\0")
        assert struct.unpack_from("<II", data, base + o["param0"]) == \
            (entry["param0"], entry["param1"])
    plan_off = B.HEADER_FIXED_SIZE + 2 * B.TYPE_ENTRY_SIZE
    assert list(data[plan_off:plan_off + 3]) == PLAN and data[plan_off + 3] == 0
    assert struct.unpack_from("<I", data, hf)[0] == zlib.crc32(data[:hf]) == S.crc32(data[:hf])
    assert data[hf + 4:] == bytes(_pad(hf + 4, 16))

    parsed = S.StreamHeader.parse(data)
    assert parsed.fields.data == data[:hf]
    f = parsed.fields.value
    for name, want in HEADER_VALUES.items():
        assert f[name] == (pytest.approx(want, rel=1e-7) if isinstance(want, float) else want)
    assert [dict((k, e[k]) for k in TYPES_VALUES[0]) for e in f.types] == TYPES_VALUES
    assert list(f.plan) == PLAN


@pytest.mark.parametrize("where", [4, 13, 80, 112 + 8, 112 + 64, 112 + 64 + 3, 180])
def test_header_crc_catches_any_flipped_byte(where):
    data = bytearray(_build_header())
    data[where] ^= 0x01
    with pytest.raises(ChecksumError):
        S.StreamHeader.parse(bytes(data))
    data[where] ^= 0x01
    data[0] ^= 0x01
    with pytest.raises(ConstError):
        S.StreamHeader.parse(bytes(data))


def _record(kind, tensor, type_id, shape, data_size) -> bytes:
    dims = list(shape) + [1] * (3 - len(shape))
    return S.RecordHeader.build(dict(fields=dict(value=dict(
        kind=kind, tensor=tensor, type=type_id, ndim=len(shape), flags=0, dims=dims,
        data_size=data_size, reserved=0)), header_crc=None))


def test_golden_record_header_bytes():
    head = _record(1, 5, 2, (64, 64), 2304)
    assert len(head) == B.RECORD_HEADER_SIZE == 32
    assert head == bytes.fromhex("01000500 02020000 40000000 40000000 01000000 00090000 "
                                 "00000000 0bfa5a6d")
    o = B.RECORD_OFFSETS
    assert struct.unpack_from("<HH", head, o["kind"]) == (B.KIND_TENSOR, 5)
    assert (head[o["type"]], head[o["ndim"]]) == (2, 2)
    assert struct.unpack_from("<H", head, o["flags"])[0] == 0
    assert struct.unpack_from("<3I", head, o["dims"]) == (64, 64, 1)
    assert struct.unpack_from("<I", head, o["data_size"])[0] == 2304
    assert struct.unpack_from("<I", head, o["header_crc"])[0] == zlib.crc32(head[:28])
    h = S.RecordHeader.parse(head)
    assert h.fields.data == head[:28] and h.header_crc == zlib.crc32(head[:28])
    assert (h.fields.value.kind, h.fields.value.tensor, list(h.fields.value.dims)) == \
        (1, 5, [64, 64, 1])
    bad = bytearray(head)
    bad[o["data_size"]] ^= 0x80
    with pytest.raises(ChecksumError):
        S.RecordHeader.parse(bytes(bad))


def test_golden_end_record_matches_doc_and_layout():
    from host.stream.layout import record_header_bytes
    end = _record(S.RecordKind.END, 0, 0, (), 0)
    end += S.PayloadCrc.build(dict(data_crc=S.crc32(b""))) + bytes(12)
    assert bytes.fromhex(SECTIONS[("golden", "END")]) == end
    assert len(end) == 48
    assert record_header_bytes(S.RecordKind.END, 0, 0, (), 0) == end[:32]


def _crc_from_doc(crc: int, data: bytes) -> int:
    """The C function of docs/format.md section 1, line for line."""
    crc = ~crc & 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0xEDB88320 & (-(crc & 1) & 0xFFFFFFFF))
    return ~crc & 0xFFFFFFFF


def test_crc32_is_zlib_as_documented():
    assert S.crc32(b"123456789") == 0xCBF43926 == _crc_from_doc(0, b"123456789")
    assert S.crc32(b"") == 0 == _crc_from_doc(0, b"")
    data = bytes(range(256)) * 3
    assert _crc_from_doc(_crc_from_doc(0, data[:100]), data[100:]) == zlib.crc32(data) \
        == S.crc32(data)
    text = DOC.read_text(encoding="utf-8")
    assert "0xEDB88320" in text and "0xCBF43926" in text and "zlib.crc32" in text


# -- a stream written from the document's rules alone

def _doc_stream(hp: HParams, plan: list, *, optional_after: int | None = None,
                with_index: bool = True) -> tuple[bytes, list[int]]:
    """Header, TENSOR records (zero payloads), optional END/INDEX: docs/format.md sections 2-8.
    Returns the bytes and the offset of every TENSOR record and of END."""
    names, shapes = forward_order(hp), expected_shapes(hp)
    types = sorted({q.id: q for q in plan}.values(), key=lambda q: q.id)
    n_types, n_tensors = len(types), len(names)
    hf = 112 + 32 * n_types + n_tensors + _pad(n_tensors, 4)
    header_size = hf + 4 + _pad(hf + 4, 16)

    def record(kind, tensor, type_id, dims, payload):
        head = _record(kind, tensor, type_id, dims, len(payload))
        body = head + payload + struct.pack("<I", zlib.crc32(payload))
        return body + bytes(_pad(len(body), 16))

    body, offsets = bytearray(), []
    for i, (name, q) in enumerate(zip(names, plan)):
        shape = shapes[name]
        rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        offsets.append(header_size + len(body))
        body += record(1, i, q.id, shape, bytes(rows * shape[-1] // q.block_size
                                                * q.block_bytes))
        if i == optional_after:
            body += record(0x8123, 0, 0, (5,), b"hello")
    offsets.append(header_size + len(body))
    body += record(2, 0, 0, (), b"")
    body_size = header_size + len(body)
    tail = b""
    if with_index:
        tail = record(0x8001, 0, 0, (n_tensors + 1,), struct.pack(f"<{n_tensors + 1}Q",
                                                                  *offsets))
    lora = hp.lora
    fields = dict(
        major=1, minor=0, header_size=header_size, arch=int(hp.version),
        tokenizer=int(S.Tokenizer.UNKNOWN), flags=0, n_vocab=hp.n_vocab, n_embd=hp.n_embd,
        n_layer=hp.n_layer, ffn_size=hp.ffn_size, n_head=hp.n_head, head_size=hp.head_size,
        lora_maa=lora.get("maa", 0), lora_decay=lora.get("decay", 0), lora_w=lora.get("w", 0),
        lora_a=lora.get("a", 0), lora_v=lora.get("v", 0), lora_g=lora.get("g", 0),
        ln_eps=hp.ln_eps, gn_eps=hp.gn_eps, n_tensors=n_tensors, n_types=n_types,
        reserved0=0, emb_offset=header_size + 32,
        emb_row_bytes=hp.n_embd // plan[0].block_size * plan[0].block_bytes, reserved1=0,
        body_size=body_size, index_offset=body_size if with_index else 0)
    head = bytearray(header_size)
    struct.pack_into("<4sHHIBBH", head, 0, b"RWKS", 1, 0, header_size, int(hp.version),
                     int(S.Tokenizer.UNKNOWN), 0)
    for name, off in B.HEADER_OFFSETS.items():
        if name not in ("magic", "major", "minor", "header_size", "arch", "tokenizer", "flags"):
            fmt = {"ln_eps": "<f", "gn_eps": "<f", "n_types": "<H", "emb_offset": "<Q",
                   "body_size": "<Q", "index_offset": "<Q"}.get(name, "<I")
            struct.pack_into(fmt, head, off, fields[name])
    for k, q in enumerate(types):
        base = B.HEADER_FIXED_SIZE + k * B.TYPE_ENTRY_SIZE
        struct.pack_into("<BBHH", head, base, q.id, 0, q.block_size, q.block_bytes)
        name_off = base + B.TYPE_ENTRY_OFFSETS["name"]
        head[name_off:name_off + len(q.name)] = q.name.encode()
    plan_off = B.HEADER_FIXED_SIZE + n_types * B.TYPE_ENTRY_SIZE
    head[plan_off:plan_off + n_tensors] = bytes(q.id for q in plan)
    struct.pack_into("<I", head, hf, zlib.crc32(head[:hf]))
    return bytes(head) + bytes(body) + tail, offsets


@pytest.mark.parametrize("version", [RwkvVersion.V4, RwkvVersion.V7], ids=lambda v: v.name)
def test_stream_from_doc_rules_validates_and_matches_layout(tmp_path, version):
    from host.stream.layout import StreamLayout
    from host.stream.reader import validate

    hp = _hparams(version, 2)
    names, shapes = forward_order(hp), expected_shapes(hp)
    q4, f16, f32 = by_name("Q4_0"), by_name("F16"), by_name("F32")
    plan = [q4 if len(shapes[n]) == 2 and n not in ("emb.weight", "head.weight")
            and shapes[n][-1] % 32 == 0 else f16 if len(shapes[n]) == 2 else f32
            for n in names]
    data, offsets = _doc_stream(hp, plan)
    path = tmp_path / "doc.rwks"
    path.write_bytes(data)
    summary = validate(path)
    assert summary["ok"] and summary["tensors"] == len(names) and summary["index"]

    layout = StreamLayout(hp, dict(zip(names, plan)), tokenizer=S.Tokenizer.UNKNOWN,
                          shapes=shapes)
    assert layout.header == data[:layout.header_size]
    assert [r.offset for r in layout.records] + [layout.end_offset] == offsets
    assert layout.end_record() + layout.index_record() == data[layout.end_offset:]
    assert layout.total_size == len(data)
    emb = layout.records[0]
    t = SYMS["V"] - 1   # the last embedding row ends where the embedding's payload ends
    hdr = S.StreamHeader.parse(data[:layout.header_size]).fields.value
    assert hdr.emb_offset + (t + 1) * hdr.emb_row_bytes == emb.data_offset + emb.data_size

    # an unknown optional kind between records is skipped by its length; no INDEX is fine too
    data2, _ = _doc_stream(hp, plan, optional_after=4, with_index=False)
    path.write_bytes(data2)
    assert validate(path)["ok"]

"""A board in software: reads a stream front to back through one chunk buffer, in fixed RAM.

The board parses the stream the way a C board does, from the plain offsets and sizes in
formats/board_constants.py (never through construct), checks every record header and (by
default) every payload CRC as the bytes pass, and keeps only the buffers `arena.buffer_plan`
lists. The forward pass (forward.py) asks for tensors in stream order through `vector`,
`matvec` and `matvec_parts`.
"""
from __future__ import annotations

import math
import struct
import zlib

import numpy as np

from formats import board_constants as K
from formats.arch import HParams, RwkvVersion, expected_shapes, forward_order
from formats.errors import BadInput
from formats.quants import QuantType, stream_type

from .arena import Arena, buffer_plan, required_bytes

MIN_CHUNK = K.RECORD_HEADER_SIZE   # and at least one block of every type the stream uses


def _u(buf, field, fmt="<I"):
    return struct.unpack_from(fmt, buf, K.HEADER_OFFSETS[field])[0]


class StreamInfo:
    """What a board learns from a stream's header."""

    def __init__(self, hp: HParams, types: dict[int, QuantType], header_size: int,
                 emb_offset: int, emb_row_bytes: int, tokenizer: int):
        self.hparams = hp
        self.types = types
        self.header_size = header_size
        self.emb_offset = emb_offset
        self.emb_row_bytes = emb_row_bytes
        self.tokenizer = tokenizer
        self.names = forward_order(hp)
        self.shapes = expected_shapes(hp)
        emb_data = emb_row_bytes * hp.n_vocab
        end = emb_offset + emb_data + K.RECORD_CRC_SIZE
        self.after_embedding = end + (-end) % K.ALIGN


def read_through(source, buf: np.ndarray, n: int, crc: int) -> int:
    """Read n bytes through `buf`, a piece at a time, that the board only checks: the CRC-32
    continued over them."""
    while n:
        piece = buf[:min(n, len(buf))]
        source.readinto(piece)
        crc = zlib.crc32(piece, crc)
        n -= len(piece)
    return crc


def read_stream_info(source, fixed: np.ndarray, buf: np.ndarray) -> StreamInfo:
    """Parse and check the header: its fixed part into `fixed` (HEADER_FIXED_SIZE bytes), the
    tables through `buf` (at least MIN_CHUNK bytes)."""
    source.seek(0)
    source.readinto(fixed)
    crc = zlib.crc32(fixed)
    if bytes(fixed[:4]) != K.STREAM_MAGIC:
        raise BadInput(f"not a stream (magic {bytes(fixed[:4])!r})", offset=0)
    major = _u(fixed, "major", "<H")
    if major != K.STREAM_MAJOR:
        raise BadInput(f"stream major version {major}; this board reads {K.STREAM_MAJOR}",
                       offset=K.HEADER_OFFSETS["major"])
    try:
        version = RwkvVersion(_u(fixed, "arch", "<B"))
    except ValueError:
        raise BadInput(f"unknown architecture code {_u(fixed, 'arch', '<B')}",
                       offset=K.HEADER_OFFSETS["arch"]) from None
    lora = {RwkvVersion.V6: dict(maa=_u(fixed, "lora_maa"), decay=_u(fixed, "lora_decay")),
            RwkvVersion.V7: {k: _u(fixed, "lora_" + k) for k in "wavg"}}.get(version, {})
    hp = HParams(version, _u(fixed, "n_vocab"), _u(fixed, "n_embd"), _u(fixed, "n_layer"),
                 _u(fixed, "ffn_size"), _u(fixed, "n_head"), _u(fixed, "head_size"), lora)
    n_types, n_tensors = _u(fixed, "n_types", "<H"), _u(fixed, "n_tensors")
    # Nothing read so far is trusted before the header CRC: the sizes only bound the reads
    # (they must add up to header_size, within the stream), and the fields are interpreted
    # once the CRC has matched.
    header_size = _u(fixed, "header_size")
    tables = K.HEADER_FIXED_SIZE + n_types * K.TYPE_ENTRY_SIZE + n_tensors + (-n_tensors) % 4
    if tables + 4 + (-(tables + 4)) % K.ALIGN != header_size or \
            (source.size and header_size > source.size):
        raise BadInput(f"header_size {header_size} does not fit {n_types} type entries and "
                       f"{n_tensors} tensors (or the stream's {source.size} bytes)",
                       offset=K.HEADER_OFFSETS["header_size"])
    entries = []
    entry = buf[:K.TYPE_ENTRY_SIZE]
    for i in range(n_types):
        source.readinto(entry)
        crc = zlib.crc32(entry, crc)
        entries.append(bytes(entry))
    # the per-tensor plan: a board needs only CRC it
    crc = read_through(source, buf, n_tensors + (-n_tensors) % 4, crc)
    stored = buf[:4]
    source.readinto(stored)
    if struct.unpack("<I", stored)[0] != crc & 0xFFFFFFFF:
        raise BadInput("header CRC-32 mismatch", offset=source.pos - 4)
    if n_tensors != len(forward_order(hp)):
        raise BadInput(f"header lists {n_tensors} tensors, RWKV v{version.label} has "
                       f"{len(forward_order(hp))}", offset=K.HEADER_OFFSETS["n_tensors"])
    types = {}
    for i, entry in enumerate(entries):
        type_id = entry[K.TYPE_ENTRY_OFFSETS["id"]]
        name = entry[8:8 + K.TYPE_NAME_SIZE].rstrip(b"\0").decode("ascii", "replace")
        bs, bb = struct.unpack_from("<HH", entry, K.TYPE_ENTRY_OFFSETS["block_size"])
        off = K.HEADER_FIXED_SIZE + i * K.TYPE_ENTRY_SIZE

        def refuse(_why, name=name, type_id=type_id, off=off):
            raise BadInput(f"the stream uses type {name!r} (id {type_id}), which this board "
                           "does not implement", offset=off)
        types[type_id] = stream_type(type_id, name, bs, bb, struct.unpack_from(
            "<II", entry, K.TYPE_ENTRY_OFFSETS["param0"]), refuse,
            flags=entry[K.TYPE_ENTRY_OFFSETS["flags"]])
    return StreamInfo(hp, types, header_size, _u(fixed, "emb_offset", "<Q"),
                      _u(fixed, "emb_row_bytes"), _u(fixed, "tokenizer", "<B"))


XIP_RUN = 4 << 20


class Board:
    """A simulated board: RAM budget, chunk buffer, recurrent state, and a stream source."""

    def __init__(self, source, *, ram: int | None = None, psram: int = 0, chunk: int = 4096,
                 mode: str = "float", logits: bool = True, check_crc: bool = True,  # once each
                 columns: int = 1, batch: bool = False, xip: bool = False,
                 every_logit: bool = False, top_k: int = 0):
        """`columns`: tokens per pass over the weights -- K prompt tokens of one sequence
        (sequence mode), or with `batch` one token of each of K independent sequences.
        `xip`: the stream is memory-mapped (installed in XIP flash): weights are read in place,
        a chunk at a time, instead of being copied into the chunk buffer.
        `every_logit`: sequence passes keep every token's logits (eval_logits).
        `top_k` (without logits): keep the k largest logits as the head streams, for a sampler
        (`self.sampler(candidate_logits) -> index`) to pick from.
        `observe(name, x)`, when set, sees the input (K, n_in) of every matrix-vector product."""
        if chunk < MIN_CHUNK:
            raise BadInput(f"--chunk {chunk} is below the minimum of {MIN_CHUNK} bytes (a "
                           "record header)")
        if mode not in ("float", "int8"):
            raise BadInput(f"--mode must be float or int8, not {mode!r}")
        self.source = source
        if xip and not source.mapped:
            raise BadInput("--xip needs a memory-mapped stream (a stream file), not a link or a "
                           "checkpoint quantized on the fly")
        self.xip = xip
        self.int8 = mode == "int8"
        self.check_crc = check_crc
        # A C board parses the header into a static struct before it carves its arena; the
        # same bytes are counted in the arena as the `header` buffer.
        staging = np.zeros(chunk, np.uint8)
        self.info = read_stream_info(source, np.zeros(K.HEADER_FIXED_SIZE, np.uint8), staging)
        self.hp = self.info.hparams
        largest = max(q.largest_block for q in self.info.types.values())
        if chunk < largest:
            raise BadInput(f"--chunk {chunk} cannot hold one {largest}-byte block of this "
                           "stream's types")
        if columns < 1:
            raise BadInput("the number of columns (sequence length or batch) must be >= 1")
        self.columns = columns
        self.batch = columns if batch else 1
        self.every_logit = every_logit and logits
        self.observe = None
        self.top_k = 0 if logits else top_k
        self.sampler = None
        self.buffer_plan = buffer_plan(self.hp, chunk, logits, columns, self.batch,
                                       self.every_logit, self.top_k)
        self.ram_needed = required_bytes(self.buffer_plan)
        self.arena = Arena(self.buffer_plan, self.ram_needed if ram is None else ram, psram)
        self.chunk = self.arena["chunk"]
        self._verified: set[int] = set()     # records whose payload CRC this board has checked
        self._have = self._left = 0          # variable-size blocks: carried and unread bytes
        self.emb_type = self._read_embedding_header()
        self.tokens = 0
        self.passes = 0
        self.next_token = None          # set by a pass when logits stream through a sampler
        self.temperature, self.rng = 0.0, np.random.default_rng()
        self.reset()

    # -- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """rwkv.cpp's initial state: zeros, except v4's pp = -1e30."""
        states = self.arena["state"]
        states[:] = 0
        if self.hp.version is RwkvVersion.V4:
            states.reshape(self.batch, self.hp.n_layer, 5, -1)[:, :, 4, :] = -1e30

    @property
    def state(self) -> np.ndarray:
        """The state of sequence 0 (the only one outside batch mode), rwkv.cpp's flat layout."""
        return self.arena["state"][0]

    @property
    def states(self) -> np.ndarray:
        """(batch, state floats)"""
        return self.arena["state"]

    def load_state(self, values, sequence: int = 0) -> None:
        values = np.asarray(values, np.float32).reshape(-1)
        if values.size != self.state.size:
            raise BadInput(f"state has {values.size} floats; this model's has {self.state.size}")
        self.arena["state"][sequence] = values

    # -- reading the stream -------------------------------------------------------------------
    def start_pass(self) -> None:
        self._next = 0

    def read_embedding(self, tokens, out: np.ndarray) -> None:
        """out[j] = emb[tokens[j]]: rows at offsets the header gives; then skip the record."""
        q = self.emb_type
        row = self.info.emb_row_bytes
        for j, token in enumerate(tokens):
            if not 0 <= token < self.hp.n_vocab:
                raise BadInput(f"token {token} is outside the vocabulary "
                               f"(0..{self.hp.n_vocab - 1})")
            self.source.seek(self.info.emb_offset + token * row)
            self._read_blocks_into(q, self.hp.n_embd // q.block_size, out[j], crc=False)
        self.source.seek(self.info.after_embedding)
        self._next = 1

    def _read_embedding_header(self) -> QuantType:
        """The embedding's record header, read once at start-up: its type sizes every row."""
        self.source.seek(self.info.header_size)
        head = self.chunk[:K.RECORD_HEADER_SIZE]
        self.source.readinto(head)
        q, size = self._check_record_header(head, 0, self.info.header_size)
        if self.info.emb_offset != self.info.header_size + K.RECORD_HEADER_SIZE or \
                self.info.emb_row_bytes != q.row_bytes(self.hp.n_embd):
            raise BadInput("the header's embedding offset or row size disagrees with the "
                           "embedding record", offset=K.HEADER_OFFSETS["emb_offset"])
        if self.check_crc:
            # passes read single rows of it, so its CRC is checked once, here
            self._record = (self.info.names[0], self.info.header_size, size, 0)
            self._crc = 0
            self._verifying = True
            for _ in self._blocks(q, size // q.block_bytes):
                pass
            self._end()
        return q

    def _check_record_header(self, head, index, offset):
        name = self.info.names[index]
        if struct.unpack_from("<I", head, 28)[0] != zlib.crc32(head[:28]) & 0xFFFFFFFF:
            raise BadInput("record header CRC-32 mismatch", offset=offset, tensor=name)
        kind, tensor, type_id, ndim = struct.unpack_from("<HHBB", head, 0)
        if kind != K.KIND_TENSOR or tensor != index:
            raise BadInput(f"expected the record of tensor {index}, found kind {kind} tensor "
                           f"{tensor}", offset=offset, tensor=name)
        if type_id not in self.info.types:
            raise BadInput(f"type id {type_id} is not in the stream's type table", offset=offset,
                           tensor=name)
        dims = struct.unpack_from("<3I", head, K.RECORD_OFFSETS["dims"])
        if tuple(dims[:ndim]) != self.info.shapes[name]:
            raise BadInput(f"shape {dims[:ndim]} where {self.info.shapes[name]} belongs",
                           offset=offset, tensor=name)
        return self.info.types[type_id], struct.unpack_from("<I", head, 20)[0]

    def _begin(self, suffix: str) -> QuantType:
        index = self._next
        name = self.info.names[index]
        assert name.endswith(suffix), (name, suffix)   # forward code follows forward_order
        while True:
            offset = self.source.pos
            head = self._small(K.RECORD_HEADER_SIZE)
            kind, = struct.unpack_from("<H", head, 0)
            if kind < K.KIND_OPTIONAL_MIN:
                break
            size, = struct.unpack_from("<I", head, 20)          # optional record: skip it
            end = offset + K.RECORD_HEADER_SIZE + size + K.RECORD_CRC_SIZE
            self.source.seek(end + (-end) % K.ALIGN)
        q, size = self._check_record_header(head, index, offset)
        self._record = (name, offset, size, index)
        self._crc = 0
        # Each payload CRC is checked the first time the board reads the record (a board
        # verifies its installed stream once); later passes trust it.
        self._verifying = self.check_crc and index not in self._verified
        self._next += 1
        self._have = self._left = 0
        if q.variable:
            self._skip_row_table(size)
        return q

    def _small(self, n: int):
        """The next n bytes (a record header or tail): in place under XIP, else through the
        chunk."""
        if self.xip:
            return self.source.view(n)
        view = self.chunk[:n]
        self.source.readinto(view)
        return view

    def _blocks(self, q: QuantType, n_blocks: int, crc: bool = True):
        """Yield (chunk view, block count) runs of whole blocks, as many as the chunk holds."""
        if q.variable:
            yield from self._variable_blocks(q, n_blocks)
            return
        # In place (XIP) nothing is copied, so runs need not stop at the chunk's size: a run
        # up to XIP_RUN bytes is one kernel call (the output is the same however a matrix is
        # split: the kernels carry a cut row across runs)
        per = (max(len(self.chunk), XIP_RUN) if self.xip else len(self.chunk)) // q.block_bytes
        while n_blocks:
            nb = min(per, n_blocks)
            if self.xip:
                view = self.source.view(nb * q.block_bytes)
            else:
                view = self.chunk[:nb * q.block_bytes]
                self.source.readinto(view)
            if crc and self._verifying:
                self._crc = zlib.crc32(view, self._crc)
            yield view, nb
            n_blocks -= nb

    def _variable_blocks(self, q: QuantType, n_blocks: int):
        """Runs of whole variable-size blocks (a record's rows, after its row-offset table): fill
        the chunk, hand over the whole blocks at its front, move the cut block's bytes to the
        front and fill again; those bytes wait there for the next run of the same record. A
        board reading front to back needs no row offsets: every block says its own size. A
        block that is not whole in a full chunk is a bad stream."""
        chunk = self.chunk
        name = self._record[0]
        while n_blocks:
            if self.xip:        # in place: look at the next chunk's worth, take whole blocks
                view = self.source.peek(min(len(chunk), self._left))
                nb, used = q.count_blocks(view, n_blocks)
                self._check_whole(q, nb, name, 0)
                view = self.source.view(used)
                if self._verifying:
                    self._crc = zlib.crc32(view, self._crc)
                self._left -= used
            else:
                take = min(len(chunk) - self._have, self._left)
                if take:
                    piece = chunk[self._have:self._have + take]
                    self.source.readinto(piece)
                    if self._verifying:
                        self._crc = zlib.crc32(piece, self._crc)
                    self._left -= take
                    self._have += take
                nb, used = q.count_blocks(chunk[:self._have], n_blocks)
                self._check_whole(q, nb, name, self._have)
                view = chunk[:used]
            yield view, nb
            if not self.xip:
                chunk[:self._have - used] = chunk[used:self._have]
                self._have -= used
            n_blocks -= nb

    def _check_whole(self, q: QuantType, nb: int, name: str, have: int) -> None:
        if nb == 0:
            raise BadInput(f"a {q.name} block does not fit in the {len(self.chunk)}-byte chunk, "
                           "or the payload ends inside a block", offset=self.source.pos - have,
                           tensor=name)

    def _skip_row_table(self, size: int) -> None:
        """Read past a variable-size record's row-offset table (for its CRC only), and set up
        the carry of the block reader."""
        name = self._record[0]
        n_rows = math.prod(self.info.shapes[name][:-1])
        rest = 4 * (n_rows + 1)
        self._have, self._left = 0, size - rest
        if self._left < 0:
            raise BadInput(f"a payload of {size} bytes cannot hold the row-offset table of "
                           f"{n_rows} rows", offset=self.source.pos, tensor=name)
        crc = read_through(self.source, self.chunk, rest, self._crc)
        if self._verifying:
            self._crc = crc

    def _end(self) -> None:
        name, offset, size, index = self._record
        if self._have or self._left:
            raise BadInput(f"{self._have + self._left} bytes after the last block of the "
                           "record", offset=self.source.pos - self._have, tensor=name)
        end = offset + K.RECORD_HEADER_SIZE + size + K.RECORD_CRC_SIZE
        tail = self._small(K.RECORD_CRC_SIZE + (-end) % K.ALIGN)
        if self._verifying:
            if struct.unpack_from("<I", tail)[0] != self._crc & 0xFFFFFFFF:
                raise BadInput("payload CRC-32 mismatch", offset=offset + K.RECORD_HEADER_SIZE,
                               tensor=name)
            self._verified.add(index)

    def _read_blocks_into(self, q: QuantType, n_blocks: int, out: np.ndarray, crc=True):
        pos = 0
        for view, nb in self._blocks(q, n_blocks, crc):
            q.dequantize_into(view, out[pos:pos + nb * q.block_size])
            pos += nb * q.block_size

    def vector(self, suffix: str, out: np.ndarray) -> np.ndarray:
        """Read the next tensor (a small one) whole into `out` (flattened)."""
        q = self._begin(suffix)
        n = math.prod(self.info.shapes[self._record[0]])
        out = out.reshape(-1)[:n]
        self._read_blocks_into(q, n // q.block_size, out)
        self._end()
        return out

    def matvec(self, suffix: str, x: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[j] = W @ x[j] for each column j, W the next tensor, streamed row by row through
        the chunk buffer once for all columns.                  x: (K, in), out: (K, rows)"""
        return self.matvec_parts(suffix, [(x, out)])[0]

    def matvec_parts(self, suffix: str, parts) -> list:
        """The next tensor as consecutive row groups, each with its own input: out_i = W_i @ x_i."""
        q = self._begin(suffix)
        shape = self.info.shapes[self._record[0]]
        assert sum(o.shape[-1] for _, o in parts) == math.prod(shape[:-1]), (shape, suffix)
        for x, out in parts:
            assert x.shape[-1] == shape[-1] and x.shape[0] == out.shape[0], (x.shape, shape)
            if self.observe is not None:
                self.observe(self._record[0], x)
            self._matvec_rows(q, x, out)
        self._end()
        return [o for _, o in parts]

    def _matvec_rows(self, q: QuantType, x: np.ndarray, out: np.ndarray) -> None:
        a = self.arena
        k, n = x.shape
        nq = -(-n // 32)
        xf, xq = a["act_f"][:k, :n], a["act_q"][:k, :nq * 32]
        xd, xs, lanes = a["act_d"][:k], a["act_s"][:k], a["lanes"][:k]
        for j in range(k):
            q.prepare_activation(self.int8, x[j], xf[j], xq[j], xd[j], xs[j])
        out[:] = 0
        bpr = n // q.block_size
        first = 0
        runs = [q.matvec_runner(self.int8, bpr, xf[j], xq[j], xd[j], xs[j], out[j], lanes[j])
                for j in range(k)]
        for view, nb in self._blocks(q, out.shape[1] * bpr):
            for run in runs:
                run(view, nb, first)
            first += nb

    def sample_head(self, suffix: str, x: np.ndarray) -> int:
        """The next token from W @ x without storing the logits: rows stream through a small
        window; greedy keeps the running argmax, a temperature adds Gumbel noise per row
        (argmax of logit/T + Gumbel is an exact sample from softmax(logit/T))."""
        q = self._begin(suffix)
        a = self.arena
        n = len(x)
        nq = -(-n // 32)
        xf, xq, xd, xs = a["act_f"][0, :n], a["act_q"][0, :nq * 32], a["act_d"][0], a["act_s"][0]
        q.prepare_activation(self.int8, x, xf, xq, xd, xs)
        window, lanes = a["head_rows"], a["lanes"][0]
        bpr = n // q.block_size
        row_bytes = q.largest_block * bpr if q.variable else q.row_bytes(n)
        rows_per = max(1, min(len(window), len(self.chunk) // row_bytes))
        best, best_score = -1, -np.inf
        n_rows = self.hp.n_vocab
        kept = 0
        if self.top_k:
            top, top_ids = a["top_logits"], a["top_ids"]
        for r0 in range(0, n_rows, rows_per):
            rows = min(rows_per, n_rows - r0)
            out = window[:rows]
            out[:] = 0
            first = 0
            run = q.matvec_runner(self.int8, bpr, xf, xq, xd, xs, out, lanes)
            for view, nb in self._blocks(q, rows * bpr):
                run(view, nb, first)
                first += nb
            if self.top_k:      # merge this window into the running top k
                vals = np.concatenate([top[:kept], out])
                ids = np.concatenate([top_ids[:kept], np.arange(r0, r0 + rows, dtype=np.int32)])
                if len(vals) > self.top_k:
                    keep = np.argpartition(-vals, self.top_k - 1)[:self.top_k]
                    vals, ids = vals[keep], ids[keep]
                kept = len(vals)
                top[:kept], top_ids[:kept] = vals, ids
                continue
            score = out / self.temperature + self.rng.gumbel(size=rows) if self.temperature \
                else out
            j = int(np.argmax(score))
            if score[j] > best_score:
                best, best_score = r0 + j, score[j]
        self._end()
        if self.top_k:
            order = np.argsort(-top[:kept], kind="stable")   # the sampler sees them sorted
            return int(top_ids[order][self.sampler(top[:kept][order])])
        return best

    # -- the model ---------------------------------------------------------------------------
    def eval(self, token: int) -> np.ndarray:
        """One token through the model; returns the logits buffer (valid until the next call)."""
        return self.eval_sequence([token])

    def eval_sequence(self, tokens) -> np.ndarray:
        """Tokens of one sequence, `columns` of them per pass over the weights; returns the
        logits after the last one (only that token goes through the head)."""
        from .forward import forward_pass
        if self.batch > 1:
            raise BadInput("this board runs a batch: use eval_batch")
        tokens = list(tokens)
        for start in range(0, len(tokens), self.columns):
            forward_pass(self, tokens[start:start + self.columns], sequence=True)
            self.passes += 1
        self.tokens += len(tokens)
        return self.arena["logits"][0] if "logits" in self.arena.buffers else None

    def eval_logits(self, tokens) -> np.ndarray:
        """The logits after every token of one sequence, (len(tokens), n_vocab): K tokens a
        pass (needs every_logit)."""
        from .forward import forward_pass
        if not self.every_logit or self.batch > 1:
            raise BadInput("eval_logits needs a board made with every_logit=True, not a batch")
        tokens = list(tokens)
        out = np.empty((len(tokens), self.hp.n_vocab), np.float32)
        for start in range(0, len(tokens), self.columns):
            part = tokens[start:start + self.columns]
            forward_pass(self, part, sequence=True)
            out[start:start + len(part)] = self.arena["logits"][:len(part)]
            self.passes += 1
        self.tokens += len(tokens)
        return out

    def eval_batch(self, tokens) -> np.ndarray:
        """One token for each of the batch's sequences in one pass; logits (batch, n_vocab)."""
        from .forward import forward_pass
        if len(tokens) != self.batch:
            raise BadInput(f"this board runs a batch of {self.batch}, got {len(tokens)} tokens")
        forward_pass(self, list(tokens), sequence=False)
        self.passes += 1
        self.tokens += len(tokens)
        return self.arena["logits"]

    def close(self) -> None:
        self.source.close()

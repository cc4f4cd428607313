"""Tokenizers, chosen by vocabulary size (`--tokenizer` overrides). Packages, not hand-written."""
from __future__ import annotations

from formats.errors import UsageError


class ByteTokenizer:
    """Vocabulary 256: a token is a byte."""

    name = "bytes"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode_bytes(self, tokens) -> bytes:
        return bytes(tokens)


class WorldTokenizer:
    """The RWKV World tokenizer (65536), from the `pyrwkv-tokenizer` package's vocabulary."""

    name = "world"

    def __init__(self):
        try:
            import pyrwkv_tokenizer
        except ImportError:
            raise UsageError("the RWKV World tokenizer needs the package pyrwkv-tokenizer: "
                             "pip install pyrwkv-tokenizer") from None
        self._t = pyrwkv_tokenizer.RWKVTokenizer()

    def encode(self, text: str) -> list[int]:
        return list(self._t.encode(text))

    def decode_bytes(self, tokens) -> bytes:
        return self._t.decode(list(tokens)).encode("utf-8")


class HFTokenizer:
    """A `tokenizer.json` (e.g. the 20B/Pile tokenizer of RWKV-4 models) via `tokenizers`."""

    name = "tokenizer.json"

    def __init__(self, path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UsageError("a tokenizer.json needs the package tokenizers: "
                             "pip install tokenizers") from None
        try:
            self._t = Tokenizer.from_file(str(path))
        except Exception as e:
            raise UsageError(f"cannot load tokenizer {path}: {e}") from None

    def encode(self, text: str) -> list[int]:
        return self._t.encode(text).ids

    def decode_bytes(self, tokens) -> bytes:
        return self._t.decode(list(tokens)).encode("utf-8")


def get_tokenizer(n_vocab: int, choice: str | None = None):
    """`choice`: bytes, world, or a path to a tokenizer.json; None picks by vocabulary size."""
    if choice is None:
        if n_vocab == 256:
            return ByteTokenizer()
        if n_vocab == 65536:
            return WorldTokenizer()
        if n_vocab == 50277:
            raise UsageError("RWKV-4 Pile models use the 20B tokenizer: pass --tokenizer "
                             "PATH/20B_tokenizer.json (distributed with the model)")
        raise UsageError(f"no tokenizer known for a {n_vocab}-token vocabulary: pass "
                         "--tokenizer bytes|world|PATH/tokenizer.json, or --prompt-tokens")
    if choice == "bytes":
        return ByteTokenizer()
    if choice == "world":
        return WorldTokenizer()
    return HFTokenizer(choice)


class StreamingDecoder:
    """Text of a growing token list, emitted as soon as it forms whole UTF-8 characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.emitted = 0

    def push(self, token: int) -> bytes:
        self.tokens.append(token)
        data = self.tokenizer.decode_bytes(self.tokens)
        # hold back an incomplete UTF-8 sequence (decoders show it as U+FFFD)
        text = data.decode("utf-8", "replace")
        if text.endswith("\ufffd"):
            return b""
        new = data[self.emitted:]
        self.emitted = len(data)
        return new

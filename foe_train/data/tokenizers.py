"""Tokenizers with exactly what megatron's GPTDataset reads (vocab_size, eod, pad,
unique_identifiers) plus encode/decode: raw UTF-8 bytes with nothing to download, a byte-level
BPE trained here, or a local Hugging Face tokenizer.json (no transformers needed)."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from typing import Literal

from foe_train.config import ConfigError

EOD_TOKEN = "<|endoftext|>"
# Tried in order when a Hugging Face tokenizer has no EOD_TOKEN: the usual end-of-text names.
_EOD_FALLBACKS = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "[SEP]")


class Tokenizer:
    """Base: subclasses fill kind, vocab_size, eod, pad and a content hash for cache keys."""

    kind: str
    vocab_size: int
    eod: int
    pad: int
    digest: str

    @property
    def name(self) -> str:
        """Short id for file names: the kind plus a hash of the vocabulary when it has one."""
        return self.kind if not self.digest else f"{self.kind}-{self.digest[:10]}"

    @property
    def unique_identifiers(self) -> OrderedDict:
        """megatron hashes this into its index-cache names, so a new vocabulary rebuilds them."""
        return OrderedDict(
            [("class", "foe_train.Tokenizer"), ("kind", self.kind), ("digest", self.digest),
             ("vocab_size", self.vocab_size), ("eod", self.eod)]
        )

    def encode(self, text: str) -> list[int]:
        raise NotImplementedError

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes 0..255 and eod 256: built in, so the default corpus needs no files."""

    kind, vocab_size, eod, pad, digest = "byte", 257, 256, 256, ""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out, chunk = [], bytearray()
        for i in ids:
            if i == self.eod:
                out += [chunk.decode("utf-8", errors="replace"), EOD_TOKEN]
                chunk = bytearray()
            else:
                chunk.append(i)
        return "".join(out) + chunk.decode("utf-8", errors="replace")


class HFTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json (BPE trained here, or any Hugging Face tokenizer)."""

    def __init__(self, path: str, kind: Literal["bpe", "hf"], field: str = "data.tokenizer_path"):
        from tokenizers import Tokenizer as _Tok

        self.kind, self.path = kind, path
        try:
            self._tok = _Tok.from_file(path)
        except Exception as exc:  # the tokenizers error text is one Rust line
            raise ConfigError(f"{field}: cannot load {path} as a tokenizer.json ({exc})") from None
        with open(path, "rb") as f:
            self.digest = hashlib.sha256(f.read()).hexdigest()
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        found = [t for t in _EOD_FALLBACKS if self._tok.token_to_id(t) is not None]
        if not found:
            raise ConfigError(
                f"{field}: {path} has no end-of-text token (tried {', '.join(_EOD_FALLBACKS)}); "
                f"add '{EOD_TOKEN}' as a special token"
            )
        self.eod = self._tok.token_to_id(found[0])
        self.pad = self.eod

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def build_tokenizer(kind: Literal["byte", "bpe", "hf"], path: str | None = None) -> Tokenizer:
    """The tokenizer a recipe names (data.tokenizer / data.tokenizer_path)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind not in ("bpe", "hf"):
        raise ConfigError(f"data.tokenizer: unknown kind {kind!r}; use byte, bpe or hf")
    if not path:
        raise ConfigError(f"data.tokenizer_path: tokenizer {kind} needs a path; set it")
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
        raise ConfigError(f"data.tokenizer_path: {path} does not exist; pass a tokenizer.json "
                          f"or a directory holding one")
    return HFTokenizer(path, kind)


def train_bpe(files: Sequence[str], vocab_size: int, out_path: str) -> Tokenizer:
    """Train a byte-level BPE on local plain-text files and save it as out_path."""
    return train_bpe_from_iterator(_lines(files), vocab_size, out_path)


def train_bpe_from_iterator(texts: Iterable[str], vocab_size: int, out_path: str) -> Tokenizer:
    """Train a byte-level BPE (all 256 bytes + EOD_TOKEN always in the vocabulary) on texts;
    written to a temporary name first so a crash never leaves a partial tokenizer.json."""
    from tokenizers import Tokenizer as _Tok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ConfigError(f"--train-bpe: vocab size {vocab_size} is below the {len(alphabet) + 1}"
                          f" byte symbols + end-of-text; pick a larger size")
    tok = _Tok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tmp = f"{out_path}.tmp-{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out_path)
    return HFTokenizer(out_path, "bpe")


def _lines(files: Sequence[str]) -> Iterable[str]:
    for path in files:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f

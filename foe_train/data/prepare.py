"""Turn local text/json/jsonl/parquet files into megatron indexed datasets (PREFIX.bin/.idx),
one document per record with eod appended; and the embedded default corpus, the Python
standard library's own source, so a recipe without data still trains on real text offline.

Every dataset is written under temporary names and renamed at the end (.idx last), so a
crash never leaves a PREFIX.idx beside a partial PREFIX.bin."""

from __future__ import annotations

import fcntl
import hashlib
import os
import sys
import tempfile
import uuid
from collections.abc import Iterable, Sequence

import numpy as np

from foe_train.arguments import OneLineParser, at_least
from foe_train.config import ConfigError
from foe_train.data.tokenizers import Tokenizer, build_tokenizer, train_bpe_from_iterator

# datasets builder per file extension (a compression suffix may follow).
_BUILDERS = {".txt": "text", ".text": "text", ".json": "json", ".jsonl": "json",
             ".parquet": "parquet"}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst")

# Default corpus: this many bytes of stdlib source, files over _MAX_FILE_BYTES skipped (one
# file, pydoc_data/topics.py, would be a quarter of it).
DEFAULT_CORPUS_BYTES = 3_000_000
_MAX_FILE_BYTES = 256_000
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
                "ensurepip", "__pycache__"}


class DataError(ConfigError):
    """Bad data input, as one line naming the argument or field."""


def write_indexed_dataset(documents: Iterable[Sequence[int]], output_prefix: str,
                          eod: int) -> int:
    """Write documents (token ids; eod is appended to each) as PREFIX.bin/.idx, atomically.
    Returns the document count."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{output_prefix}.tmp-{uuid.uuid4().hex[:12]}"  # unique across hosts sharing a disk
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=np.int32)
    count = 0
    try:
        for doc in documents:
            arr = np.empty(len(doc) + 1, dtype=np.int32)
            arr[:-1] = doc
            arr[-1] = eod
            builder.add_document(arr, [arr.size])
            count += 1
            if count % 100_000 == 0:
                print(f"prepare: {count} documents", flush=True)
        builder.finalize(tmp + ".idx")
    except BaseException:
        builder.data_file.close()
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
        raise
    if os.path.exists(output_prefix + ".idx"):
        os.remove(output_prefix + ".idx")
    os.replace(tmp + ".bin", output_prefix + ".bin")
    os.replace(tmp + ".idx", output_prefix + ".idx")
    return count


def _builder_for(path: str) -> str | None:
    stem = path
    for ext in _COMPRESSED:
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    return _BUILDERS.get(os.path.splitext(stem)[1].lower())


def _looks_like_file(name: str) -> bool:
    """Paths exist, start with / . ~ or carry an extension; anything else is a hub name."""
    return (os.path.exists(name) or name.startswith(("/", ".", "~"))
            or bool(os.path.splitext(os.path.basename(name))[1]))


def _load(name: str, cache_dir: str, text_key: str):
    """One input as a datasets.Dataset whose text column is text_key."""
    import datasets

    name = os.path.expanduser(name)
    if not _looks_like_file(name):
        try:
            ds = datasets.load_dataset(name, split="train", cache_dir=cache_dir)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"--input: {name} is not a local file and loading it as a hub "
                            f"dataset failed ({first})") from None
    else:
        if not os.path.isfile(name):
            raise DataError(f"--input: {name} is not an existing file")
        builder = _builder_for(name)
        if builder is None:
            raise DataError(f"--input: {name} has an unknown extension; use one of "
                            f"{', '.join(sorted(_BUILDERS))} (optionally compressed)")
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = datasets.load_dataset(builder, data_files=os.path.abspath(name), split="train",
                                       cache_dir=cache_dir, **kwargs)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise DataError(f"--input: cannot read {name} as {builder} ({first})") from None
        if builder == "text":
            return ds.rename_column("text", text_key) if text_key != "text" else ds
    if text_key not in ds.column_names:
        raise DataError(f"--text-key: {name} has no column {text_key!r} "
                        f"(columns: {', '.join(ds.column_names)}); pass --text-key")
    return ds


def _tokenize(batch: dict, tokenizer: Tokenizer, text_key: str) -> dict:
    texts = [t if isinstance(t, str) else "" for t in batch[text_key]]
    return {"input_ids": tokenizer.encode_batch(texts)}


def _arrow_documents(ds) -> Iterable[np.ndarray]:
    """Token arrays of a tokenized dataset, read as Arrow list offsets (no Python int lists)."""
    for table in ds.with_format("arrow").iter(batch_size=4096):
        col = table.column("input_ids").combine_chunks()
        offsets = col.offsets.to_numpy()
        values = col.values.to_numpy(zero_copy_only=False)
        for i in range(len(offsets) - 1):
            yield values[offsets[i]: offsets[i + 1]]


def prepare_dataset(inputs: list[str], output_prefix: str, tokenizer: Tokenizer | None,
                    text_key: str = "text", num_proc: int = 1,
                    bpe_vocab_size: int | None = None) -> str:
    """Tokenize inputs (in order, one document per record) into output_prefix.bin/.idx.
    With bpe_vocab_size, first train a BPE on the inputs (saved as PREFIX.tokenizer.json) and
    use it instead of tokenizer. Returns the prefix."""
    if not inputs:
        raise DataError("--input: no input files given")
    if tokenizer is None and bpe_vocab_size is None:
        raise DataError("--tokenizer: no tokenizer given; pass one or --train-bpe")
    out_dir = os.path.dirname(os.path.abspath(output_prefix))
    os.makedirs(out_dir, exist_ok=True)
    # The datasets Arrow cache lives in a scratch folder beside the output and goes with it.
    with tempfile.TemporaryDirectory(prefix=".hf-cache-", dir=out_dir) as cache:
        loaded = [(name, _load(name, cache, text_key)) for name in inputs]
        if bpe_vocab_size is not None:
            texts = (t for _, ds in loaded for batch in ds.iter(batch_size=1024)
                     for t in batch[text_key] if isinstance(t, str))
            tokenizer = train_bpe_from_iterator(texts, bpe_vocab_size,
                                                output_prefix + ".tokenizer.json")
            print(f"prepare: trained BPE ({tokenizer.vocab_size} tokens) -> "
                  f"{output_prefix}.tokenizer.json", flush=True)

        def documents() -> Iterable[np.ndarray]:
            for name, ds in loaded:
                tokenized = ds.map(
                    _tokenize, batched=True, num_proc=num_proc if num_proc > 1 else None,
                    remove_columns=ds.column_names, desc=f"tokenize {os.path.basename(name)}",
                    fn_kwargs={"tokenizer": tokenizer, "text_key": text_key},
                )
                print(f"prepare: {name}: {len(tokenized)} documents", flush=True)
                yield from _arrow_documents(tokenized)

        count = write_indexed_dataset(documents(), output_prefix, tokenizer.eod)
    print(f"prepare: wrote {count} documents to {output_prefix}.bin/.idx", flush=True)
    return output_prefix


def _stdlib_selection(max_bytes: int) -> list[tuple[str, str]]:
    """(relative path, absolute path) of the stdlib .py files in the default corpus: files
    taken in a fixed hash order until max_bytes, so every package contributes, then sorted."""
    root = os.path.dirname(os.__file__)
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _STDLIB_SKIP)
        for fn in filenames:
            if fn.endswith(".py"):
                path = os.path.join(dirpath, fn)
                rel = os.path.relpath(path, root).replace(os.sep, "/")
                size = os.path.getsize(path)
                if 0 < size <= _MAX_FILE_BYTES:
                    found.append((hashlib.sha256(rel.encode()).hexdigest(), rel, path, size))
    chosen, total = [], 0
    for _, rel, path, size in sorted(found):
        if total >= max_bytes:
            break
        chosen.append((rel, path))
        total += size
    return sorted(chosen)


def default_corpus(cache_dir: str, tokenizer: Tokenizer) -> str:
    """Prefix of the embedded default corpus (about DEFAULT_CORPUS_BYTES of the Python standard
    library's source, one document per file), prepared on first use under cache_dir and reused.
    Safe for many ranks at once: a file lock lets one prepare while the others wait. The
    progress line goes to stderr: stdout belongs to the command (``foe-bench --json``)."""
    cache_dir = os.path.expanduser(cache_dir)
    os.makedirs(cache_dir, exist_ok=True)
    selection = _stdlib_selection(DEFAULT_CORPUS_BYTES)
    texts, digest = [], hashlib.sha256()
    for rel, path in selection:
        with open(path, "rb") as f:
            raw = f.read()
        digest.update(rel.encode() + b"\0" + raw + b"\0")
        texts.append(raw.decode("utf-8", errors="replace"))
    prefix = os.path.join(cache_dir, f"stdlib-{tokenizer.name}-{digest.hexdigest()[:12]}")
    with open(prefix + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (os.path.isfile(prefix + ".idx") and os.path.isfile(prefix + ".bin")):
            print(f"prepare: default corpus, {len(texts)} stdlib files "
                  f"({sum(map(len, texts)) / 1e6:.1f} MB) -> {prefix}", file=sys.stderr, flush=True)
            write_indexed_dataset(tokenizer.encode_batch(texts), prefix, tokenizer.eod)
    return prefix


def main(argv: list[str] | None = None) -> None:
    """foe-prepare-data: tokenize local files into a megatron indexed dataset."""
    ap = OneLineParser(prog="foe-prepare-data", description=main.__doc__)
    ap.add_argument("--input", nargs="+", required=True, metavar="FILE",
                    help="text (.txt: one document per file), json/jsonl or parquet files")
    ap.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    ap.add_argument("--tokenizer", choices=["byte", "bpe", "hf"], default="byte")
    ap.add_argument("--tokenizer-path", help="tokenizer.json (bpe) or its directory (hf)")
    ap.add_argument("--train-bpe", type=int, metavar="VOCAB_SIZE",
                    help="train a BPE on the inputs first; saved as PREFIX.tokenizer.json")
    ap.add_argument("--text-key", default="text", help="text column of json/parquet records")
    ap.add_argument("--num-proc", type=at_least(1), default=1)
    args = ap.parse_args(argv)
    try:
        if args.train_bpe is not None:
            if args.tokenizer != "bpe":
                raise DataError("--train-bpe: needs --tokenizer bpe")
            tokenizer: Tokenizer | None = None
        else:
            tokenizer = build_tokenizer(args.tokenizer, args.tokenizer_path)
        prepare_dataset(args.input, args.output_prefix, tokenizer, args.text_key,
                        args.num_proc, bpe_vocab_size=args.train_bpe)
    except ConfigError as exc:
        msg = str(exc).replace("data.tokenizer_path", "--tokenizer-path")
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()

"""Data pipeline: tokenizers, prepared datasets read back exactly, atomic writes, the default
corpus (deterministic, prepared once), and the token-sharded batches the trainer consumes."""

import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections import OrderedDict  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core.datasets.indexed_dataset import IndexedDataset  # noqa: E402

from foe_train.config import ConfigError, DataConfig, ModelConfig, TrainingConfig  # noqa: E402
from foe_train.data import prepare  # noqa: E402
from foe_train.data.loader import ShardedBatches, build_datasets  # noqa: E402
from foe_train.data.prepare import (  # noqa: E402
    default_corpus,
    main,
    prepare_dataset,
    write_indexed_dataset,
)
from foe_train.data.tokenizers import EOD_TOKEN, build_tokenizer, train_bpe  # noqa: E402
from tests.corpus_stats import unigram_entropy  # noqa: E402

BYTE = build_tokenizer("byte")
MODEL = ModelConfig(vocab_size=257, seq_length=32)
TRAIN = TrainingConfig(micro_batch_size=2, global_batch_size=8, train_iters=20,
                       eval_interval=10, eval_iters=1)
DOCS = ["first document\nwith two lines", "zweites Dokument: äöü ✓", "", "third one"]


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    assert "\n" not in str(err.value)
    return str(err.value)


def read_back(prefix: str) -> list[list[int]]:
    ds = IndexedDataset(prefix)
    return [ds[i].tolist() for i in range(len(ds))]


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    vocab = ["alpha", "beta", "gamma", "delta", "def", "return", "self", "(x)", "é", "\n"]
    return " ".join(rng.choice(vocab) for _ in range(n))


# --- tokenizers ------------------------------------------------------------------------------

def test_byte_tokenizer_round_trip():
    text = "héllo wörld ✓ \n\t{}"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert BYTE.decode(ids) == text
    assert BYTE.decode(ids + [BYTE.eod]) == text + EOD_TOKEN
    assert (BYTE.vocab_size, BYTE.eod, BYTE.pad) == (257, 256, 256)
    assert isinstance(BYTE.unique_identifiers, OrderedDict) and BYTE.name == "byte"


def test_bpe_trained_round_trip(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(words(0, 4000))
    tok = train_bpe([str(corpus)], 300, str(tmp_path / "tok.json"))
    text = words(1, 50)
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text.encode())
    assert tok.vocab_size <= 300 and 0 <= tok.eod < tok.vocab_size
    assert tok.decode([tok.eod]) == EOD_TOKEN and tok.eod not in ids
    again = build_tokenizer("bpe", str(tmp_path / "tok.json"))
    assert (again.eod, again.vocab_size, again.name) == (tok.eod, tok.vocab_size, tok.name)
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_bytes((tmp_path / "tok.json").read_bytes())
    assert build_tokenizer("hf", str(hf_dir)).encode(text) == ids


def test_tokenizer_errors_name_the_field(tmp_path):
    assert "data.tokenizer_path" in one_line_error(build_tokenizer, "bpe", None)
    msg = one_line_error(build_tokenizer, "hf", str(tmp_path / "nope"))
    assert "data.tokenizer_path" in msg and "nope" in msg


# --- prepare ---------------------------------------------------------------------------------

def test_prepare_txt_jsonl_parquet_read_back_exactly(tmp_path):
    import datasets

    txt = tmp_path / "a.txt"
    txt.write_text(DOCS[0])
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d, "n": 1}) + "\n" for d in DOCS[1:3]))
    parquet = tmp_path / "c.parquet"
    datasets.Dataset.from_dict({"body": DOCS[3:], "n": [0]}).to_parquet(str(parquet))
    prefix = str(tmp_path / "out" / "mixed")
    assert prepare_dataset([str(txt)], prefix, BYTE) == prefix
    assert read_back(prefix) == [BYTE.encode(DOCS[0]) + [BYTE.eod]]
    prepare_dataset([str(jsonl), str(parquet)], prefix, BYTE, text_key="body", num_proc=2)
    assert read_back(prefix) == [BYTE.encode(d) + [BYTE.eod] for d in DOCS[1:]]
    assert sorted(os.listdir(tmp_path / "out")) == ["mixed.bin", "mixed.idx"]


def test_prepare_errors_name_the_argument(tmp_path):
    bad = tmp_path / "x.csv"
    bad.write_text("a,b\n")
    rec = tmp_path / "r.jsonl"
    rec.write_text('{"body": "x"}\n')
    out = str(tmp_path / "o")
    assert "--input" in one_line_error(prepare_dataset, [str(tmp_path / "no.txt")], out, BYTE)
    assert "--input" in one_line_error(prepare_dataset, [str(bad)], out, BYTE)
    assert "--text-key" in one_line_error(prepare_dataset, [str(rec)], out, BYTE)
    msg = one_line_error(prepare_dataset, ["no-such-hub-dataset"], out, BYTE)
    assert msg.startswith("--input: no-such-hub-dataset is not a local file")
    assert not glob.glob(out + "*")


def test_write_is_atomic(tmp_path):
    prefix = str(tmp_path / "ds")
    write_indexed_dataset([[1, 2], [3]], prefix, eod=9)
    before = {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")}

    def failing():
        yield [4, 5]
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_indexed_dataset(failing(), str(tmp_path / "new"), eod=9)
    with pytest.raises(RuntimeError):
        write_indexed_dataset(failing(), prefix, eod=9)
    assert sorted(os.listdir(tmp_path)) == ["ds.bin", "ds.idx"]  # no temporaries, no "new"
    assert {ext: open(prefix + ext, "rb").read() for ext in (".bin", ".idx")} == before
    assert read_back(prefix) == [[1, 2, 9], [3, 9]]


def test_cli_writes_dataset_and_refuses_bad_input(tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text(words(2, 3000))
    prefix = str(tmp_path / "cli")
    main(["--input", str(src), "--output-prefix", prefix, "--tokenizer", "bpe",
          "--train-bpe", "280"])
    tok = build_tokenizer("bpe", prefix + ".tokenizer.json")
    (doc,) = read_back(prefix)
    assert doc == tok.encode(src.read_text()) + [tok.eod]
    assert "1 documents" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(tmp_path / "missing.jsonl"), "--output-prefix", prefix])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "--input" in err
    with pytest.raises(SystemExit) as exc:
        main(["--input", str(src), "--output-prefix", prefix, "--tokenizer", "hf"])
    assert exc.value.code == 2 and "--tokenizer-path" in capsys.readouterr().err


# --- default corpus --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus_cache(tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    t0 = time.perf_counter()
    default_corpus(cache, BYTE)
    print(f"default corpus prepared in {time.perf_counter() - t0:.2f} s")
    return cache


def test_default_corpus_deterministic_and_reused(corpus_cache, tmp_path, capsys):
    prefix = default_corpus(corpus_cache, BYTE)
    stamp = {ext: os.stat(prefix + ext).st_mtime_ns for ext in (".bin", ".idx")}
    capsys.readouterr()
    assert default_corpus(corpus_cache, BYTE) == prefix
    assert "prepare" not in capsys.readouterr().out
    assert {ext: os.stat(prefix + ext).st_mtime_ns for ext in (".bin", ".idx")} == stamp
    other = default_corpus(str(tmp_path), BYTE)
    assert os.path.basename(other) == os.path.basename(prefix)
    for ext in (".bin", ".idx"):
        assert open(other + ext, "rb").read() == open(prefix + ext, "rb").read()
    ds = IndexedDataset(prefix)
    size = int(ds.sequence_lengths.sum()) - len(ds)
    assert 0.8 * prepare.DEFAULT_CORPUS_BYTES < size < 1.2 * prepare.DEFAULT_CORPUS_BYTES
    assert BYTE.decode(ds[0].tolist() + ds[1].tolist() + ds[2].tolist()).count("def ") > 3


def _corpus_in_child(cache: str, queue) -> None:
    queue.put(default_corpus(cache, BYTE))


def test_default_corpus_concurrent_ranks_prepare_once(tmp_path, monkeypatch):
    calls = tmp_path / "calls"
    real = prepare.write_indexed_dataset

    def slow_write(*args, **kwargs):
        with open(calls, "a") as f:
            f.write("x")
        time.sleep(0.5)  # widen the window in which a second rank could start preparing
        return real(*args, **kwargs)

    monkeypatch.setattr(prepare, "DEFAULT_CORPUS_BYTES", 200_000)
    monkeypatch.setattr(prepare, "write_indexed_dataset", slow_write)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    cache = str(tmp_path / "cache")
    procs = [ctx.Process(target=_corpus_in_child, args=(cache, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert len({queue.get() for _ in procs}) == 1
    assert calls.read_text() == "x"


# --- datasets and sharded batches ------------------------------------------------------------

@pytest.fixture(scope="module")
def train_ds(corpus_cache):
    train, valid, test = build_datasets(DataConfig(cache_dir=corpus_cache), MODEL, TRAIN,
                                        BYTE, seed=1234)
    assert len(train) >= 20 * 8 and len(valid) >= 3 * 8 and test is None
    return train


def rows(batches: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(batches)


def test_batches_shape_and_shift(train_ds):
    (mb, _) = ShardedBatches(train_ds, 8, 2, 2, 0).micro_batches(0)
    assert mb.dtype == torch.long and mb.shape == (2, MODEL.seq_length + 1)
    item = train_ds[0]
    assert torch.equal(mb[0, :-1], item["tokens"]) and torch.equal(mb[0, 1:], item["labels"])


def test_shards_partition_the_global_batch(train_ds):
    step, G = 3, 8
    shards = [rows(ShardedBatches(train_ds, G, 2, 2, s).micro_batches(step)) for s in range(2)]
    whole = torch.stack([torch.cat([train_ds[i]["tokens"], train_ds[i]["labels"][-1:]])
                         for i in range(step * G, (step + 1) * G)])
    assert torch.equal(torch.cat(shards), whole)
    assert not ({tuple(r.tolist()) for r in shards[0]} & {tuple(r.tolist()) for r in shards[1]})
    one = ShardedBatches(train_ds, G, 2, 1, 0)
    assert len(one.micro_batches(step)) == 4 and one.accumulation_steps == 4
    assert torch.equal(rows(one.micro_batches(step)), torch.cat(shards))


def test_batches_resume_and_wrap(train_ds):
    a = ShardedBatches(train_ds, 8, 2, 2, 1)
    assert all(torch.equal(x, y) for x, y in zip(a.micro_batches(5),
                                                   ShardedBatches(train_ds, 8, 2, 2, 1)
                                                   .micro_batches(5), strict=True))
    n = len(train_ds)
    b = ShardedBatches(train_ds, 8, 2, 1, 0, consumed_samples=n)
    assert torch.equal(rows(b.micro_batches(2)), rows(ShardedBatches(train_ds, 8, 2, 1, 0)
                                                      .micro_batches(2)))


def test_same_seed_same_batches(corpus_cache, tmp_path, train_ds):
    fresh = str(tmp_path / "cache")  # new index cache: rebuilt, not read back
    again, _, _ = build_datasets(DataConfig(cache_dir=fresh), MODEL, TRAIN, BYTE, seed=1234)
    other, _, _ = build_datasets(DataConfig(cache_dir=corpus_cache), MODEL, TRAIN, BYTE, seed=7)
    ref = rows(ShardedBatches(train_ds, 8, 2, 1, 0).micro_batches(4))
    assert torch.equal(rows(ShardedBatches(again, 8, 2, 1, 0).micro_batches(4)), ref)
    assert not torch.equal(rows(ShardedBatches(other, 8, 2, 1, 0).micro_batches(4)), ref)


def test_blend_of_two_prefixes_without_process_group(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    write_indexed_dataset([BYTE.encode(words(i, 300)) for i in range(20)], a, BYTE.eod)
    write_indexed_dataset([[7] * 400 for _ in range(20)], b, BYTE.eod)
    data = DataConfig(prefixes=[a, b], weights=[3, 1], split="90,10,0",
                      cache_dir=str(tmp_path / "cache"))
    train, valid, _ = build_datasets(data, MODEL, TRAIN, BYTE, seed=1)
    assert not dist.is_initialized()
    assert len(train) >= 160 and len(valid) >= 24
    ids = [int(train[i]["dataset_id"]) for i in range(160)]
    assert 0.6 < ids.count(0) / 160 < 0.9


def test_unigram_entropy(train_ds):
    h = unigram_entropy(train_ds, 200)
    assert 2.0 < h < math.log(257)
    assert unigram_entropy(train_ds, 200) == h


def test_errors_are_one_line_naming_the_field(tmp_path, train_ds):
    cache = str(tmp_path)
    msg = one_line_error(build_datasets, DataConfig(prefixes=[str(tmp_path / "gone")],
                                                    cache_dir=cache), MODEL, TRAIN, BYTE, 1)
    assert msg.startswith("data.prefixes") and str(tmp_path / "gone") in msg
    msg = one_line_error(build_datasets, DataConfig(cache_dir=cache), ModelConfig(vocab_size=256),
                         TRAIN, BYTE, 1)
    assert msg.startswith("model.vocab_size=256") and "257" in msg
    small = str(tmp_path / "small")
    write_indexed_dataset([[1, 2, 3]] * 3, small, BYTE.eod)
    for split in ("98,2,0", "abc", "0,1,0"):
        msg = one_line_error(build_datasets, DataConfig(prefixes=[small], split=split,
                                                        cache_dir=cache), MODEL, TRAIN, BYTE, 1)
        assert msg.startswith("data.split")
    msg = one_line_error(build_datasets, DataConfig(prefixes=[small, small], weights=[1.0],
                                                    cache_dir=cache), MODEL, TRAIN, BYTE, 1)
    assert msg.startswith("data.weights")
    msg = one_line_error(ShardedBatches, train_ds, 12, 2, 4, 0)
    assert msg.startswith("training.global_batch_size=12") and "micro_batch_size=2" in msg

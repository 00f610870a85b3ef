"""Tests for prepare_fineweb.py: shard format, local txt/jsonl/parquet through `datasets`, the token cap,
atomic/resumable shards. Uses a small tiktoken Encoding built here (no download, no ../shared)."""
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tiktoken

ROOT = os.path.join(os.path.dirname(__file__), "..")
sys.path.insert(0, ROOT)
import prepare_fineweb as pf  # noqa: E402
import train_muon  # noqa: E402

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
DOCS = ["The quick brown fox jumps over the lazy dog.", "To be, or not to be: that is the question.",
        "All the world's a stage, and all the men and women merely players.", "Brevity is the soul of wit.",
        "The lady doth protest too much, methinks."]


def tiny_encoding():
    """Byte-level BPE with two merges and an EOT token: enough to exercise tiktoken for real."""
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"th"], ranks[b"the"] = 256, 257
    return tiktoken.Encoding(name="tiny_test", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 258})


def expected_stream(enc, docs):
    return np.concatenate([[enc.eot_token] + enc.encode_ordinary(d) for d in docs]).astype(np.uint16)


def read_all(out_dir):
    paths = sorted(os.path.join(out_dir, f) for f in os.listdir(out_dir) if f.endswith(".bin"))
    assert os.path.basename(paths[-1]).startswith("fineweb_val_000000")  # sorts last: 'val' > 'train'
    paths = [paths[-1]] + paths[:-1]
    return paths, [pf.read_shard(p) for p in paths]


def test_shard_round_trip_header_dtype_count(tmp_path):
    tokens = np.array([0, 1, 50256, 65535, 7], dtype=np.int64)
    path = str(tmp_path / "s.bin")
    pf.write_shard(path, tokens)
    header = np.fromfile(path, dtype=np.int32, count=256)
    assert list(header[:3]) == [20240520, 1, 5] and not header[3:].any()
    assert os.path.getsize(path) == 256 * 4 + 5 * 2
    loaded = train_muon.read_shard(path)  # the trainer's copy of the reader
    assert loaded.dtype == np.uint16 and loaded.tolist() == tokens.tolist()
    assert not os.path.exists(path + ".tmp")
    with pytest.raises(ValueError, match="uint16"):
        pf.write_shard(path, np.array([70000]))


def test_reader_errors_name_the_problem(tmp_path):
    path = str(tmp_path / "fineweb_train_000001.bin")
    pf.write_shard(path, np.arange(100))
    with open(path, "r+b") as f:
        f.truncate(256 * 4 + 50)
    with pytest.raises(ValueError, match="header says 100 tokens.*truncated"):
        train_muon.read_shard(path)
    foreign = str(tmp_path / "foreign.bin")
    np.arange(1000, dtype=np.int32).tofile(foreign)
    with pytest.raises(ValueError, match="not a token shard.*prepare_fineweb.py"):
        train_muon.read_shard(foreign)
    with open(foreign, "wb") as f:
        f.write(b"abc")
    with pytest.raises(ValueError, match="not a token shard"):
        train_muon.read_shard(foreign)


def write_inputs(tmp_path, kind):
    d = tmp_path / f"in_{kind}"
    d.mkdir()
    if kind == "txt":  # one document per file
        for i, doc in enumerate(DOCS):
            (d / f"{i:02d}.txt").write_text(doc)
        return str(d / "*.txt"), "text"
    if kind == "jsonl":
        with open(d / "a.jsonl", "w") as f:
            for doc in DOCS[:3]:
                f.write(json.dumps({"body": doc, "id": 1}) + "\n")
        with open(d / "b.jsonl", "w") as f:
            for doc in DOCS[3:]:
                f.write(json.dumps({"body": doc, "id": 2}) + "\n")
        return str(d / "*.jsonl"), "body"
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), d / "docs.parquet")
    return str(d / "*.parquet"), "text"


@pytest.mark.parametrize("kind", ["txt", "jsonl", "parquet"])
def test_local_files_through_datasets(tmp_path, kind):
    enc = tiny_encoding()
    pattern, field = write_inputs(tmp_path, kind)
    out = str(tmp_path / "out")
    pf.prepare(input=pattern, text_field=field, encoding=enc, out_dir=out, shard_size=40, num_proc=1)
    paths, shards = read_all(out)
    stream = expected_stream(enc, DOCS)
    assert np.array_equal(np.concatenate(shards), stream)
    assert [len(s) for s in shards[:-1]] == [40] * (len(shards) - 1) and 0 < len(shards[-1]) <= 40
    assert [os.path.basename(p) for p in paths[:2]] == ["fineweb_val_000000.bin", "fineweb_train_000001.bin"]
    assert (stream == enc.eot_token).sum() == len(DOCS)  # one EOT before each document
    assert enc.decode(stream[1:].tolist()).startswith(DOCS[0])


def test_pool_token_cap_and_resume(tmp_path):
    enc = tiny_encoding()
    pattern, _ = write_inputs(tmp_path, "txt")
    out = str(tmp_path / "out")
    paths = pf.prepare(input=pattern, encoding=enc, out_dir=out, shard_size=30, num_tokens=100, num_proc=2, chunksize=1)
    _, shards = read_all(out)
    assert [len(s) for s in shards] == [30, 30, 30, 10]
    full = np.concatenate(shards)
    assert np.array_equal(full, expected_stream(enc, DOCS)[:100])
    # rerun: nothing to do, files untouched
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    pf.prepare(input=pattern, encoding=enc, out_dir=out, shard_size=30, num_tokens=100, num_proc=1)
    assert [os.stat(p).st_mtime_ns for p in paths] == mtimes
    # shards 2 and 3 lost (e.g. a crash before they were written): a rerun keeps 0-1 and rebuilds the rest
    os.remove(paths[2])
    os.remove(paths[3])
    pf.prepare(input=pattern, encoding=enc, out_dir=out, shard_size=30, num_tokens=100, num_proc=1)
    assert [os.stat(p).st_mtime_ns for p in paths[:2]] == mtimes[:2]
    _, shards = read_all(out)
    assert np.array_equal(np.concatenate(shards), full)


def test_input_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="matches no files"):
        pf.prepare(input=str(tmp_path / "*.txt"), encoding=tiny_encoding(), out_dir=str(tmp_path / "o"))
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(ValueError, match="supported"):
        pf.prepare(input=str(tmp_path / "*.csv"), encoding=tiny_encoding(), out_dir=str(tmp_path / "o"))
    pattern, _ = write_inputs(tmp_path, "jsonl")
    with pytest.raises(KeyError, match="no field 'text'.*--text_field"):
        pf.prepare(input=pattern, encoding=tiny_encoding(), out_dir=str(tmp_path / "o"), num_proc=1)


def test_shuffle_is_a_deterministic_permutation_of_the_documents(tmp_path):
    enc = tiny_encoding()
    docs = [f"Document number {i} says {'ha ' * i}." for i in range(12)]
    d = tmp_path / "in"
    d.mkdir()
    (d / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    streams = []
    for run in range(2):
        out = str(tmp_path / f"out{run}")
        pf.prepare(input=str(d / "*.jsonl"), encoding=enc, out_dir=out, shard_size=10**6, shuffle_seed=0, num_proc=1)
        streams.append(pf.read_shard(os.path.join(out, "fineweb_val_000000.bin")))
    assert np.array_equal(streams[0], streams[1])
    texts = enc.decode(streams[0].tolist()).split("<|endoftext|>")[1:]
    assert sorted(texts) == sorted(docs) and texts != docs


# -- issue 13 item 1: a rerun with other settings must not mix shards of two runs -----------------------

def test_rerun_with_other_shard_size_removes_the_earlier_runs_shards(tmp_path, capsys):
    enc = tiny_encoding()
    pattern, _ = write_inputs(tmp_path, "txt")
    out = str(tmp_path / "out")
    first = pf.prepare(input=pattern, encoding=enc, out_dir=out, shard_size=20, num_proc=1)
    second = pf.prepare(input=pattern, encoding=enc, out_dir=out, shard_size=100, num_proc=1)
    assert len(first) > len(second) >= 2
    assert "removing" in capsys.readouterr().out  # never silently
    on_disk = sorted(os.path.join(out, f) for f in os.listdir(out) if f.endswith(".bin"))
    assert on_disk == sorted(second)  # nothing of the shard_size=20 run is left for the train glob
    _, shards = read_all(out)
    assert np.array_equal(np.concatenate(shards), expected_stream(enc, DOCS))


def test_unaccounted_shards_in_out_dir_stop_a_fresh_run(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    pf.write_shard(str(out / "fineweb_train_000007.bin"), np.arange(10))
    pattern, _ = write_inputs(tmp_path, "txt")
    with pytest.raises(ValueError, match="no prepare_state.json.*delete them or choose another --out_dir"):
        pf.prepare(input=pattern, encoding=tiny_encoding(), out_dir=str(out), shard_size=20, num_proc=1)
    assert os.path.exists(out / "fineweb_train_000007.bin")


def test_shard_size_must_be_a_whole_number(tmp_path):
    with pytest.raises(SystemExit, match="--shard_size=1.5: expected a whole number"):
        pf.parse_overrides(["--shard_size=1.5"], dict(shard_size=10**8))
    assert pf.parse_overrides(["--shard_size=1e5"], dict(shard_size=10**8))["shard_size"] == 100000
    with pytest.raises(ValueError, match="shard_size=1.5: must be a whole number"):
        pf.prepare(input="unused", encoding=tiny_encoding(), out_dir=str(tmp_path), shard_size=1.5)
    with pytest.raises(SystemExit, match="unknown setting --shard_sizes"):
        pf.parse_overrides(["--shard_sizes=10"], dict(shard_size=10**8))


# -- the first errors without network name the fix -------------------------------------------------------

def test_no_network_for_tiktoken_names_TIKTOKEN_CACHE_DIR(tmp_path):
    pattern, _ = write_inputs(tmp_path, "txt")
    empty = tmp_path / "tiktoken_cache"
    empty.mkdir()
    proxy = "http://127.0.0.1:9"  # nothing listens there: the download fails at once (no DNS, no timeout)
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(empty), HTTPS_PROXY=proxy, HTTP_PROXY=proxy, https_proxy=proxy,
               http_proxy=proxy, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "prepare_fineweb.py", f"--input={pattern}", f"--out_dir={tmp_path / 'o'}",
                        "--num_proc=1"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "TIKTOKEN_CACHE_DIR" in r.stderr and "Traceback" not in r.stderr, r.stderr[-2000:]


def test_no_network_for_the_hub_names_input_and_the_hf_cache(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'HuggingFaceFW/fineweb-edu' on the Hub (OfflineModeIsEnabled)")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ConnectionError, match="--input=.*HF_HOME.*HF_HUB_OFFLINE=1"):
        pf.load_documents("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", "", "text", "document")

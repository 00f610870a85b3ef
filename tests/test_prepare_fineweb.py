"""Tests for prepare_fineweb.py: shard format, local txt/jsonl/parquet through `datasets`, the token cap,
atomic/resumable shards. Uses a small tiktoken Encoding built here (no download, no ../shared)."""
import inspect
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


# -- issue 18: the manifest, reruns after the inputs changed, clear errors, Ctrl-C, validation -------------

def sha256_of(path):
    import hashlib
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def stream_of(out):
    return np.concatenate(read_all(out)[1])


def test_rerun_after_an_input_file_changed_rewrites_the_shards(tmp_path, capsys):
    enc = tiny_encoding()
    pattern, _ = write_inputs(tmp_path, "txt")
    out = str(tmp_path / "out")
    pf.prepare(input=pattern, encoding=enc, out_dir=out, shard_size=40, num_proc=1)
    assert np.array_equal(stream_of(out), expected_stream(enc, DOCS))
    changed = DOCS[:2] + ["Now is the winter of our discontent."] + DOCS[3:]
    (tmp_path / "in_txt" / "02.txt").write_text(changed[2])  # same glob, same file names, other text
    capsys.readouterr()
    pf.prepare(input=pattern, encoding=enc, out_dir=out, shard_size=40, num_proc=1)
    assert "nothing to do" not in capsys.readouterr().out
    assert np.array_equal(stream_of(out), expected_stream(enc, changed))
    # equal settings and inputs: reused, files untouched
    paths = read_all(out)[0]
    mtimes = [os.stat(p).st_mtime_ns for p in paths]
    pf.prepare(input=pattern, encoding=enc, out_dir=out, shard_size=40, num_proc=1)
    assert "nothing to do" in capsys.readouterr().out and [os.stat(p).st_mtime_ns for p in paths] == mtimes
    # a shard altered on disk (same token count) is not reused either
    tokens = np.array(pf.read_shard(paths[1]))
    pf.write_shard(paths[1], tokens[::-1])
    pf.prepare(input=pattern, encoding=enc, out_dir=out, shard_size=40, num_proc=1)
    assert np.array_equal(stream_of(out), expected_stream(enc, changed))


def test_manifest_records_settings_inputs_and_shards(tmp_path):
    enc = tiny_encoding()
    pattern, _ = write_inputs(tmp_path, "txt")
    out = str(tmp_path / "out")
    paths = pf.prepare(input=pattern, encoding=enc, out_dir=out, shard_size=40, num_proc=1)
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["settings"]["shard_size"] == 40 and manifest["settings"]["encoding"] == "tiny_test"
    files = sorted((tmp_path / "in_txt").iterdir())
    assert manifest["inputs"] == [dict(name=p.name, bytes=p.stat().st_size, sha256=sha256_of(p)) for p in files]
    assert manifest["shards"] == [dict(name=os.path.basename(p), tokens=len(pf.read_shard(p)), sha256=sha256_of(p))
                                  for p in paths]
    assert manifest["tokens"] == len(expected_stream(enc, DOCS))
    assert not [f for f in os.listdir(out) if ".tmp" in f]  # written atomically


def test_txt_sample_by_paragraph_splits_at_blank_lines(tmp_path):
    enc = tiny_encoding()
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("First paragraph,\nstill the first.\n\nSecond one.\n\nThird.\n")
    out = str(tmp_path / "out")
    pf.prepare(input=str(d / "*.txt"), txt_sample_by="paragraph", encoding=enc, out_dir=out, num_proc=1)
    paragraphs = ["First paragraph,\nstill the first.", "Second one.", "Third.\n"]
    assert np.array_equal(stream_of(out), expected_stream(enc, paragraphs))


def test_txt_sample_by_paragraphs_is_an_error_not_zero_tokens(tmp_path):
    pattern, _ = write_inputs(tmp_path, "txt")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--txt_sample_by='paragraphs'.*document.*paragraph.*line"):
        pf.prepare(input=pattern, txt_sample_by="paragraphs", encoding=tiny_encoding(), out_dir=str(out), num_proc=1)
    assert not out.exists()  # checked before any work


def test_zero_tokens_is_an_error_naming_the_input_and_the_fix(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "blank.txt").write_text("\n\n\n\n")  # no paragraph in it
    pattern = str(d / "*.txt")
    with pytest.raises(ValueError, match=r"blank\.txt.*0 tokens.*--txt_sample_by=document"):
        pf.prepare(input=pattern, txt_sample_by="paragraph", encoding=tiny_encoding(), out_dir=str(tmp_path / "o"),
                   num_proc=1)
    assert not [f for f in os.listdir(tmp_path / "o") if f.endswith(".bin") or f == "manifest.json"]


def test_non_utf8_input_names_the_file_the_position_and_the_fix(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "a.txt").write_text("fine text\n")
    (d / "b.txt").write_bytes("line one\nline two\n".encode() + b"caf\xe9 au lait\n")
    with pytest.raises(ValueError) as err:
        pf.prepare(input=str(d / "*.txt"), encoding=tiny_encoding(), out_dir=str(tmp_path / "o"), num_proc=1)
    message = str(err.value)
    assert "b.txt" in message and "line 3" in message and "byte 21" in message and "UTF-8" in message, message
    assert "iconv" in message and "\n" not in message


CTRL_C_SCRIPT = r"""
import os, runpy, signal, sys, time
import tiktoken, tqdm
GPT2_PATTERN = {pattern!r}
{tiny_encoding}
names = tiktoken.list_encoding_names()
tiktoken.list_encoding_names = lambda: names + ["tiny_test"]
tiktoken.get_encoding = lambda name: tiny_encoding()


class CtrlCAfter(tqdm.tqdm):  # the user presses Ctrl-C (SIGINT to the process group) after `stop` tokens
    def update(self, n=1):
        super().update(n)
        if self.n >= {stop}:
            os.killpg(0, signal.SIGINT)
            time.sleep(30)


tqdm.tqdm = CtrlCAfter
sys.argv = ["prepare_fineweb.py"] + {args!r}
runpy.run_path({script!r}, run_name="__main__")
"""


def test_ctrl_c_stops_cleanly_keeps_the_shards_and_a_rerun_resumes(tmp_path):
    enc = tiny_encoding()
    d = tmp_path / "in"
    d.mkdir()
    docs = [f"Document {i}: " + "the " * (i % 7) + "end." for i in range(60)]
    for i, doc in enumerate(docs):
        (d / f"{i:03d}.txt").write_text(doc)
    out = tmp_path / "out"
    args = [f"--input={d / '*.txt'}", "--encoding=tiny_test", f"--out_dir={out}", "--shard_size=50",
            "--num_proc=2", "--chunksize=1"]
    script = CTRL_C_SCRIPT.format(pattern=GPT2_PATTERN, tiny_encoding=inspect.getsource(tiny_encoding), stop=120,
                                  args=args, script=os.path.join(ROOT, "prepare_fineweb.py"))
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), start_new_session=True)
    assert r.returncode == 130 and "Traceback" not in r.stderr, (r.returncode, r.stderr[-3000:])
    assert "run the same command again" in r.stderr, r.stderr[-2000:]
    kept = sorted(f for f in os.listdir(out) if f.endswith(".bin"))
    assert len(kept) == 2  # 100 tokens written when the 120th was reached: shards 0 and 1
    mtimes = {f: os.stat(out / f).st_mtime_ns for f in kept}
    pf.prepare(input=str(d / "*.txt"), encoding=enc, out_dir=str(out), shard_size=50, num_proc=1)
    assert {f: os.stat(out / f).st_mtime_ns for f in kept} == mtimes  # resumed after them
    assert np.array_equal(stream_of(str(out)), expected_stream(enc, docs))


BAD_SETTINGS = [("txt_sample_by", "lines"), ("shard_size", 0), ("shard_size", -5), ("num_tokens", -1),
                ("num_proc", 0), ("chunksize", 0), ("shuffle_buffer", 0), ("shuffle_seed", -2), ("text_field", ""),
                ("prefix", ""), ("prefix", "a/b"), ("out_dir", ""), ("encoding", "gtp2")]


@pytest.mark.parametrize("name,value", BAD_SETTINGS)
def test_every_setting_is_validated_before_work_starts(tmp_path, name, value):
    pattern, _ = write_inputs(tmp_path, "txt")
    out = tmp_path / "out"
    settings = dict(input=pattern, encoding=tiny_encoding(), out_dir=str(out), num_proc=1)
    settings[name] = value
    with pytest.raises(ValueError, match=f"--{name}={value!r}: "):
        pf.prepare(**settings)
    assert not out.exists()


def test_cli_names_each_bad_setting_on_its_own_line_and_help_lists_every_setting(tmp_path):
    r = subprocess.run([sys.executable, "prepare_fineweb.py", "--txt_sample_by=paragraphs", "--shard_size=0",
                        "--chunksize=0", f"--out_dir={tmp_path / 'o'}", f"--input={tmp_path / '*.txt'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=60, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert [line.removeprefix("error: ").split("=")[0] for line in lines] == \
        ["--txt_sample_by", "--shard_size", "--chunksize"], lines
    assert not (tmp_path / "o").exists()
    r = subprocess.run([sys.executable, "prepare_fineweb.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    for name in ("input", "txt_sample_by", "shard_size", "num_tokens", "num_proc", "chunksize", "out_dir"):
        assert f"--{name}=" in r.stdout


# -- issue 20 item 2: a corpus from an installed package's source, split by subpackage -----------------------

def test_package_input_records_its_version_and_the_subpackage_split_is_disjoint(tmp_path, monkeypatch):
    enc = tiny_encoding()
    site = tmp_path / "site"
    files = {"__init__.py": "from . import pub\n", "top.py": "X = 1\n", "_priv/__init__.py": "",
             "_priv/a.py": "def f():\n    return 2\n", "_priv/sub/b.py": "class B:\n    pass\n",
             "_cache/c.py": "Y = [3]\n", "pub/d.py": "import os\n", "pub/sub/e.py": "print('e')\n",
             "util/f.py": "Z = {}\n", "util/notes.txt": "not python\n"}
    for name, text in files.items():
        (site / "fakepkg_q" / name).parent.mkdir(parents=True, exist_ok=True)
        (site / "fakepkg_q" / name).write_text(text)
    (site / "fakepkg_q-1.2.3.dist-info").mkdir()
    (site / "fakepkg_q-1.2.3.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg_q\n"
                                                                 "Version: 1.2.3\n")
    monkeypatch.syspath_prepend(str(site))
    parts = {}
    for part, pattern in (("tune", "fakepkg_q:_*/**/*.py"), ("report", "fakepkg_q:[!_]*/**/*.py")):
        out = str(tmp_path / part)
        pf.prepare(input=pattern, encoding=enc, out_dir=out, shard_size=10**6, num_proc=1)
        with open(os.path.join(out, "manifest.json")) as f:
            manifest = json.load(f)
        assert manifest["package"] == dict(name="fakepkg_q", version="1.2.3", dir=str(site / "fakepkg_q"))
        assert manifest["input"] == pattern
        names = [i["name"] for i in manifest["inputs"]]
        assert names == sorted(names)  # the deterministic file order: sorted relative paths
        assert np.array_equal(stream_of(out), expected_stream(enc, [files[n] for n in names]))
        parts[part] = names
    assert parts["tune"] == ["_cache/c.py", "_priv/__init__.py", "_priv/a.py", "_priv/sub/b.py"]
    assert parts["report"] == ["pub/d.py", "pub/sub/e.py", "util/f.py"]  # the package's own top-level files: neither
    subpackages = [{n.split("/")[0] for n in parts[p]} for p in ("tune", "report")]
    assert not subpackages[0] & subpackages[1]

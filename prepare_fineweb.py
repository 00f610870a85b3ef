"""
prepare_fineweb.py -- tokenize a text corpus into llm.c / modded-nanogpt shards for train_muon.py.

    python prepare_fineweb.py                          # FineWeb-Edu sample-10BT from the HF hub (streamed)
    python prepare_fineweb.py --num_tokens=900000000   # stop after 0.9B tokens (9 shards of 1e8)
    python prepare_fineweb.py --input='texts/*.txt' --encoding=r50k_base --shard_size=100000 --out_dir=data/mine
    python prepare_fineweb.py --input='plays/*.txt' --txt_sample_by=paragraph --shuffle_seed=0 ...  # ordered corpus
    python prepare_fineweb.py --input='torch:_*/**/*.py' ...  # the installed torch's source: results/torch_corpus.md

Every document becomes [EOT] + tokens (tiktoken's GPT-2 BPE by default; EOT = 50256), tokenized in a
multiprocessing pool, and the token stream is cut into shards of `shard_size` tokens:
    data/fineweb_edu/fineweb_val_000000.bin      shard 0 = validation
    data/fineweb_edu/fineweb_train_000001.bin    then training shards, ...
Shard format (llm.c): a header of 256 int32 (magic 20240520, version 1, number of tokens, rest zero),
then the tokens as uint16.

Local files go through the same `datasets` streaming code path as the hub: --input is a glob (`**` matches
any depth) of .txt or .py files (one document per file, or per line/paragraph with --txt_sample_by),
.jsonl/.json (field --text_field) or .parquet files, read in the order of their sorted paths; all files of
one glob must have the same kind. `--input=NAME:GLOB` globs inside the installed Python package NAME,
wherever this machine keeps it (e.g. --input='torch:**/*.py'), and records the package's version.

out_dir/manifest.json is the provenance of a finished run: its settings, every input file's name (relative
to the glob's leading directories), size and sha256, the package and version for NAME:GLOB input, and every
shard's name, token count and sha256 (of the whole file, as `sha256sum` prints it). It is written
(atomically) when the last shard is, and removed while shards are being rewritten.

Shards are written atomically (temp file, then os.replace), and a small state file records where each
shard ended in the document stream and its sha256, so a rerun (e.g. after Ctrl-C or a dropped connection)
skips the finished shards without tokenizing them again. A rerun reuses shards only when the settings and
the input files' contents are equal and the shards are unaltered; otherwise (another --shard_size, an edited
input file) it starts over and deletes the earlier run's shards first (and says so), so the train glob
never mixes two runs; shards in out_dir that no prepare_state.json accounts for make it stop instead.

No network: tiktoken downloads its BPE files on first use (copy them and set TIKTOKEN_CACHE_DIR), and
the hub dataset needs the HF hub (use --input= for local files, or a filled HF cache with HF_HUB_OFFLINE=1).
"""
import codecs
import glob
import hashlib
import importlib.metadata
import importlib.util
import json
import multiprocessing as mp
import os
import signal
import sys

import numpy as np
from tqdm import tqdm

# -----------------------------------------------------------------------------
# Constants: edit here or override on the command line as --name=value
dataset = "HuggingFaceFW/fineweb-edu"  # hub dataset (streamed), used when `input` is empty
dataset_config = "sample-10BT"
split = "train"
input = ""  # glob of local .txt/.py/.jsonl/.json/.parquet files instead of the hub; NAME:GLOB = inside package NAME
text_field = "text"  # the field holding each document's text
txt_sample_by = "document"  # for .txt/.py input: one document per "document" (file), "paragraph" or "line"
shuffle_seed = -1  # >= 0: shuffle the documents (datasets' buffered shuffle) with this seed; for ordered local
shuffle_buffer = 10000  # corpora (e.g. plays file by file), so that val and train mix everything. FineWeb is shuffled.
encoding = "gpt2"  # tiktoken encoding name (r50k_base has the same vocabulary as gpt2)
out_dir = "data/fineweb_edu"
prefix = "fineweb"  # shard names: {prefix}_val_000000.bin, {prefix}_train_000001.bin, ...
shard_size = 10**8  # tokens per shard
num_tokens = 0  # cap on the total number of tokens written (0 = the whole dataset)
num_proc = max(1, (os.cpu_count() or 2) - 1)  # tokenizer processes (1 = tokenize in this process)
chunksize = 16  # documents per task sent to a worker
# -----------------------------------------------------------------------------

SHARD_MAGIC, SHARD_VERSION, SHARD_HEADER_INTS = 20240520, 1, 256
STATE_FILE = "prepare_state.json"
MANIFEST_FILE = "manifest.json"
TEXT_SPLITS = ("document", "paragraph", "line")  # the sample_by values of the `datasets` text builder


def shard_path(out_dir, index, prefix="fineweb"):
    """Shard 0 is validation, the rest training (the modded-nanogpt names)."""
    return os.path.join(out_dir, f"{prefix}_{'val' if index == 0 else 'train'}_{index:06d}.bin")


def write_shard(path, tokens):
    """Write one llm.c shard atomically: 256 x int32 header (magic, version, count, zeros) + uint16 tokens.
    Returns the sha256 of the file's bytes (for the state and the manifest, without reading it back)."""
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"token ids must fit uint16 (0..65535), got range {tokens.min()}..{tokens.max()}")
    header = np.zeros(SHARD_HEADER_INTS, dtype=np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    data = header.tobytes() + tokens.astype(np.uint16).tobytes()
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def read_shard(path):
    """The uint16 tokens of one shard, memory-mapped, after checking the header and the size."""
    header = np.fromfile(path, dtype=np.int32, count=SHARD_HEADER_INTS)
    if header.size < SHARD_HEADER_INTS or header[0] != SHARD_MAGIC:
        raise ValueError(f"{path} is not a token shard (magic {header[:1].tolist()} != {SHARD_MAGIC}); "
                         "write shards with prepare_fineweb.py")
    if header[1] != SHARD_VERSION:
        raise ValueError(f"{path}: shard version {header[1]}, this script reads version {SHARD_VERSION}")
    n = int(header[2])
    expected = SHARD_HEADER_INTS * 4 + 2 * n
    if os.path.getsize(path) != expected:
        raise ValueError(f"{path}: header says {n} tokens ({expected} bytes) but the file has "
                         f"{os.path.getsize(path)} bytes; the shard is truncated, rewrite it")
    return np.memmap(path, dtype=np.uint16, mode="r", offset=SHARD_HEADER_INTS * 4, shape=(n,))


def stray_shards(out_dir, prefix, keep):
    """Shard files in out_dir with this prefix that are not among the first `keep` shards of this run."""
    wanted = {shard_path(out_dir, i, prefix) for i in range(keep)}
    found = [p for kind in ("val", "train") for p in glob.glob(os.path.join(out_dir, f"{prefix}_{kind}_*.bin"))]
    return sorted(p for p in found if p not in wanted)


def remove_shards(paths, why):
    """Delete shards this run does not own, loudly: a glob over out_dir would otherwise train on them."""
    if paths:
        print(f"removing {len(paths)} shard(s) {why}: {', '.join(os.path.basename(p) for p in paths[:3])}"
              f"{', ...' if len(paths) > 3 else ''}")
    for p in paths:
        os.remove(p)


def file_sha256(path):
    """sha256 hex digest of a file's bytes, read in 1 MB blocks; None if it cannot be read."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


def setting_errors(dataset, input, text_field, txt_sample_by, shuffle_seed, shuffle_buffer, encoding, out_dir,
                   prefix, shard_size, num_tokens, num_proc, chunksize):
    """One line per bad setting (name, value, what it must be), checked before any work: `datasets` reads an
    unknown sample_by as "no documents" and a pool rejects chunksize 0 only once tokenizing has begun."""
    import tiktoken
    errors = []
    if isinstance(encoding, str) and encoding not in tiktoken.list_encoding_names():
        errors.append(f"--encoding={encoding!r}: choose one of {', '.join(tiktoken.list_encoding_names())}")
    if txt_sample_by not in TEXT_SPLITS:
        errors.append(f"--txt_sample_by={txt_sample_by!r}: choose document (one document per file), paragraph "
                      f"(text between blank lines) or line")
    for name, value, least, what in (("shard_size", shard_size, 1, "a count of tokens"),
                                     ("num_tokens", num_tokens, 0, "a count of tokens; 0 = no cap"),
                                     ("num_proc", num_proc, 1, "tokenizer processes"),
                                     ("chunksize", chunksize, 1, "documents per task"),
                                     ("shuffle_buffer", shuffle_buffer, 1, "documents"),
                                     ("shuffle_seed", shuffle_seed, -1, "-1 = no shuffle")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer() \
                or value < least:
            errors.append(f"--{name}={value!r}: must be a whole number >= {least} ({what})")
    for name, value in (("text_field", text_field), ("out_dir", out_dir), ("prefix", prefix)) + \
            ((("dataset", dataset),) if not input else ()):
        if not value:
            errors.append(f"--{name}={value!r}: must not be empty")
    if "/" in prefix or os.sep in prefix:
        errors.append(f"--prefix={prefix!r}: a file name prefix, not a path; put the directory in --out_dir")
    return errors


# -- documents ----------------------------------------------------------------

LOCAL_BUILDERS = {".txt": "text", ".py": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def package_version(name):
    """The installed version of the distribution that provides the import package `name`, or None."""
    for dist in [name] + importlib.metadata.packages_distributions().get(name, []):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def resolve_input(pattern):
    """(absolute glob, base directory, package) for --input. NAME:GLOB globs inside the directory of the
    installed package NAME, wherever this machine keeps it, and package = its name and version; a plain glob
    has package None. The base (the glob's leading directories without wildcards) names the inputs in the
    manifest, so two machines with the same files record the same names."""
    name, colon, rest = pattern.partition(":")
    if colon and len(name) > 1 and name.isidentifier():  # len > 1: never a Windows drive letter
        spec = importlib.util.find_spec(name)  # finds a top-level package without importing it
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"--input={pattern!r}: no installed package {name!r} (NAME:GLOB globs inside "
                                    f"package NAME); install it, or give a plain glob")
        base = os.path.abspath(list(spec.submodule_search_locations)[0])
        return os.path.join(base, rest.lstrip("/")), base, dict(name=name, version=package_version(name), dir=base)
    pattern = os.path.abspath(os.path.expanduser(pattern))
    parts = pattern.split(os.sep)
    fixed = next((i for i, p in enumerate(parts) if glob.has_magic(p)), len(parts) - 1)
    return pattern, os.sep.join(parts[:fixed]) or os.sep, None


def local_files(pattern):
    """Files matching the glob (sorted paths, `**` at any depth) and the `datasets` builder that reads them."""
    files = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
    if not files:
        raise FileNotFoundError(f"--input={pattern!r} matches no files; give a glob of .txt, .py, .jsonl, .json or "
                                ".parquet files, e.g. --input='../shared/data/shakespeare/*.txt'")
    kinds = {os.path.splitext(f)[1].lower() for f in files}
    unknown = kinds - set(LOCAL_BUILDERS)
    if unknown:
        raise ValueError(f"--input={pattern!r} matches files with extension(s) {sorted(unknown)}; "
                         f"supported: {sorted(LOCAL_BUILDERS)}")
    builders = {LOCAL_BUILDERS[k] for k in kinds}
    if len(builders) > 1:
        raise ValueError(f"--input={pattern!r} mixes file kinds {sorted(kinds)}; tokenize one kind per run")
    return files, builders.pop()


def input_record(path, base, utf8):
    """The manifest's entry for one input file: name (relative to base), size and sha256. With utf8, also
    checks that the file decodes as UTF-8 (as `datasets` reads text and json), because `datasets` stops in
    the middle of a run without naming the file: here the error names the file, the byte and the line."""
    h, decoder, offset, lines = hashlib.sha256(), codecs.getincrementaldecoder("utf-8")(), 0, 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            if utf8:
                pending = len(decoder.getstate()[0])  # bytes of a character split between two blocks
                try:
                    decoder.decode(block)
                except UnicodeDecodeError as e:
                    line = lines + e.object.count(b"\n", 0, e.start) + 1
                    raise ValueError(f"{path} is not UTF-8 text: byte {e.object[e.start]:#04x} at byte "
                                     f"{offset - pending + e.start}, line {line}; convert it (e.g. iconv -f latin1 "
                                     f"-t utf-8) or leave it out of --input") from None
                lines += block.count(b"\n")
            offset += len(block)
    if utf8 and decoder.getstate()[0]:
        raise ValueError(f"{path} is not UTF-8 text: it ends inside a character (byte {offset}); convert it "
                         f"(e.g. iconv -f latin1 -t utf-8) or leave it out of --input")
    return dict(name=os.path.relpath(path, base), bytes=offset, sha256=h.hexdigest())


def load_documents(dataset, dataset_config, split, files, text_field, txt_sample_by, shuffle_seed=-1,
                   shuffle_buffer=10000):
    """A streaming `datasets` IterableDataset of documents: the hub dataset, or the local `files` (of one
    kind, see local_files) through the same builder machinery (text / json / parquet). Its examples carry
    the text in `text_field`. shuffle_seed >= 0 shuffles them (deterministically, so a rerun can skip
    finished documents)."""
    import datasets
    if files:
        builder = LOCAL_BUILDERS[os.path.splitext(files[0])[1].lower()]
        kwargs = dict(sample_by=txt_sample_by) if builder == "text" else {}
        docs = datasets.load_dataset(builder, data_files=list(files), split="train", streaming=True, **kwargs)
    else:
        try:
            docs = datasets.load_dataset(dataset, name=dataset_config or None, split=split, streaming=True)
        except Exception as e:  # no network, offline mode, a gated/renamed dataset: the hub's error is long
            raise ConnectionError(f"could not open the hub dataset {dataset!r} ({type(e).__name__}: {str(e)[:200]}). "
                                  "For local files use --input='texts/*.txt' (or .jsonl/.parquet); for a dataset "
                                  "already downloaded, point HF_HOME (or HF_DATASETS_CACHE) at its cache and set "
                                  "HF_HUB_OFFLINE=1") from None
    return docs.shuffle(seed=shuffle_seed, buffer_size=shuffle_buffer) if shuffle_seed >= 0 else docs


def document_texts(docs, text_field, skip=0):
    """Yield the text of each document after the first `skip` ones, with a clear error for a missing field."""
    for i, example in enumerate(docs.skip(skip) if skip else docs):
        if text_field not in example:
            raise KeyError(f"document {skip + i} has no field {text_field!r} (fields: {sorted(example)}); "
                           f"set --text_field")
        yield example[text_field]


# -- tokenization (runs in the worker processes) ---------------------------------

_encoder = None


def get_encoding(enc):
    """A tiktoken Encoding from a name or an Encoding object (kept as is: tests build small ones).
    tiktoken downloads the BPE files on first use; without network that fails deep inside `requests`,
    so the error here says where the files go instead."""
    import tiktoken
    if not isinstance(enc, str):
        return enc
    if enc not in tiktoken.list_encoding_names():
        raise ValueError(f"--encoding={enc!r} is not a tiktoken encoding; "
                         f"choose one of {tiktoken.list_encoding_names()}")
    try:
        return tiktoken.get_encoding(enc)
    except Exception as e:  # requests' ConnectionError/ProxyError, a blocked download, a corrupt cache, ...
        raise ConnectionError(f"could not load the tiktoken encoding {enc!r} ({type(e).__name__}: {str(e)[:200]}). "
                              "tiktoken downloads its BPE files on first use; without network, copy the cache "
                              "directory of a machine that has them and set TIKTOKEN_CACHE_DIR=that "
                              "directory") from None


def _init_worker(enc):
    """Load the encoding (in a pool worker, or in the main process when there is no pool)."""
    global _encoder
    _encoder = get_encoding(enc)


def start_pool(num_proc, encoding):
    """A pool whose workers ignore Ctrl-C: it reaches the whole process group, and the main process stops the
    workers, so a Ctrl-C prints one message, not a traceback per worker. SIGINT is ignored while the workers
    are forked, so that a worker still running its after-fork hooks cannot be interrupted either."""
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        return mp.Pool(num_proc, initializer=_init_worker, initargs=(encoding,))
    finally:
        signal.signal(signal.SIGINT, handler)


def tokenize(text):
    """[EOT] + tokens of one document, as uint16 (the EOT marks a document boundary)."""
    tokens = [_encoder.eot_token] + _encoder.encode_ordinary(text)
    return np.array(tokens, dtype=np.uint16)


# -- the driver --------------------------------------------------------------------

def load_state(out_dir, settings, inputs):
    """(finished shards, whether the whole run had finished, whether a state file exists). Each shard
    entry records its token count, its sha256 and the resume point after it: documents fully consumed,
    tokens of the next document already used. Only a prefix of shards that still exist unaltered counts;
    other settings or other input files -> start over."""
    path = os.path.join(out_dir, STATE_FILE)
    if not os.path.exists(path):
        return [], False, False
    with open(path) as f:
        state = json.load(f)
    if state.get("settings") != settings:
        old, new = ({i["name"]: i for i in s} for s in (state.get("inputs", []), inputs))
        changed = sorted(n for n in old.keys() | new.keys() if old.get(n) != new.get(n))
        why = identity_diff(state.get("settings", {}), settings, may_differ=("inputs_sha256",))
        why += [f"{len(changed)} input file(s) changed, added or removed: {', '.join(changed[:5])}"
                f"{', ...' if len(changed) > 5 else ''}"] if changed else []
        print(f"{path} was written with other settings or inputs ({'; '.join(why)}); tokenizing from the start")
        return [], False, True
    done = []
    for i, entry in enumerate(state["shards"]):
        if file_sha256(shard_path(out_dir, i, settings["prefix"])) != entry["sha256"]:
            break
        done.append(entry)
    return done, state["complete"] and len(done) == len(state["shards"]), True


def save_state(out_dir, settings, inputs, shards, complete=False):
    atomic_write_json(dict(settings=settings, inputs=inputs, shards=shards, complete=complete),
                      os.path.join(out_dir, STATE_FILE))


def write_manifest(out_dir, settings, input, base, package, inputs, shards):
    """The provenance record of a finished run (the module docstring lists what it holds)."""
    atomic_write_json(dict(settings=settings, input=input, input_base=base, package=package, inputs=inputs,
                           shards=[dict(name=os.path.basename(shard_path(out_dir, i, settings["prefix"])),
                                        tokens=s["tokens"], sha256=s["sha256"]) for i, s in enumerate(shards)],
                           tokens=sum(s["tokens"] for s in shards), documents=shards[-1]["docs"]),
                      os.path.join(out_dir, MANIFEST_FILE))


def prepare(dataset=dataset, dataset_config=dataset_config, split=split, input=input, text_field=text_field,
            txt_sample_by=txt_sample_by, shuffle_seed=shuffle_seed, shuffle_buffer=shuffle_buffer,
            encoding=encoding, out_dir=out_dir, prefix=prefix, shard_size=shard_size, num_tokens=num_tokens,
            num_proc=num_proc, chunksize=chunksize):
    """Tokenize the documents into shards under out_dir; returns the list of shard paths.
    `encoding` is a tiktoken name or Encoding object. Every setting and input file is checked before
    out_dir is touched; a Ctrl-C raises KeyboardInterrupt saying what was kept."""
    errors = setting_errors(dataset, input, text_field, txt_sample_by, shuffle_seed, shuffle_buffer, encoding, out_dir,
                            prefix, shard_size, num_tokens, num_proc, chunksize)
    if errors:
        raise ValueError("\n".join(errors))
    shard_size, num_tokens = int(shard_size), int(num_tokens)
    files, base, package, inputs = [], None, None, []
    if input:
        pattern, base, package = resolve_input(input)
        files, builder = local_files(pattern)
        inputs = [input_record(f, base, utf8=builder != "parquet") for f in files]
    enc = get_encoding(encoding)
    if enc.n_vocab > 2**16:
        raise ValueError(f"encoding {enc.name!r} has {enc.n_vocab} tokens; uint16 shards hold at most 65536")
    settings = dict(source=pattern if input else f"{dataset}/{dataset_config}/{split}",
                    text_field=text_field, txt_sample_by=txt_sample_by, shuffle_seed=shuffle_seed,
                    shuffle_buffer=shuffle_buffer, encoding=enc.name, n_vocab=enc.n_vocab,
                    shard_size=shard_size, num_tokens=num_tokens, prefix=prefix,
                    inputs_sha256=hashlib.sha256(json.dumps(inputs).encode()).hexdigest())
    os.makedirs(out_dir, exist_ok=True)
    shards, complete, had_state = load_state(out_dir, settings, inputs)
    if not shards:  # a fresh start: shards already here must not end up next to ours
        stray = stray_shards(out_dir, prefix, keep=0)
        if stray and not had_state:
            raise ValueError(f"{out_dir} holds {len(stray)} {prefix}_*.bin shard(s) but no {STATE_FILE}, so they are "
                             f"not from this script's runs; delete them or choose another --out_dir (refusing to "
                             f"mix them with new shards)")
        remove_shards(stray, "of an earlier run with other settings or inputs")
    if complete:
        print(f"{out_dir}: all {len(shards)} shards already written; nothing to do")
        remove_shards(stray_shards(out_dir, prefix, len(shards)), "beyond the end of this run (left by an earlier run)")
        write_manifest(out_dir, settings, input, base, package, inputs, shards)
        return [shard_path(out_dir, i, prefix) for i in range(len(shards))]
    if os.path.exists(os.path.join(out_dir, MANIFEST_FILE)):  # it would describe shards about to be rewritten
        os.remove(os.path.join(out_dir, MANIFEST_FILE))
    written = sum(s["tokens"] for s in shards)
    docs_done, carry = (shards[-1]["docs"], shards[-1]["carry"]) if shards else (0, 0)
    if shards:
        print(f"{out_dir}: {len(shards)} finished shard(s) found ({written:,} tokens); resuming after them")

    docs = load_documents(dataset, dataset_config, split, files, text_field, txt_sample_by, shuffle_seed,
                          shuffle_buffer)
    texts = document_texts(docs, text_field, skip=docs_done)
    buf = np.empty(shard_size, dtype=np.uint16)
    fill = 0
    bar = tqdm(total=num_tokens or None, initial=written, unit="tok", unit_scale=True, desc="tokenizing")
    pool = start_pool(num_proc, encoding) if num_proc > 1 else None
    if pool is None:
        _init_worker(encoding)
    stream = pool.imap(tokenize, texts, chunksize=chunksize) if pool else map(tokenize, texts)
    doc_index = docs_done  # index (in the whole stream) of the document being copied

    def flush(next_docs, next_carry):
        """Write the buffer as the next shard; (next_docs, next_carry) is where the stream resumes."""
        nonlocal fill, written
        sha256 = write_shard(shard_path(out_dir, len(shards), prefix), buf[:fill])
        shards.append(dict(tokens=fill, docs=next_docs, carry=next_carry, sha256=sha256))
        save_state(out_dir, settings, inputs, shards)
        written += fill
        fill = 0

    try:
        for tokens in stream:
            offset, carry = carry, 0  # the first `carry` tokens of a resumed document are already written
            while offset < len(tokens) and not (num_tokens and written + fill >= num_tokens):
                room = shard_size - fill
                if num_tokens:
                    room = min(room, num_tokens - written - fill)
                take = min(room, len(tokens) - offset)
                buf[fill:fill + take] = tokens[offset:offset + take]
                fill += take
                offset += take
                bar.update(take)
                if fill == shard_size or (num_tokens and written + fill >= num_tokens):
                    flush(*((doc_index + 1, 0) if offset == len(tokens) else (doc_index, offset)))
            doc_index += 1
            if num_tokens and written >= num_tokens:
                break
        if fill:
            flush(doc_index, 0)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(f"{len(shards)} finished shard(s) ({written:,} tokens) kept in {out_dir}") from None
    finally:
        bar.close()
        if pool:
            pool.terminate()
    if not shards:
        names = [i["name"] for i in inputs]
        source = f"--input={input!r} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})" if input \
            else f"--dataset={dataset!r}"
        raise ValueError(f"{source} gave no documents, so 0 tokens were written; check that the files hold text, "
                         f"and with --txt_sample_by={txt_sample_by} (paragraph: text between blank lines) try "
                         f"--txt_sample_by=document")
    save_state(out_dir, settings, inputs, shards, complete=True)
    write_manifest(out_dir, settings, input, base, package, inputs, shards)
    remove_shards(stray_shards(out_dir, prefix, len(shards)), "beyond the end of this run (left by an earlier run)")
    if len(shards) < 2:
        print(f"warning: only a validation shard was written ({written:,} tokens <= shard_size={shard_size:,}); "
              f"use a smaller --shard_size to get training shards")
    print(f"wrote {len(shards)} shard(s), {written:,} tokens, to {out_dir}")
    return [shard_path(out_dir, i, prefix) for i in range(len(shards))]


def parse_overrides(argv, defaults):
    """--name=value overrides of the constants at the top of a script (nanoGPT style): flags True/False, numbers
    parsed (--eval_tokens=1e5 is an int if whole), strings and comma lists as written. A wrong name or value
    stops with a message naming the choices; --help (or -h) prints every setting with its default and comment."""
    config = dict(defaults)
    for arg in argv:
        if arg in ("-h", "--help"):
            print(settings_help(defaults))
            raise SystemExit(0)
        key, eq, text = arg[2:].partition("=")
        if not arg.startswith("--") or not eq:
            raise SystemExit(f"bad argument {arg!r}: use --name=value (names: {', '.join(config)}; --help lists them)")
        if key not in config:
            raise SystemExit(f"unknown setting --{key}; known: {', '.join(config)}")
        default, value = config[key], text
        if isinstance(default, bool):
            if text not in ("True", "False"):
                raise SystemExit(f"--{key}={text}: expected True or False")
            value = text == "True"
        elif isinstance(default, (int, float)):
            try:
                value = float(text)
            except ValueError:
                raise SystemExit(f"--{key}={text}: expected a number") from None
            if isinstance(default, int) and not value.is_integer():
                raise SystemExit(f"--{key}={text}: expected a whole number")
            value = type(default)(value)
        config[key] = value
    return config


def settings_help(defaults):
    """Every setting as --name=default with the comment beside its constant at the top of this file."""
    comments = {}
    with open(__file__) as f:
        for name, eq, rest in (line.rstrip("\n").partition(" = ") for line in f):
            if eq and name in defaults and name not in comments:
                comments[name] = rest.split("  # ", 1)[1] if "  # " in rest else ""
    width = min(40, max(len(f"--{k}={v}") for k, v in defaults.items()))
    out = [f"python {os.path.basename(__file__)} [--name=value ...]  (flags True/False, lists comma-separated)"]
    return "\n".join(out + [f"  {f'--{k}={v}':<{width}}  {comments.get(k, '')}".rstrip() for k, v in defaults.items()])


def data_fingerprint(paths):
    """sha256 (first 16 hex digits) of the data files a run reads, in order: each file's name, size
    and content. Caches and resume key on it, so shards rewritten under the same path are noticed
    (hashing reads each file once, about a second per GB)."""
    h = hashlib.sha256()
    for path in paths:
        h.update(f"{os.path.basename(path)}\0{os.path.getsize(path)}\0".encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def run_identity(settings, code_hash, data_hash):
    """A run's identity, one flat JSON-normal dict: the resolved settings that change its result (the
    compute dtype muon_optim picks included), the hash of the code it runs and of the data it reads.
    A cached run is reused, and a checkpoint resumed, only on an equal identity; never on a path or label."""
    return json.loads(json.dumps({**settings, "source_hash": code_hash, "data_hash": data_hash}, sort_keys=True))


def identity_diff(old, new, may_differ=()):
    """['name: old -> new', ...] for each entry in which two run identities differ, except `may_differ`."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
            if k not in may_differ and old.get(k) != new.get(k)]

def atomic_write_json(obj, path):
    """json.dump to a temp file, then rename."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


if __name__ == "__main__":
    CONFIG = dict(dataset=dataset, dataset_config=dataset_config, split=split, input=input, text_field=text_field,
                  txt_sample_by=txt_sample_by, shuffle_seed=shuffle_seed, shuffle_buffer=shuffle_buffer,
                  encoding=encoding, out_dir=out_dir, prefix=prefix, shard_size=shard_size, num_tokens=num_tokens,
                  num_proc=num_proc, chunksize=chunksize)
    try:
        prepare(**parse_overrides(sys.argv[1:], CONFIG))
    except (FileNotFoundError, ValueError, KeyError, ConnectionError) as e:
        raise SystemExit(f"error: {e}")
    except KeyboardInterrupt as e:  # finished shards are complete files and the state says where they end
        print(f"\nstopped by Ctrl-C: {e or 'no shard written yet'}; run the same command again to resume after "
              f"them", file=sys.stderr)
        raise SystemExit(130)

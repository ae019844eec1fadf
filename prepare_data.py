"""
Prepare token shards for stack_gpt.py.

Datasets, each written to its own folder <out-dir>/<name>/:
  stdlib       (default) the Python standard library's source and pydoc topics: offline,
               a few MB of text, tokenized with a BPE trained here (vocab 4096)
  pylibs       stdlib plus the installed torch and numpy sources (~15M tokens), offline
  fineweb-edu  pretokenized FineWeb-Edu shards with GPT-2 tokens, downloaded
  --input      your own text files or folders, with a new BPE or --tokenizer gpt2

  python prepare_data.py
  python prepare_data.py --dataset pylibs
  python prepare_data.py --dataset fineweb-edu --shards 4
  python prepare_data.py --input notes/ book.txt --name mine --vocab-size 8192

A dataset folder holds train_000000.bin, ... and val_000000.bin, ... in the llm.c format
(a header of 256 int32: magic 20240520, version 1, token count; then uint16 tokens, each
document preceded by <|endoftext|>), tokenizer.tiktoken (the ranks, in tiktoken's own
file format), token_bytes.npy (the UTF-8 length of each token id, for bits per byte) and
meta.json, written last with "complete": true. stack_gpt.py reads this format with its own few
lines of code (the format is the interface), so that it runs alone.
"""

import argparse
import hashlib
import heapq
import importlib.metadata
import importlib.util
import json
import math
import os
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from base64 import b64decode, b64encode
from collections import Counter, defaultdict
from http.client import HTTPException

import numpy as np
import regex  # tiktoken's own dependency; unlike `re` it knows \p{L} and \p{N}
import tiktoken

DATASETS = ("stdlib", "pylibs", "fineweb-edu")
SHARD_MAGIC, SHARD_VERSION, HEADER_INTS = 20240520, 1, 256
HEADER_BYTES = 4 * HEADER_INTS
MAX_VOCAB = 2**16  # token ids are stored as uint16
EOT = "<|endoftext|>"
# GPT-4 style split: words with their leading space or punctuation, numbers of up to three
# digits, punctuation runs, newlines and whitespace runs. BPE merges never cross these
# boundaries, so no token can glue a word to the next one.
GPT4_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}"""
                r"""| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+""")
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_EOT_ID = 50256
FINEWEB_URL = "https://huggingface.co/datasets/kjj0/finewebedu10B-gpt2/resolve/main"
URL_ENV = "STACK_GPT_DATA_URL"
RETRY_DELAY = 1.0  # seconds before the first retry of a download; doubles after each try
# A long file is cut at line ends into pieces of about this many characters, each its own
# document, so that even a single large file (a book, a log) yields a val split.
PIECE_CHARS = 64 * 1024
DOCS_PER_BATCH = 64  # documents (at most 64 KB each) handed to tiktoken's threads per call
SHARD_TOKENS = 10**7  # tokens per shard file (20 MB)
BPE_SAMPLE_MB = 16  # the BPE learns from at most this much train text: enough for a small vocab
THREADS = os.cpu_count() or 1
# Every file name this script writes into a dataset folder, temporary ones included.
OUR_FILES = regex.compile(r"((finewebedu_)?(train|val)_\d{6}\.bin|meta\.json|tokenizer\.tiktoken"
                          r"|token_bytes\.npy)(\.tmp|\.part)?")


class DataError(Exception):
    """A problem with the user's input or data: a one-line message that names the fix."""


# -----------------------------------------------------------------------------
# Shards: the llm.c token format

def write_atomic(path, write):
    """Call write(file) on path.tmp and rename it to path only once it is complete."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename, so a crash cannot leave a renamed empty file
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):  # an error or Ctrl-C midway: leave nothing half-written
            os.remove(tmp)


def write_shard(path, tokens):
    tokens = np.asarray(tokens)
    assert tokens.size == 0 or (tokens.min() >= 0 and tokens.max() < MAX_VOCAB), "ids beyond uint16"
    header = np.zeros(HEADER_INTS, np.int32)
    header[:3] = SHARD_MAGIC, SHARD_VERSION, len(tokens)
    write_atomic(path, lambda f: (f.write(header.tobytes()), f.write(tokens.astype(np.uint16).tobytes())))


def shard_token_count(path, fix="; delete it and rerun prepare_data.py"):
    """Check a shard's header against its size and return its token count."""
    size = os.path.getsize(path)
    if size < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard ({size} bytes, shorter than the header){fix}")
    magic, version, count = np.fromfile(path, np.int32, count=3)
    if magic != SHARD_MAGIC or version != SHARD_VERSION:
        raise DataError(f"{path}: not a token shard (magic {magic}, version {version}){fix}")
    if size != HEADER_BYTES + 2 * int(count):
        raise DataError(f"{path}: header says {count} tokens but the file holds "
                        f"{(size - HEADER_BYTES) / 2:g} (truncated or corrupt){fix}")
    return int(count)


def read_shard(path):
    """The tokens of a checked shard, memory-mapped so that big shards cost no RAM."""
    count = shard_token_count(path)
    return np.memmap(path, np.uint16, mode="r", offset=HEADER_BYTES, shape=(count,))


def write_shards(out_dir, split, tokens, shard_tokens):
    """Write tokens as <split>_000000.bin, <split>_000001.bin, ... of shard_tokens each."""
    names = [f"{split}_{k:06d}.bin" for k in range(max(1, -(-len(tokens) // shard_tokens)))]
    for k, name in enumerate(names):
        write_shard(os.path.join(out_dir, name), tokens[k * shard_tokens:(k + 1) * shard_tokens])
    return names


# -----------------------------------------------------------------------------
# Byte-level BPE, trained here and run by tiktoken

def merge_pair(ids, pair, new_id):
    """Replace each occurrence of pair in ids, left to right, by new_id."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def train_bpe(texts, vocab_size, pattern=GPT4_PATTERN):
    """Learn BPE ranks {token bytes: id}: ids 0-255 are the bytes, each later id merges the
    most frequent adjacent pair of earlier ids (ties: the smallest pair). One id is left
    for <|endoftext|>, so it returns vocab_size - 1 ranks (fewer if the text runs out of pairs)."""
    t0 = time.time()
    # Split as the encoder will and count each distinct chunk once: text repeats its
    # chunks so much that this shrinks the work ten- to a hundredfold.
    split = regex.compile(pattern)
    chunk_counts = Counter()
    for text in texts:
        chunk_counts.update(split.findall(text))
    words = [list(chunk.encode("utf-8")) for chunk in chunk_counts]
    weights = list(chunk_counts.values())
    # The incremental pair index: the total count of every pair, the chunks that may hold
    # it, and a heap to find the best pair. A merge only touches the chunks holding its pair.
    pair_count, where = defaultdict(int), defaultdict(set)
    for i, (word, weight) in enumerate(zip(words, weights)):
        for pair in zip(word, word[1:]):
            pair_count[pair] += weight
            where[pair].add(i)
    heap = [(-count, pair) for pair, count in pair_count.items()]
    heapq.heapify(heap)
    vocab = [bytes([b]) for b in range(256)]
    ranks = {token: i for i, token in enumerate(vocab)}
    while len(vocab) < vocab_size - 1 and heap:
        neg_count, pair = heapq.heappop(heap)
        if pair_count.get(pair) != -neg_count:
            continue  # a stale heap entry: the pair's count changed since it was pushed
        token = vocab[pair[0]] + vocab[pair[1]]
        if token in ranks:  # the same bytes from another pair: tiktoken keys ranks by bytes
            del pair_count[pair]
            continue
        new_id = len(vocab)
        vocab.append(token)
        ranks[token] = new_id
        touched = set()
        for i in where.pop(pair):
            word, weight = words[i], weights[i]
            merged = merge_pair(word, pair, new_id)
            if len(merged) == len(word):
                continue  # the index is lazy: this chunk lost the pair to an earlier merge
            for p in zip(word, word[1:]):
                pair_count[p] -= weight
                touched.add(p)
            for p in zip(merged, merged[1:]):
                pair_count[p] += weight
                where[p].add(i)
                touched.add(p)
            words[i] = merged
        for p in touched:
            if pair_count[p] > 0:
                heapq.heappush(heap, (-pair_count[p], p))
            else:
                del pair_count[p]
    print(f"trained BPE: {len(ranks)} tokens from {len(words):,} distinct chunks "
          f"in {time.time() - t0:.1f}s")
    return ranks


def make_encoding(ranks, name, pattern=GPT4_PATTERN, eot_id=None):
    """Wrap ranks as a tiktoken.Encoding: its Rust BPE applies the lowest-rank merge
    first, which is our training order; <|endoftext|> goes right after the ranks."""
    eot_id = len(ranks) if eot_id is None else eot_id
    return tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={EOT: eot_id})


def read_ranks(path):
    """Parse a .tiktoken file: one 'base64-of-token-bytes rank' line per token."""
    ranks = {}
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            try:
                token, rank = line.split()
                ranks[b64decode(token, validate=True)] = int(rank)
            except ValueError:
                raise DataError(f"{path} line {n} is not 'base64 rank': "
                                f"give a tiktoken ranks file (like gpt2.tiktoken)") from None
    return ranks


def gpt2_encoding(tiktoken_file=None):
    """GPT-2's tokenizer, from a local ranks file or else tiktoken's (downloaded) copy."""
    if tiktoken_file:
        if not os.path.isfile(tiktoken_file):
            raise DataError(f"--tiktoken-file {tiktoken_file} not found: give the path of gpt2.tiktoken")
        return make_encoding(read_ranks(tiktoken_file), "gpt2", GPT2_PATTERN, GPT2_EOT_ID)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception:  # tiktoken downloads the ranks on first use; any failure means offline
        raise DataError("tiktoken could not load the GPT-2 tokenizer (it needs a download): "
                        "pass --tiktoken-file PATH of a local gpt2.tiktoken") from None


def save_tokenizer(enc, out_dir):
    """Write tokenizer.tiktoken and token_bytes.npy (UTF-8 bytes per id, 0 for special ids)."""
    specials = {enc.encode_single_token(t) for t in enc.special_tokens_set}
    lengths, lines = np.zeros(enc.n_vocab, np.int32), []
    for i in range(enc.n_vocab):
        if i in specials:
            continue
        try:
            token = enc.decode_single_token_bytes(i)
        except KeyError:  # an id with no token (a gap in the ranks)
            continue
        lengths[i] = len(token)
        lines.append(b64encode(token) + b" %d\n" % i)
    write_atomic(os.path.join(out_dir, "tokenizer.tiktoken"), lambda f: f.writelines(lines))
    write_atomic(os.path.join(out_dir, "token_bytes.npy"), lambda f: np.save(f, lengths))
    return lengths


# -----------------------------------------------------------------------------
# Text corpora: lists of (document name, text)

def python_files(root, prefix):
    """The non-test .py files under root, as (prefix/relative path, path)."""
    skip_dirs = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip_dirs and not d.startswith((".", "config-"))]
        for f in files:  # _sysconfigdata records this machine's build paths: not portable
            if f.endswith(".py") and not f.startswith(("test_", "_sysconfigdata")):
                path = os.path.join(folder, f)
                found.append((f"{prefix}/{os.path.relpath(path, root)}".replace(os.sep, "/"), path))
    return found


def text_files(paths):
    """The files named, plus every non-hidden file under the folders named."""
    found = []
    for p in paths:
        if not os.path.exists(p):
            raise DataError(f"input path not found: {p}: check the paths given to --input")
        if os.path.isfile(p):
            found.append((os.path.basename(p), p))
        for folder, dirs, files in os.walk(p):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
            base = os.path.basename(os.path.abspath(p))
            found += [(f"{base}/{os.path.relpath(os.path.join(folder, f), p)}".replace(os.sep, "/"),
                       os.path.join(folder, f)) for f in files if not f.startswith(".")]
    return found


def read_documents(files):
    """Read files in name order as UTF-8, skipping binary ones and cutting long ones into
    pieces. Undecodable bytes become U+FFFD; returns (documents, replacements made)."""
    docs, replaced = [], 0
    for name, path in sorted(files):
        with open(path, "rb") as f:
            raw = f.read()
        if b"\0" in raw[:8192]:
            continue  # NUL bytes: a binary file, not text
        text = raw.decode("utf-8", errors="replace")
        replaced += text.count("\ufffd") - raw.decode("utf-8", errors="ignore").count("\ufffd")
        docs += cut_pieces(name, text)
    return docs, replaced


def cut_pieces(name, text):
    if len(text) <= PIECE_CHARS:
        return [(name, text)] if text else []
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + PIECE_CHARS) + 1 or len(text)
        pieces.append((f"{name}#{len(pieces)}", text[start:end]))
        start = end
    return pieces


def builtin_corpus(dataset):
    """(documents, replacements, description) of the offline datasets stdlib and pylibs."""
    files = python_files(sysconfig.get_paths()["stdlib"], "stdlib")
    source = f"Python {sys.version.split()[0]} standard library (.py, tests excluded), pydoc topics"
    if dataset == "pylibs":
        for package in ("torch", "numpy"):
            spec = importlib.util.find_spec(package)  # locate without importing
            if spec and spec.submodule_search_locations:
                files += python_files(spec.submodule_search_locations[0], package)
                source += f", {package} {importlib.metadata.version(package)} (.py)"
    docs, replaced = read_documents(files)
    from pydoc_data.topics import topics  # the English text behind help('keywords') etc.
    docs += [(f"pydoc_topics/{key}", topics[key]) for key in sorted(topics)]
    return docs, replaced, source


def val_score(name):
    """A stable pseudo-random number in [0, 1) from a document's name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def split_documents(docs, val_fraction):
    """Documents whose name scores under val_fraction go to val (always at least one, and
    at least one to train): the rule never changes, so experiments never train on val."""
    if len(docs) < 2:
        raise DataError(f"the input holds a single short document: give more text "
                        f"(two files, or one of over {PIECE_CHARS // 1024} KB)")
    scores = [val_score(name) for name, _ in docs]
    is_val = [s < val_fraction for s in scores]
    if not any(is_val):
        is_val[scores.index(min(scores))] = True
    if all(is_val):
        is_val[scores.index(max(scores))] = False
    return ([d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v])


# -----------------------------------------------------------------------------
# Building a dataset folder

class Progress:
    """A progress line on stderr (MB done, rate, ETA), redrawn at most twice a second."""

    def __init__(self, label, total_bytes=0):
        self.label, self.total, self.t0, self.last = label, total_bytes / 1e6, time.time(), 0.0

    def update(self, done_bytes, final=False):
        now, done = time.time(), done_bytes / 1e6
        if now - self.last < 0.5 and not final:
            return
        self.last, rate = now, done / max(now - self.t0, 1e-9)
        line = f"\r{self.label}: {done:.1f}" + (f"/{self.total:.1f}" if self.total else "")
        line += f" MB, {rate:.1f} MB/s"
        if self.total and not final:
            line += f", ETA {(self.total - done) / max(rate, 1e-9):.0f}s"
        print(line + "   ", end="\n" if final else "", file=sys.stderr, flush=True)


def claim_out_dir(out_dir, identity, overwrite, keep_shards=False):
    """Make out_dir ours: refuse one holding another dataset (or foreign files) unless
    overwrite, then drop its meta.json (so it reads as incomplete until we finish) and,
    unless keep_shards, our old files."""
    meta_path = os.path.join(out_dir, "meta.json")
    fix = "pass --overwrite to replace it, or choose another --name or --out-dir"
    if os.path.exists(meta_path) and not overwrite:
        try:
            with open(meta_path) as f:
                old = json.load(f)
            old = {key: old.get(key) for key in identity}
        except (ValueError, AttributeError):
            old = "unreadable meta.json"
        if old != identity:
            raise DataError(f"{out_dir} holds a different dataset ({old}): {fix}")
    elif os.path.isdir(out_dir) and not overwrite:
        foreign = sorted(f for f in os.listdir(out_dir) if not OUR_FILES.fullmatch(f))
        if foreign:
            raise DataError(f"{out_dir} holds files that are not ours ({foreign[0]}, ...): {fix}")
    os.makedirs(out_dir, exist_ok=True)
    for f in os.listdir(out_dir):
        if OUR_FILES.fullmatch(f) and (f == "meta.json" or not keep_shards):
            os.remove(os.path.join(out_dir, f))


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def tokenize_split(enc, docs, out_dir, split, shard_tokens):
    """Encode documents over threads into shards, each document preceded by <|endoftext|>.
    Returns (shard names, token count, text bytes)."""
    total = sum(len(text.encode("utf-8")) for _, text in docs)
    progress, done, arrays = Progress(f"tokenizing {split}", total), 0, []
    for start in range(0, len(docs), DOCS_PER_BATCH):
        batch = [text for _, text in docs[start:start + DOCS_PER_BATCH]]
        # encode_ordinary: a literal "<|endoftext|>" inside the text stays plain text
        for tokens in enc.encode_ordinary_batch(batch, num_threads=THREADS):
            arrays.append(np.array([enc.eot_token] + tokens, np.uint16))
        done += sum(len(text.encode("utf-8")) for text in batch)
        progress.update(done)
    progress.update(done, final=True)
    tokens = np.concatenate(arrays)
    return write_shards(out_dir, split, tokens, shard_tokens), len(tokens), total


def bpe_sample(docs, megabytes):
    """The tokenizer's training text: train documents in a fixed pseudo-random order, up to a size."""
    texts, size = [], 0
    for _, text in sorted(docs, key=lambda doc: val_score(doc[0])):
        if size >= megabytes * 1e6:
            break
        texts.append(text)
        size += len(text)
    return texts


def check_options(vocab_size, tokenizer, val_fraction):
    if tokenizer not in ("bpe", "gpt2"):
        raise DataError(f"unknown --tokenizer {tokenizer!r}: choose bpe or gpt2")
    if tokenizer == "bpe" and vocab_size > MAX_VOCAB:
        raise DataError(f"--vocab-size {vocab_size} is too large: shards store ids as uint16, "
                        f"so use at most {MAX_VOCAB}")
    if tokenizer == "bpe" and vocab_size < 257:
        raise DataError(f"--vocab-size {vocab_size} is too small: use at least 257 "
                        f"(256 byte tokens and <|endoftext|>)")
    if not 0 < val_fraction < 1:
        raise DataError(f"--val-fraction {val_fraction} must lie between 0 and 1, like 0.05")


def write_meta(out_dir, meta):
    """Record checksums, then write meta.json with "complete": true as the very last step."""
    files = meta["train_shards"] + meta["val_shards"]
    files += [f for f in ("tokenizer.tiktoken", "token_bytes.npy") if os.path.exists(os.path.join(out_dir, f))]
    meta["sha256"] = {f: file_sha256(os.path.join(out_dir, f)) for f in files}
    meta["complete"] = True
    write_atomic(os.path.join(out_dir, "meta.json"), lambda f: f.write(json.dumps(meta, indent=1).encode()))
    return meta


def build_dataset(docs, out_dir, source, inputs, replaced=0, vocab_size=4096, tokenizer="bpe",
                  tiktoken_file=None, overwrite=False, val_fraction=0.05,
                  shard_tokens=SHARD_TOKENS, bpe_sample_mb=BPE_SAMPLE_MB):
    """Split documents, train (or load) the tokenizer, write shards and meta; returns meta."""
    name = os.path.basename(os.path.normpath(out_dir))
    enc = gpt2_encoding(tiktoken_file) if tokenizer == "gpt2" else None
    train_docs, val_docs = split_documents(docs, val_fraction)
    build = {"inputs": inputs, "tokenizer": tokenizer, "vocab_size": None if enc else vocab_size}
    claim_out_dir(out_dir, {"name": name, "build": build}, overwrite)
    if replaced:
        print(f"note: replaced {replaced} undecodable byte sequences with U+FFFD")
    if enc is None:
        ranks = train_bpe(bpe_sample(train_docs, bpe_sample_mb), vocab_size)
        enc = make_encoding(ranks, name)
    save_tokenizer(enc, out_dir)
    t0 = time.time()
    train_shards, train_tokens, train_bytes = tokenize_split(enc, train_docs, out_dir, "train", shard_tokens)
    val_shards, val_tokens, val_bytes = tokenize_split(enc, val_docs, out_dir, "val", shard_tokens)
    seconds, megabytes = max(time.time() - t0, 1e-9), (train_bytes + val_bytes) / 1e6
    print(f"tokenized {megabytes:.1f} MB in {seconds:.1f}s: {megabytes / seconds:.1f} MB/s "
          f"on {THREADS} threads")
    text_tokens = train_tokens + val_tokens - len(docs)  # each document adds one <|endoftext|>
    meta = write_meta(out_dir, {
        "name": name, "source": source, "build": build,
        "tokenizer": tokenizer, "vocab_size": enc.n_vocab,
        "pattern": GPT2_PATTERN if tokenizer == "gpt2" else GPT4_PATTERN,
        "special_tokens": {EOT: enc.eot_token}, "eot_id": enc.eot_token,
        "train_shards": train_shards, "val_shards": val_shards,
        "train_tokens": train_tokens, "val_tokens": val_tokens,
        "train_documents": len(train_docs), "val_documents": len(val_docs),
        "train_bytes": train_bytes, "val_bytes": val_bytes,
        "token_bytes": True, "bytes_per_token": round((train_bytes + val_bytes) / max(text_tokens, 1), 4),
        "replaced_chars": replaced,
        "val_rule": f"sha256(document name) as a fraction < {val_fraction}",
        "python": sys.version.split()[0],
    })
    print(f"wrote {out_dir}: {train_tokens:,} train and {val_tokens:,} val tokens, "
          f"{meta['bytes_per_token']:.2f} bytes/token, vocab {enc.n_vocab}")
    return meta


def build_text_dataset(paths, out_dir, vocab_size=4096, tokenizer="bpe", overwrite=False,
                       val_fraction=0.05, tiktoken_file=None, shard_tokens=SHARD_TOKENS,
                       bpe_sample_mb=BPE_SAMPLE_MB):
    """A dataset in out_dir from the user's text files and folders (also what --input runs)."""
    check_options(vocab_size, tokenizer, val_fraction)
    docs, replaced = read_documents(text_files(paths))
    if not docs:
        raise DataError(f"no text found in {', '.join(map(str, paths))}: give text files or "
                        f"folders holding some (binary and hidden files are skipped)")
    return build_dataset(docs, out_dir, "text files: " + ", ".join(map(str, paths)),
                         [os.path.abspath(p) for p in paths], replaced, vocab_size, tokenizer,
                         tiktoken_file, overwrite, val_fraction, shard_tokens, bpe_sample_mb)


# -----------------------------------------------------------------------------
# FineWeb-Edu: pretokenized GPT-2 shards, downloaded

def fetch(url, part):
    """Stream url into the file part with a progress bar; complain if it ends early."""
    with urllib.request.urlopen(url, timeout=60) as response, open(part, "wb") as f:
        total = int(response.headers.get("Content-Length") or 0)
        progress, done = Progress(os.path.basename(url), total), 0
        while block := response.read(2**20):
            f.write(block)
            done += len(block)
            progress.update(done)
        progress.update(done, final=True)
    if total and done != total:
        raise DataError(f"the connection closed after {done} of {total} bytes")


def download(url, path, retries):
    """Download url to path through path.part, retrying with exponential backoff. The rename
    to path happens only once the header and the size check out, so path is always whole."""
    part, delay = path + ".part", RETRY_DELAY
    for attempt in range(1, retries + 1):
        try:
            fetch(url, part)
            shard_token_count(part, fix="")
            os.replace(part, path)
            return
        except urllib.error.HTTPError as e:
            problem = f"HTTP {e.code} {e.reason}"
            if 400 <= e.code < 500:
                break  # a wrong URL or file name: asking again will not help
        except (OSError, HTTPException, DataError) as e:
            problem = str(e).replace(part, os.path.basename(part)) or type(e).__name__
        finally:
            if os.path.exists(part):  # also on Ctrl-C: no partial file survives
                os.remove(part)
        if attempt < retries:
            print(f"{url}: {problem}; retry {attempt}/{retries - 1} in {delay:g}s", file=sys.stderr)
            time.sleep(delay)
            delay *= 2
    raise DataError(f"download failed: {url} ({problem}); check the network or use a mirror "
                    f"with --base-url URL or {URL_ENV}=URL")


def download_fineweb(out_dir, shards=1, base_url=FINEWEB_URL, retries=5, tiktoken_file=None,
                     overwrite=False):
    """Fetch the val shard and train shards 1..shards, skipping those already complete."""
    if shards < 1 or retries < 1:
        raise DataError(f"--shards {shards} --retries {retries}: give at least 1 of each")
    try:
        enc = gpt2_encoding(tiktoken_file)
    except DataError as e:
        if tiktoken_file:
            raise
        enc, missing = None, str(e)
    name = os.path.basename(os.path.normpath(out_dir))
    build = {"inputs": ["fineweb-edu"], "tokenizer": "gpt2", "vocab_size": None}
    claim_out_dir(out_dir, {"name": name, "build": build}, overwrite, keep_shards=True)
    val_shards = ["finewebedu_val_000000.bin"]
    train_shards = [f"finewebedu_train_{i:06d}.bin" for i in range(1, shards + 1)]
    for f in val_shards + train_shards:
        path = os.path.join(out_dir, f)
        try:
            shard_token_count(path)
            print(f"{f}: already complete")
        except (OSError, DataError):
            download(f"{base_url.rstrip('/')}/{f}", path, retries)
    count = lambda files: sum(shard_token_count(os.path.join(out_dir, f)) for f in files)
    meta = {"name": name, "source": f"FineWeb-Edu, GPT-2 tokens, from {base_url}", "build": build,
            "tokenizer": "gpt2", "vocab_size": GPT2_EOT_ID + 1, "pattern": GPT2_PATTERN,
            "special_tokens": {EOT: GPT2_EOT_ID}, "eot_id": GPT2_EOT_ID,
            "train_shards": train_shards, "val_shards": val_shards,
            "train_tokens": count(train_shards), "val_tokens": count(val_shards)}
    if enc is None:  # the shards are fine; only bits per byte needs the token byte lengths
        print(f"warning: {missing}; token_bytes.npy not written (bits per byte unavailable)",
              file=sys.stderr)
        meta.update(token_bytes=False, bytes_per_token=None)
    else:
        lengths = save_tokenizer(enc, out_dir)
        val = read_shard(os.path.join(out_dir, val_shards[0]))  # counted in slices: 100M tokens
        ids = sum((np.bincount(val[i:i + 2**24], minlength=enc.n_vocab) for i in range(0, len(val), 2**24)),
                  np.zeros(enc.n_vocab, np.int64))
        meta.update(token_bytes=True, bytes_per_token=round(
            float(ids @ lengths) / max(int(ids.sum() - ids[GPT2_EOT_ID]), 1), 4))
    write_meta(out_dir, meta)
    print(f"wrote {out_dir}: {meta['train_tokens']:,} train and {meta['val_tokens']:,} val tokens")
    return meta


# -----------------------------------------------------------------------------
# Reading a dataset back (the tests check every build with these)

def rebuild_command(data_dir):
    """The command that builds data_dir, guessed from the folder's name."""
    parent, name = os.path.split(os.path.normpath(data_dir))
    args = {"stdlib": "", "pylibs": " --dataset pylibs", "fineweb-edu": " --dataset fineweb-edu --shards N"}
    out_dir = "" if parent == "data" else f" --out-dir {parent or '.'}"
    return "python prepare_data.py" + args.get(name, f" --input PATH --name {name}") + out_dir


def load_meta(data_dir):
    """meta.json of a complete dataset whose shards are present, else a DataError."""
    path, run = os.path.join(data_dir, "meta.json"), f"run: {rebuild_command(data_dir)}"
    if not os.path.isfile(path):
        raise DataError(f"no dataset in {data_dir} (no meta.json); {run}")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("complete") is not True:
        raise DataError(f"{data_dir} is incomplete (an interrupted build?); {run}")
    for f in meta["train_shards"] + meta["val_shards"]:
        if not os.path.isfile(os.path.join(data_dir, f)):
            raise DataError(f"{data_dir} lacks its shard {f}; {run}")
    return meta


def load_tokenizer(data_dir):
    """The dataset's tiktoken.Encoding, rebuilt from tokenizer.tiktoken and meta.json."""
    meta = load_meta(data_dir)
    path = os.path.join(data_dir, "tokenizer.tiktoken")
    if os.path.isfile(path):
        return tiktoken.Encoding(meta["name"], pat_str=meta["pattern"], mergeable_ranks=read_ranks(path),
                                 special_tokens=meta["special_tokens"])
    if meta["tokenizer"] == "gpt2":
        return gpt2_encoding()
    raise DataError(f"{path} is missing; run: {rebuild_command(data_dir)}")


def load_token_bytes(data_dir):
    """int32 UTF-8 length of every token id (0 for special ids), for bits per byte."""
    load_meta(data_dir)
    path = os.path.join(data_dir, "token_bytes.npy")
    if not os.path.isfile(path):
        raise DataError(f"{path} is missing (the GPT-2 ranks were not available): rerun "
                        f"{rebuild_command(data_dir)} --tiktoken-file PATH/TO/gpt2.tiktoken")
    return np.load(path).astype(np.int32)


# -----------------------------------------------------------------------------
# Command line

class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag gets one line and exit code 2 like every other input error."""

    def error(self, message):
        print(f"error: {message} (see python {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def finite_float(text):
    """argparse type: a float flag takes ordinary numbers only (float() alone would accept nan and inf)."""
    try:
        value = float(text)
    except ValueError:
        value = None
    if value is None or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, like 0.5 (got {text!r})")
    return value


def parse_args(argv=None):
    p = OneLineParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--dataset", help=f"one of {', '.join(DATASETS)} (default: stdlib)")
    add("--input", nargs="+", metavar="PATH", help="your own text files or folders, instead of --dataset")
    add("--name", help="dataset folder in --out-dir (default: the dataset's name, or custom for --input)")
    add("--out-dir", default="data", help="folder holding the dataset folders")
    add("--tokenizer", default="bpe", help="bpe (trained here) or gpt2 (GPT-2's own)")
    add("--vocab-size", type=int, default=4096, help="BPE vocabulary size, <|endoftext|> included")
    add("--tiktoken-file", metavar="PATH", help="a local gpt2.tiktoken: GPT-2's tokenizer with no download")
    add("--val-fraction", type=finite_float, default=0.05, help="share of the documents held out for val")
    add("--shard-tokens", type=int, default=SHARD_TOKENS, help="tokens per shard file")
    add("--bpe-sample-mb", type=finite_float, default=BPE_SAMPLE_MB, help="MB of train text the BPE learns from")
    add("--shards", type=int, default=1, help="fineweb-edu: train shards of 100M tokens to fetch")
    add("--base-url", help=f"fineweb-edu: a mirror to download from (default: ${URL_ENV}, else Hugging Face)")
    add("--retries", type=int, default=5, help="fineweb-edu: attempts per file before giving up")
    add("--overwrite", action="store_true", help="replace an output folder holding a different dataset")
    return p.parse_args(argv)


def prepare(args):
    if args.input and args.dataset:
        raise DataError("give either --dataset or --input, not both")
    if args.shard_tokens < 1:
        raise DataError(f"--shard-tokens {args.shard_tokens}: give a positive number")
    if args.input:
        return build_text_dataset(args.input, os.path.join(args.out_dir, args.name or "custom"),
                                  args.vocab_size, args.tokenizer, args.overwrite, args.val_fraction,
                                  args.tiktoken_file, args.shard_tokens, args.bpe_sample_mb)
    dataset = args.dataset or "stdlib"
    if dataset not in DATASETS:
        raise DataError(f"unknown dataset {dataset!r}: choose one of {', '.join(DATASETS)}, "
                        f"or give your own text with --input PATH")
    out_dir = os.path.join(args.out_dir, args.name or dataset)
    if dataset == "fineweb-edu":
        base_url = args.base_url or os.environ.get(URL_ENV) or FINEWEB_URL
        return download_fineweb(out_dir, args.shards, base_url, args.retries, args.tiktoken_file, args.overwrite)
    check_options(args.vocab_size, args.tokenizer, args.val_fraction)
    docs, replaced, source = builtin_corpus(dataset)
    return build_dataset(docs, out_dir, source, [dataset], replaced, args.vocab_size, args.tokenizer,
                         args.tiktoken_file, args.overwrite, args.val_fraction, args.shard_tokens,
                         args.bpe_sample_mb)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.time()
    try:
        prepare(args)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted: no partial file is left; rerun the same command to finish", file=sys.stderr)
        sys.exit(130)
    print(f"done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    main()

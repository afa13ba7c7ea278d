"""Turns text into token shards for train.py: flat uint16/uint32 arrays on disk, read back with np.memmap.

Usage (a comment says what a command needs beyond a CPU):
    python prepare.py                                   # the built-in corpus -> data/pydoc (sentencepiece 2k)
    python prepare.py --input fineweb/sample-10BT --out data/fineweb --workers 16                 # your data
    python prepare.py --input books.txt notes.jsonl --out data/mine \\
        --tokenizer tiktoken:cl100k_base.tiktoken --overwrite    # your data; replaces data/mine if prepared
    python prepare.py --input corpus/ --out data/bytes --tokenizer bytes --val-fraction 0.01      # your data

Inputs are files or folders (searched recursively, in sorted order):
    .txt      one document per file
    .jsonl    one document per line, the string field --text-field (default "text")
    .parquet  the column --text-field (FineWeb's shards; needs `pip install pyarrow`)
    .arrow    a HF `datasets` folder written by save_to_disk (needs `pip install pyarrow`)
Other files in a folder (dataset_info.json, state.json, README.md, ...) are skipped.

--tokenizer is "sentencepiece" (train a new BPE model of --vocab-size on the inputs, saved in --out), or any
spec tokenizer.load_tokenizer accepts: "bytes", "<path>.model", "tiktoken:<path>".

Output folder: meta.json (tokenizer spec, vocab size, dtype, the shard list of each split; a tokenizer trained
here is named relative to the folder, so the folder can move) and shards
train_00000.bin, ..., val_00000.bin. Documents are joined with <eos> after each. The split is by pieces of
documents of at most PIECE_CHARS characters: an evenly spread --val-fraction of them goes to validation.
"""

import argparse
import json
import multiprocessing
import os
from pathlib import Path

import numpy as np

from cli import (
    ArgumentParser,
    Progress,
    UserError,
    fraction,
    no_half_made_output,
    positive_int,
    run_main,
    write_atomically,
)
from tokenizer import load_tokenizer, train_sentencepiece

FORMAT = "nirvana-tokens-v1"
PIECE_CHARS = 16384  # documents are cut (at line ends) into pieces of at most this many characters
TEXT_SUFFIXES = (".txt", ".jsonl", ".parquet", ".arrow")
BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "pydoc")
BUILTIN_VOCAB_SIZE = 2048
BUILTIN_VAL_FRACTION = 0.1  # the built-in corpus's validation share (harness_tasks.py reads the same pieces)


# ----------------------------------------------------------------------------- reading documents


def builtin_documents():
    """The built-in corpus: the Python Language Reference (~465 kB of English prose and grammar) that
    ships inside CPython itself as pydoc_data.topics, so every machine with Python has it, offline."""
    from pydoc_data.topics import topics

    return [topics[name] for name in sorted(topics)]


def find_text_files(paths):
    files = []
    for path in paths:
        if not os.path.exists(path):
            raise UserError(f"input path '{path}' does not exist (give text files or folders of them)")
        if os.path.isdir(path):
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files += [os.path.join(root, n) for n in sorted(names) if n.endswith(TEXT_SUFFIXES)]
        elif path.endswith(TEXT_SUFFIXES):
            files.append(path)
        else:
            raise UserError(f"input file '{path}' is not one of {', '.join(TEXT_SUFFIXES)}")
    if not files:
        raise UserError(f"no {', '.join(TEXT_SUFFIXES)} files found under {', '.join(paths)}")
    return files


def import_pyarrow(path):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise UserError(f"reading '{path}' needs pyarrow: `pip install pyarrow`") from e
    return pyarrow


def check_column(names, field, path):
    if field not in names:
        raise UserError(f"'{path}' has no column '{field}' (columns: {names}); pass --text-field")


def read_documents(path, text_field):
    """Yields the documents (strings) of one input file; an unreadable file is a UserError naming it."""
    try:
        yield from _read_documents(path, text_field)
    except UnicodeDecodeError as error:
        raise UserError(f"{path} is not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:  # pyarrow's ArrowInvalid (a corrupt .parquet/.arrow) is a ValueError
        raise UserError(f"cannot read {path}: {error}") from error
    except ValueError as error:
        if isinstance(error, UserError):
            raise
        raise UserError(f"cannot read {path}: {str(error).splitlines()[0][:160]}") from error


def _read_documents(path, text_field):
    if path.endswith(".txt"):
        with open(path, encoding="utf-8", errors="replace") as f:
            yield f.read()
    elif path.endswith(".jsonl"):
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    text = json.loads(line)[text_field]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    text = e
                if not isinstance(text, str):
                    raise UserError(
                        f"{path}:{line_number}: not a JSON object with a string field '{text_field}'"
                    )
                yield text
    elif path.endswith(".parquet"):
        pyarrow = import_pyarrow(path)
        parquet = pyarrow.parquet.ParquetFile(path)
        check_column(parquet.schema_arrow.names, text_field, path)
        for batch in parquet.iter_batches(batch_size=1024, columns=[text_field]):
            yield from batch.column(0).to_pylist()
    else:  # .arrow: HF datasets' save_to_disk writes the IPC stream format; plain IPC files also work
        pyarrow = import_pyarrow(path)
        with pyarrow.memory_map(path) as source:
            try:
                table = pyarrow.ipc.open_stream(source).read_all()
            except pyarrow.ArrowInvalid:
                table = pyarrow.ipc.open_file(source).read_all()
        check_column(table.schema.names, text_field, path)
        yield from table.column(text_field).to_pylist()


def iter_documents(files, text_field="text", progress=None):
    """The non-empty documents of the files, in order; progress (a cli.Progress) counts the files read."""
    for path in files:
        for text in read_documents(path, text_field):
            if text:
                yield text
        if progress:
            progress.update()


def split_into_pieces(document):
    """Cuts one document at line ends into pieces of at most PIECE_CHARS characters (a longer line is
    cut inside), so that long documents spread over both splits and over encoding workers."""
    pieces, current = [], ""
    for line in document.splitlines(keepends=True):
        for start in range(0, len(line), PIECE_CHARS):
            part = line[start : start + PIECE_CHARS]
            if current and len(current) + len(part) > PIECE_CHARS:
                pieces.append(current)
                current = ""
            current += part
    if current:
        pieces.append(current)
    return pieces


# ----------------------------------------------------------------------------- encoding and writing


def choose_tokenizer(spec, files, out_dir, vocab_size, text_field="text"):
    """Returns the tokenizer: a new sentencepiece model trained on the input files (None: the built-in
    corpus), or a loaded spec."""
    if spec != "sentencepiece":
        return load_tokenizer(spec)
    if files is None:
        documents = iter(builtin_documents())
    else:
        documents = iter_documents(files, text_field, Progress("reading text for the tokenizer", len(files)))
    return load_tokenizer(train_sentencepiece(documents, os.path.join(out_dir, "tokenizer"), vocab_size))


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


_worker_tokenizer = None


def _init_worker(spec):
    global _worker_tokenizer
    _worker_tokenizer = load_tokenizer(spec)


def _encode_piece(piece_and_end):
    piece, ends_document = piece_and_end
    ids = _worker_tokenizer.encode(piece) + ([_worker_tokenizer.eos_id] if ends_document else [])
    return np.asarray(ids, dtype=np.int64)


def iter_pieces(documents):
    for document in documents:
        pieces = split_into_pieces(document)
        for i, piece in enumerate(pieces):
            yield piece, i == len(pieces) - 1


class ShardWriter:
    """Appends token ids to <split>_00000.bin, <split>_00001.bin, ... of at most shard_tokens each."""

    def __init__(self, out_dir, split, dtype, shard_tokens):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.buffer, self.buffered, self.shards = [], 0, []

    def add(self, ids):
        self.buffer.append(ids.astype(self.dtype))
        self.buffered += len(ids)
        while self.buffered >= self.shard_tokens:
            self.flush(self.shard_tokens)

    def flush(self, count):
        tokens = np.concatenate(self.buffer)
        name = f"{self.split}_{len(self.shards):05d}.bin"
        write_atomically(os.path.join(self.out_dir, name), tokens[:count].tofile)
        self.shards.append({"file": name, "tokens": int(count)})
        self.buffer, self.buffered = [tokens[count:]], len(tokens) - count

    def close(self):
        if self.buffered:
            self.flush(self.buffered)
        return self.shards


def is_validation_piece(index, val_fraction):
    """Spreads val_fraction of the pieces evenly: piece i goes to validation when floor((i+1) f) > floor(i f)."""
    return int((index + 1) * val_fraction) > int(index * val_fraction)


def prepare(
    paths,
    out_dir,
    tokenizer="sentencepiece",
    vocab_size=32000,
    val_fraction=0.005,
    text_field="text",
    shard_tokens=100_000_000,
    workers=1,
    overwrite=False,
):
    """Tokenises the documents under paths (None: the built-in corpus) into out_dir; returns the meta dict.
    A folder already prepared is replaced only with overwrite; a failed run removes what it wrote."""
    if not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be in (0, 1), got {val_fraction}")
    files = None if paths is None else find_text_files(paths)  # bad paths fail before any work
    if os.path.isfile(os.path.join(out_dir, "meta.json")):
        if not overwrite:
            raise UserError(
                f"{out_dir} already holds a prepared corpus (meta.json); pass --overwrite to "
                f"replace it, or choose another --out"
            )
        remove_prepared(out_dir)
    with no_half_made_output(out_dir):
        meta = write_shards(
            paths, files, out_dir, tokenizer, vocab_size, val_fraction, text_field, shard_tokens, workers
        )
    return meta


def counted(items, progress):
    for item in items:
        yield item
        progress.update()


def remove_prepared(out_dir):
    """Deletes what prepare() wrote into out_dir (meta.json first, so the folder never looks complete)."""
    meta = load_meta(out_dir)
    os.remove(os.path.join(out_dir, "meta.json"))
    names = [shard["file"] for split in ("train", "val") for shard in meta[split]]
    names += ["tokenizer.model", "tokenizer.vocab"]
    for name in names:
        if os.path.isfile(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))


def write_shards(
    paths, files, out_dir, tokenizer, vocab_size, val_fraction, text_field, shard_tokens, workers
):
    os.makedirs(out_dir, exist_ok=True)
    tok = choose_tokenizer(tokenizer, files, out_dir, vocab_size, text_field)
    dtype = token_dtype(tok.vocab_size)
    writers = {split: ShardWriter(out_dir, split, dtype, shard_tokens) for split in ("train", "val")}
    if files is None:
        documents = builtin_documents()
        documents = counted(documents, Progress("encoding documents", len(documents)))
    else:
        documents = iter_documents(files, text_field, Progress("encoding files", len(files)))
    pieces = iter_pieces(documents)
    _init_worker(tok.spec)
    # spawned, not forked: a fork of a process whose torch threads hold a lock can hang in the child
    spawn = multiprocessing.get_context("spawn")
    pool = spawn.Pool(workers, _init_worker, (tok.spec,)) if workers > 1 else None
    encoded = pool.imap(_encode_piece, pieces, chunksize=16) if pool else map(_encode_piece, pieces)
    total, index = 0, -1
    try:
        for index, ids in enumerate(encoded):
            if len(ids) and ids.max() >= tok.vocab_size:
                raise ValueError(
                    f"tokenizer {tok.spec} produced id {ids.max()} >= its vocab_size {tok.vocab_size}"
                )
            writers["val" if is_validation_piece(index, val_fraction) else "train"].add(ids)
            total += len(ids)
            if index % 10000 == 9999:
                print(f"  {index + 1} pieces, {total / 1e6:.1f}M tokens", flush=True)
    finally:
        if pool:
            pool.terminate()
    shards = {split: writer.close() for split, writer in writers.items()}
    if not shards["train"]:
        raise UserError(f"empty corpus: no text in {paths if paths else 'the built-in corpus'}")
    if not shards["val"]:
        raise UserError(
            f"corpus too small for a validation split ({index + 1} pieces of <= {PIECE_CHARS} "
            f"characters at val_fraction {val_fraction}): add text or raise --val-fraction"
        )
    meta = {
        "format": FORMAT,
        "tokenizer": portable_spec(tok.spec, out_dir),
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "dtype": np.dtype(dtype).name,
        "train": shards["train"],
        "val": shards["val"],
        "sources": paths or ["builtin:pydoc_data.topics"],
        "val_fraction": val_fraction,
    }
    write_atomically(
        os.path.join(out_dir, "meta.json"), lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=1))
    )
    return meta


def portable_spec(spec, out_dir):
    """A tokenizer trained into out_dir is stored relative to it, so the folder can move between machines."""
    if spec.endswith(".model") and os.path.dirname(os.path.abspath(spec)) == os.path.abspath(out_dir):
        return os.path.basename(spec)
    return spec


def tokenizer_spec(meta, data_dir):
    """The spec load_tokenizer takes for the tokenizer of a prepared folder."""
    spec = meta["tokenizer"]
    if spec is not None and spec.endswith(".model") and not os.path.isabs(spec) and os.sep not in spec:
        return os.path.join(data_dir, spec)
    return spec


def prepare_builtin(out_dir=BUILTIN_DIR):
    """The default data of `python train.py`: the built-in corpus with a 2k sentencepiece vocabulary."""
    return prepare(None, out_dir, "sentencepiece", BUILTIN_VOCAB_SIZE, val_fraction=BUILTIN_VAL_FRACTION)


# ----------------------------------------------------------------------------- reading shards back


def load_meta(data_dir):
    """The meta.json of a folder written by prepare.py; anything else is a UserError saying how to make it."""
    make = f"`python prepare.py --input <text files or folders> --out {data_dir}`"
    if os.path.isfile(data_dir):
        folder = os.path.splitext(data_dir)[0] + "_tokens"
        raise UserError(
            f"{data_dir} is a file; a folder written by prepare.py (meta.json and token shards) is "
            f"needed: `python prepare.py --input {data_dir} --out {folder}`, then use {folder}"
        )
    if not os.path.isdir(data_dir):
        raise UserError(f"data folder {data_dir} does not exist; make it with {make}")
    path = os.path.join(data_dir, "meta.json")
    if not os.path.isfile(path):
        raise UserError(
            f"{data_dir} has no meta.json: not a folder written by prepare.py (make one with {make})"
        )
    try:
        with open(path) as f:
            meta = json.load(f)
    except (ValueError, UnicodeDecodeError) as error:
        raise UserError(f"{path} is not valid JSON ({error}); prepare the folder again") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise UserError(f"{path} is not in the {FORMAT} format of prepare.py; prepare the folder again")
    return meta


class TokenShards:
    """One split of a prepared folder as a single endless token stream (it wraps around at the end)."""

    def __init__(self, data_dir, split):
        meta = load_meta(data_dir)
        self.vocab_size, self.tokenizer = meta["vocab_size"], tokenizer_spec(meta, data_dir)
        self.shards = []
        for shard in meta[split]:
            path = os.path.join(data_dir, shard["file"])
            if not os.path.isfile(path):
                raise UserError(f"shard {path} listed in meta.json is missing; prepare the folder again")
            tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
            if len(tokens) != shard["tokens"]:
                raise UserError(
                    f"shard {path} holds {len(tokens)} tokens, meta.json says {shard['tokens']}; "
                    f"prepare the folder again"
                )
            self.shards.append(tokens)
        self.starts = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_tokens = int(self.starts[-1])
        if self.num_tokens == 0:
            raise UserError(f"the {split} split of '{data_dir}' is empty")

    def read(self, position, count):
        """count tokens starting at stream position (any int >= 0), as an int64 array."""
        out = np.empty(count, dtype=np.int64)
        filled = 0
        while filled < count:
            offset = (position + filled) % self.num_tokens
            shard = int(np.searchsorted(self.starts, offset, side="right")) - 1
            local = offset - self.starts[shard]
            take = min(count - filled, len(self.shards[shard]) - local)
            out[filled : filled + take] = self.shards[shard][local : local + take]
            filled += take
        return out


# ----------------------------------------------------------------------------- command line


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", help="text files or folders (default: the built-in corpus)")
    parser.add_argument("--out", default=None, help=f"output folder (default with no --input: {BUILTIN_DIR})")
    parser.add_argument("--overwrite", action="store_true", help="replace a corpus already prepared in --out")
    parser.add_argument(
        "--tokenizer",
        default="sentencepiece",
        help='"sentencepiece" (train one), "bytes", "<path>.model" or "tiktoken:<path>"',
    )
    parser.add_argument(
        "--vocab-size",
        type=positive_int,
        default=None,
        help=f"sentencepiece vocabulary (default 32000, the paper's; {BUILTIN_VOCAB_SIZE} built-in)",
    )
    parser.add_argument("--val-fraction", type=fraction, default=None, help="default 0.005 (0.1 built-in)")
    parser.add_argument("--text-field", default="text", help="field of .jsonl/.parquet/.arrow records")
    parser.add_argument(
        "--shard-tokens", type=positive_int, default=100_000_000, help="tokens per shard file"
    )
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count(), help="encoding processes")
    args = parser.parse_args(argv)
    if args.input is None:
        args.out = args.out or BUILTIN_DIR
        args.vocab_size, args.val_fraction = (
            args.vocab_size or BUILTIN_VOCAB_SIZE,
            args.val_fraction or BUILTIN_VAL_FRACTION,
        )
    else:
        if args.out is None:
            parser.error("--out is required with --input")
        args.vocab_size, args.val_fraction = args.vocab_size or 32000, args.val_fraction or 0.005
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.tokenizer != "sentencepiece":
        load_tokenizer(args.tokenizer)  # a bad spec fails here, before any work
    out = args.out
    meta = prepare(
        args.input,
        out,
        args.tokenizer,
        args.vocab_size,
        args.val_fraction,
        args.text_field,
        args.shard_tokens,
        args.workers,
        args.overwrite,
    )
    counts = {split: sum(s["tokens"] for s in meta[split]) for split in ("train", "val")}
    print(
        f"wrote {out}: tokenizer {tokenizer_spec(meta, out)} (vocab {meta['vocab_size']}), "
        f"{counts['train']:,} train and {counts['val']:,} val tokens as {meta['dtype']}; "
        f"train on it with `python train.py --data {out}`"
    )
    return meta


if __name__ == "__main__":
    run_main(main)

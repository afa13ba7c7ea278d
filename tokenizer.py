"""Tokenizers for Nirvana: one small interface over three kinds, chosen by a spec string.

    from tokenizer import load_tokenizer, train_sentencepiece
    tok = load_tokenizer("bytes")                      # built-in byte-level, vocab 257, always available
    tok = load_tokenizer("data/tok32k.model")          # a sentencepiece model file on disk
    tok = load_tokenizer("tiktoken:cl100k_base.tiktoken")  # a tiktoken ranks file on disk, no network
    ids = tok.encode("hello"); text = tok.decode(ids); tok.vocab_size; tok.eos_id
    tok.spec   # the string a checkpoint stores under "tokenizer" so the same tokenizer can be reloaded

    path = train_sentencepiece(["corpus.txt"], "data/tok", vocab_size=32000)   # -> "data/tok.model"

The paper uses a LLaMA-2-sized 32k sentencepiece vocabulary; train_sentencepiece makes one the same way
(BPE, byte fallback so no text is ever unknown, no normalisation so decode(encode(text)) == text; the one
exception is U+2581 '▁', sentencepiece's own mark for a space, which decodes as a space).
"""

import base64
import itertools
import os
import time

try:  # in a model folder saved for transformers, cli.py sits beside this file
    from .cli import UserError
except ImportError:  # in the repository
    from cli import UserError

BYTES_SPEC = "bytes"
TIKTOKEN_PREFIX = "tiktoken:"
SENTENCEPIECE_MAX_LINE_CHARS = 4000  # sentencepiece skips "sentences" longer than 4192 bytes by default


def checked_ids(ids, vocab_size, name):
    """ids as ints, or a clear error naming the first one outside [0, vocab_size)."""
    ids = [int(i) for i in ids]
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"token id {bad[0]} is outside the {name} vocabulary [0, {vocab_size})")
    return ids


class ByteTokenizer:
    """ids 0..255 are the UTF-8 bytes, 256 is <eos>."""

    vocab_size = 257
    eos_id = 256
    spec = BYTES_SPEC

    def encode(self, text):
        return list(text.encode("utf-8"))

    def decode(self, ids):
        ids = checked_ids(ids, self.vocab_size, "byte tokenizer")
        return bytes(i for i in ids if i != self.eos_id).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    def __init__(self, path):
        import sentencepiece as spm

        self.spec = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=path)
        except (RuntimeError, OSError) as error:
            raise UserError(
                f"{path} is not a sentencepiece model file ({str(error).strip()[:100]})"
            ) from error
        self.vocab_size = self.sp.get_piece_size()
        if self.sp.eos_id() < 0:
            raise UserError(f"sentencepiece model {path} has no <eos> piece; train it with eos_id >= 0")
        self.eos_id = self.sp.eos_id()

    def encode(self, text):
        return self.sp.encode(text)

    def decode(self, ids):
        ids = checked_ids(ids, self.vocab_size, "sentencepiece")
        return self.sp.decode(ids)


class TiktokenTokenizer:
    """A tiktoken BPE read from a local ranks file ("<base64 token> <rank>" per line)."""

    def __init__(self, spec, path):
        import tiktoken

        self.spec = spec
        ranks = read_tiktoken_ranks(path)
        name = os.path.basename(path).split(".")[0]
        pat_str, special_tokens = tiktoken_pattern_and_specials(name, ranks)
        self.enc = tiktoken.Encoding(
            name=name, pat_str=pat_str, mergeable_ranks=ranks, special_tokens=special_tokens
        )
        self.eos_id = special_tokens["<|endoftext|>"]
        self.vocab_size = self.enc.max_token_value + 1

    def encode(self, text):
        return self.enc.encode_ordinary(text)

    def decode(self, ids):
        ids = checked_ids(ids, self.vocab_size, "tiktoken")
        return self.enc.decode(ids)


def read_tiktoken_ranks(path):
    ranks = {}
    with open(path, "rb") as f:
        for line_number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise UserError(f"{path}:{line_number} is not a tiktoken ranks line '<base64> <rank>'") from e
    if not ranks:
        raise UserError(f"tiktoken ranks file {path} is empty")
    return ranks


def tiktoken_pattern_and_specials(name, ranks):
    """Pre-tokenisation regex and special tokens: those of the OpenAI encoding of this name when known
    (gpt2, r50k_base, p50k_base, cl100k_base, o200k_base), else cl100k's regex with <|endoftext|> appended.
    tiktoken's constructors fetch ranks from the network, so we hand them the ranks already read."""
    from tiktoken_ext import openai_public

    known = {"gpt2", "r50k_base", "p50k_base", "cl100k_base", "o200k_base"}
    constructor = getattr(openai_public, name if name in known else "cl100k_base")
    fetch = openai_public.load_tiktoken_bpe
    openai_public.load_tiktoken_bpe = lambda *args, **kwargs: ranks
    try:
        params = constructor()
    finally:
        openai_public.load_tiktoken_bpe = fetch
    if name in known:
        return params["pat_str"], params["special_tokens"]
    return params["pat_str"], {"<|endoftext|>": max(ranks.values()) + 1}


def load_tokenizer(spec):
    """spec: "bytes" | "<path>.model" (sentencepiece) | "tiktoken:<path>" (tiktoken ranks file)."""
    if not isinstance(spec, str):
        raise UserError(f"tokenizer spec must be a string such as 'bytes', got {spec!r}")
    if spec == BYTES_SPEC:
        return ByteTokenizer()
    if spec.startswith(TIKTOKEN_PREFIX):
        path = spec[len(TIKTOKEN_PREFIX) :]
        if not os.path.isfile(path):
            raise UserError(
                f"tiktoken ranks file '{path}' not found; copy e.g. cl100k_base.tiktoken onto this machine "
                f"(nothing is downloaded at run time), or use a sentencepiece model or 'bytes'"
            )
        return TiktokenTokenizer(spec, path)
    if spec.endswith(".model"):
        if not os.path.isfile(spec):
            raise UserError(
                f"sentencepiece model '{spec}' not found (moved or deleted?); pass the right one, e.g. --tokenizer "
                f"<data folder>/tokenizer.model, or make one with `python prepare.py --input <text> --out <folder>`"
            )
        return SentencePieceTokenizer(spec)
    raise UserError(
        f"unknown tokenizer spec '{spec}': use 'bytes', a sentencepiece '<path>.model' or 'tiktoken:<path>'"
    )


def sentencepiece_lines(texts):
    """Yields lines short enough for sentencepiece from an iterator of documents."""
    for text in texts:
        for line in text.splitlines():
            line = line.strip()
            for start in range(0, len(line), SENTENCEPIECE_MAX_LINE_CHARS):
                yield line[start : start + SENTENCEPIECE_MAX_LINE_CHARS]


def read_text_files(paths):
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            yield from f


def train_sentencepiece(text_files_or_iterator, out_prefix, vocab_size=32000, max_lines=2_000_000):
    """Trains a BPE sentencepiece model with byte fallback (LLaMA-style) on text files (a path or a list
    of paths) or an iterator of strings (e.g. iter(list_of_texts)); writes <out_prefix>.model (and .vocab)
    and returns its path.
    vocab_size is an upper bound: a small corpus gets the largest vocabulary it supports."""
    import sentencepiece as spm

    source = text_files_or_iterator
    if isinstance(source, (str, os.PathLike)):
        source = [source]
    if isinstance(source, (list, tuple)) and all(isinstance(p, (str, os.PathLike)) for p in source):
        missing = [repr(str(p)[:100]) for p in source if not os.path.isfile(p)]
        if missing:
            raise UserError(
                f"{len(missing)} text file(s) for the tokenizer not found: "
                f"{', '.join(missing[:3])} (to train on strings pass an iterator: iter(texts))"
            )
        source = read_text_files(source)
    lines = list(itertools.islice((line for line in sentencepiece_lines(source) if line), max_lines))
    if not lines:
        raise UserError("cannot train a sentencepiece model on an empty corpus (no non-blank text)")
    os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
    print(
        f"training a sentencepiece BPE tokenizer (vocab <= {vocab_size}) on {len(lines):,} lines; "
        f"sentencepiece reports no progress of its own (minutes for a large corpus) ...",
        flush=True,
    )
    start = time.perf_counter()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(out_prefix),
            vocab_size=vocab_size,
            hard_vocab_limit=False,
            model_type="bpe",
            byte_fallback=True,
            character_coverage=0.99995,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            add_dummy_prefix=False,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            num_threads=os.cpu_count() or 1,
            minloglevel=2,
        )
    except RuntimeError as error:
        # e.g. a vocabulary smaller than the 256 byte pieces and the characters seen
        reason = str(error).strip().splitlines()[-1]
        if "Vocabulary size is smaller than required_chars" in reason:
            reason = "it must hold the 256 byte pieces, 3 special pieces and every character of the corpus"
        raise UserError(
            f"sentencepiece cannot train a vocabulary of {vocab_size} ({reason[-160:]}): "
            f"use a larger vocabulary size"
        ) from error
    print(f"trained {out_prefix}.model in {time.perf_counter() - start:.0f} s", flush=True)
    return f"{out_prefix}.model"

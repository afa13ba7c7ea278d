"""The real-text, multi-domain corpus of the small-scale experiment, built offline from installed packages.

Set-up, once per machine (nothing is downloaded when this script runs):
    apt-get install python3.11-doc perl-doc linux-doc-6.1 debian-handbook bible-kjv fortunes
    pip download gensim --no-deps --dest data/wheels          # only its wheel file: 107 Wikipedia articles

Build (reads the packages, splits every domain into train and validation documents, trains a sentencepiece
tokenizer on the training documents, tokenises everything with prepare.py):
    python experiments/real_text.py --out data/real_text
On a machine without the packages (e.g. the GPU machine): pack the text where they are installed, unpack and
tokenise it there:
    python experiments/real_text.py --out data/real_text --pack data/real_text.tar.xz --no-tokenize
    python experiments/real_text.py --out data/real_text --from-archive data/real_text.tar.xz
Any folder of <domain>/*.txt files (one document per file) works as well; a domain "wikipedia" is held out:
    python experiments/real_text.py --out data/mine --from-folders my_domains/

Domains (documents): python = the Python 3.11 documentation sources (.rst.txt, one page each); perl = the perl
manual pages (.pod); kernel = the Linux 6.1 documentation (.rst, translations left out); debian = The Debian
Administrator's Handbook (HTML, one page each); bible = the King James Bible (one chapter each); fortunes =
the fortune quotations (runs of quotations of one file, up to DOC_CHARS characters each); wikipedia = the
shortened English Wikipedia articles in gensim's test data, held out of training (its own perplexity set).

Output folder:
    text/train/<rank>-<domain>-<name>.txt     training documents of all domains, shuffled together, so that
                                              prepare.py (which reads files in sorted order) sees them mixed
    text/val/<domain>/<name>.txt              held-out documents of each domain, and all of wikipedia
    tokens/                                   prepare.py folder: tokenizer.model, train_*.bin, val_*.bin
                                              (its val split: 0.5% of the training pieces, for train.py's
                                              in-run validation loss)
    tokens/eval/<domain>.npz                  the held-out documents tokenised: "tokens" (each document
                                              followed by <eos>) and "doc_starts"
    corpus.json                               documents, words and tokens of each domain and split
"""

import argparse
import bz2
import glob
import gzip
import html
import html.parser
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root: prepare.py, cli.py

import prepare
from cli import (
    Progress,
    UserError,
    positive_float,
    positive_int,
    run_main,
    write_atomically,
    write_json_atomically,
)
from tokenizer import load_tokenizer

HELD_OUT = "wikipedia"  # a domain never trained on: its documents all go to validation
DOC_CHARS = 4000  # fortunes are grouped into documents of at most this many characters
DEFAULT_VOCAB_SIZE = 16384  # see README: 32k would put over a third of a 45M model into its embeddings
SEED = 1234


# ----------------------------------------------------------------------------- reading the packages


def need(pattern, install):
    """The files matching a glob pattern, or a one-line error naming the set-up command that provides them."""
    files = sorted(glob.glob(pattern, recursive=True))
    if not files:
        raise UserError(
            f"no files match {pattern}: install them with `{install}` (see experiments/real_text.py)"
        )
    return files


def read_python_docs():
    files = need("/usr/share/doc/python3.11/html/_sources/**/*.rst.txt", "apt-get install python3.11-doc")
    root = "/usr/share/doc/python3.11/html/_sources/"
    return [
        (f[len(root) : -len(".rst.txt")], Path(f).read_text(encoding="utf-8", errors="replace"))
        for f in files
    ]


def clean_pod(text):
    """Perl's POD markup to plain text: directives lose their '=', formatting codes keep their text."""
    lines = []
    for line in text.splitlines():
        if line.startswith(("=pod", "=cut", "=begin", "=end", "=for", "=encoding", "=over", "=back")):
            continue
        lines.append(re.sub(r"^=(head\d|item)\s*", "", line))
    text = "\n".join(lines)
    text = re.sub(r"[A-Z]<<+\s+(.*?)\s+>>+", r"\1", text, flags=re.DOTALL)  # C<< $x->y >>
    for _ in range(4):  # nested codes, innermost first
        text = re.sub(r"X<[^<>]*>", "", text)
        text = re.sub(r"E<lt>", "<", re.sub(r"E<gt>", ">", text))
        text = re.sub(r"L<([^<>|]*)\|[^<>]*>", r"\1", text)
        text = re.sub(r"[A-Z]<([^<>]*)>", r"\1", text)
    return text


def read_perl_docs():
    files = sorted(
        {os.path.realpath(f) for f in need("/usr/share/perl/*/pod/*.pod", "apt-get install perl-doc")}
    )
    return [(Path(f).stem, clean_pod(Path(f).read_text(encoding="utf-8", errors="replace"))) for f in files]


def read_kernel_docs():
    root = "/usr/share/doc/linux-doc-6.1/Documentation/"
    # English only
    files = [
        f for f in need(root + "**/*.rst.gz", "apt-get install linux-doc-6.1") if "/translations/" not in f
    ]
    progress = Progress("reading the kernel documentation", total=len(files))
    documents = []
    for f in files:
        with gzip.open(f, "rt", encoding="utf-8", errors="replace") as handle:
            documents.append((f[len(root) : -len(".rst.gz")], handle.read()))
        progress.update()
    return documents


class HandbookText(html.parser.HTMLParser):
    """The text of one page of the Debian handbook's HTML: blocks become lines, navigation is left out."""

    SKIP_IDS, SKIP_CLASSES = frozenset({"banner", "title"}), frozenset({"docnav", "breadcrumbs"})
    VOID = frozenset({"br", "img", "meta", "link", "hr", "input", "col", "area", "base", "wbr"})
    BLOCKS = frozenset(
        {"p", "div", "li", "pre", "tr", "h1", "h2", "h3", "h4", "h5", "dt", "dd", "table", "br"}
    )

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts, self.skip_depth, self.depth, self.pre = [], None, 0, 0

    def handle_starttag(self, tag, attrs):
        if tag in self.BLOCKS:
            self.parts.append("\n")
        if tag in self.VOID:
            return
        self.depth += 1
        attrs = dict(attrs)
        classes = set((attrs.get("class") or "").split())
        if self.skip_depth is None and (
            tag in ("head", "script", "style")
            or attrs.get("id") in self.SKIP_IDS
            or classes & self.SKIP_CLASSES
        ):
            self.skip_depth = self.depth
        self.pre += tag == "pre"

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if self.skip_depth == self.depth:
            self.skip_depth = None
        self.depth -= 1
        self.pre -= tag == "pre"
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self.skip_depth is None:
            self.parts.append(data if self.pre else re.sub(r"\s+", " ", data))

    def text(self):
        lines = (line.strip() for line in "".join(self.parts).splitlines())
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_debian_handbook():
    files = need("/usr/share/doc/debian-handbook/html/en-US/*.html", "apt-get install debian-handbook")
    documents = []
    for f in files:
        parser = HandbookText()
        parser.feed(Path(f).read_text(encoding="utf-8", errors="replace"))
        documents.append((Path(f).stem, parser.text()))
    return documents


def read_bible():
    """The King James Bible as the `bible` program prints it, one chapter each ("Genesis 1", "  1 In ...")."""
    if shutil.which("bible") is None:
        raise UserError("the `bible` program is missing: install it with `apt-get install bible-kjv`")
    dump = subprocess.run(
        ["bible", "Gen1:1-Rev22:21"],
        capture_output=True,
        text=True,
        check=False,
        env={"COLUMNS": "100000", "PATH": os.environ.get("PATH", os.defpath)},
    )
    if dump.returncode or not dump.stdout.strip():
        raise UserError(
            f"`bible Gen1:1-Rev22:21` failed ({dump.stderr.strip()[:200]}): "
            "reinstall with `apt-get install --reinstall bible-kjv bible-kjv-text`"
        )
    chapters = []
    for line in dump.stdout.splitlines():
        if re.fullmatch(r"\S.* \d+", line):  # a chapter heading
            chapters.append([line, ""])
        elif line.strip() and chapters:
            chapters[-1].append(line.strip())
    return [(f"{index:04d}-{lines[0]}", "\n".join(lines)) for index, lines in enumerate(chapters)]


def read_fortunes():
    root = "/usr/share/games/fortunes/"
    files = [
        f
        for f in need(root + "*", "apt-get install fortunes")
        if os.path.isfile(f)
        and not os.path.islink(f)
        and "." not in os.path.basename(f)
        and os.path.basename(f) != "ascii-art"
    ]
    documents = []
    for f in files:
        quotes = [q.strip() for q in Path(f).read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        group, size = [], 0
        for quote in (q for q in quotes if q and q != "%"):
            if group and size + len(quote) > DOC_CHARS:
                documents.append((f"{Path(f).name}-{len(documents):04d}", "\n\n".join(group)))
                group, size = [], 0
            group.append(quote)
            size += len(quote) + 2
        if group:
            documents.append((f"{Path(f).name}-{len(documents):04d}", "\n\n".join(group)))
    return documents


def find_gensim_wheel():
    wheels = sorted(
        glob.glob("data/wheels/gensim-*.whl") + glob.glob(os.path.expanduser("~/.cache/wheels/gensim-*.whl"))
    )
    if not wheels:
        raise UserError(
            "no gensim wheel in data/wheels/: fetch it once with "
            "`pip download gensim --no-deps --dest data/wheels` (or pass --gensim-wheel FILE)"
        )
    return wheels[-1]


WIKI_END_SECTIONS = ("See also", "References", "Notes", "External links", "Further reading", "Bibliography")


def clean_wikitext(text):
    """Wikipedia markup to plain text: templates, references, tables, files and categories go; links keep
    their shown text; headings become lines; the reference sections at the end are cut."""
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    previous = None
    while previous != text:  # nested, innermost first
        previous = text
        text = re.sub(r"\{\{[^{}]*\}\}", "", text)
        text = re.sub(r"\{\|[^{}]*?\|\}", "", text, flags=re.DOTALL)
        text = re.sub(r"\[\[(?:File|Image|Category|[a-z\-]{2,12}):[^\[\]]*\]\]", "", text)
        text = re.sub(r"\[\[(?:[^\[\]|]*\|)?([^\[\]|]*)\]\]", r"\1", text)
    text = re.sub(r"\[https?://\S+ ([^\]]*)\]", r"\1", text)
    text = re.sub(r"\[https?://[^\]]*\]", "", text)
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"<[^>]+>", "", text)
    lines = []
    for line in text.splitlines():
        heading = re.match(r"^(=+)\s*(.*?)\s*\1\s*$", line)
        if heading and heading.group(2) in WIKI_END_SECTIONS:
            break
        lines.append(heading.group(2) if heading else line.rstrip())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def read_wikipedia(wheel):
    """The articles (namespace 0, not redirects) of gensim's enwiki-*-shortened.bz2 test file."""
    if not os.path.isfile(wheel):
        raise UserError(f"gensim wheel {wheel} not found: `pip download gensim --no-deps --dest data/wheels`")
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if re.search(r"test_data/enwiki-.*-shortened\.bz2$", n)]
            if not names:
                raise UserError(f"{wheel} holds no test_data/enwiki-*-shortened.bz2: not a gensim wheel?")
            dump = bz2.decompress(archive.read(names[0])).decode("utf-8")
    except zipfile.BadZipFile as error:
        raise UserError(f"{wheel} is not a wheel (zip) file: {error}") from None
    documents = []
    for page in re.findall(r"<page>(.*?)</page>", dump, flags=re.DOTALL):
        title = html.unescape(re.search(r"<title>(.*?)</title>", page).group(1))
        body = re.search(r"<text[^>]*>(.*?)</text>", page, flags=re.DOTALL)
        if "<ns>0</ns>" not in page or "<redirect" in page or body is None:
            continue
        text = clean_wikitext(html.unescape(body.group(1)))
        if len(text.split()) >= 50:
            documents.append((re.sub(r"\W+", "_", title), f"{title}\n\n{text}"))
    return documents


def read_folders(root):
    """<root>/<domain>/*.txt: one document per file; every sub-folder is a domain."""
    if not os.path.isdir(root):
        raise UserError(f"--from-folders {root}: no such folder")
    domains = {}
    for domain in sorted(os.listdir(root)):
        if not re.fullmatch(r"[A-Za-z0-9_]+", domain):
            raise UserError(
                f"--from-folders: domain folder name {domain!r} may hold only letters, digits and _"
            )
        files = sorted(glob.glob(os.path.join(root, domain, "*.txt")))
        if files:
            domains[domain] = [
                (Path(f).stem, Path(f).read_text(encoding="utf-8", errors="replace")) for f in files
            ]
    if not domains:
        raise UserError(f"--from-folders {root}: no <domain>/*.txt files in it")
    return domains


PACKAGES = {  # domain: (the Debian package, its reader)
    "python": ("python3.11-doc", read_python_docs),
    "perl": ("perl-doc", read_perl_docs),
    "kernel": ("linux-doc-6.1", read_kernel_docs),
    "debian": ("debian-handbook", read_debian_handbook),
    "bible": ("bible-kjv", read_bible),
    "fortunes": ("fortunes", read_fortunes),
}


def package_versions():
    """{domain: "package version"} as dpkg has them installed ("unknown" where it cannot tell). The same set-up
    command installs whatever versions the mirror holds that day, and other versions make another corpus."""
    versions = {}
    for domain, (package, _) in PACKAGES.items():
        try:
            found = subprocess.run(
                ["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True
            )
            version = found.stdout.strip() if found.returncode == 0 and found.stdout.strip() else "unknown"
        except FileNotFoundError:
            version = "unknown"
        versions[domain] = f"{package} {version}"
    return versions


def read_packages(gensim_wheel):
    domains = {}
    for name, (_, reader) in PACKAGES.items():
        print(f"reading {name} ...", flush=True)
        domains[name] = reader()
    print("reading wikipedia (held out) ...", flush=True)
    wheel = gensim_wheel or find_gensim_wheel()
    domains[HELD_OUT] = read_wikipedia(wheel)
    return domains, {**package_versions(), HELD_OUT: os.path.basename(wheel)}


# ----------------------------------------------------------------------------- splitting and writing the text


def safe_name(name):
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name)[:120]


def split_domain(domain, documents, val_fraction, min_val, rng):
    """-> (train, val) lists of (name, text): a seeded shuffle, the first max(min_val, fraction) held out."""
    documents = [d for d in documents if d[1].strip()]
    order = sorted(documents)
    rng.shuffle(order)
    n_val = min(len(order) - 1, max(min_val, round(val_fraction * len(order))))
    if n_val < 1:
        raise UserError(f"domain {domain!r} has {len(order)} document(s): at least 2 are needed to split it")
    return order[n_val:], order[:n_val]


def write_text(domains, out_dir, val_fraction, min_val):
    """Writes text/train and text/val under out_dir; returns the per-domain document and word counts."""
    text_dir = os.path.join(out_dir, "text")
    if os.path.exists(text_dir):
        shutil.rmtree(text_dir)
    os.makedirs(out_dir, exist_ok=True)
    Path(out_dir, ".gitignore").write_text("# built by experiments/real_text.py: never committed\n*\n")
    rng = random.Random(SEED)
    train_docs, stats = [], {}
    for domain, documents in domains.items():
        if domain == HELD_OUT:
            train, val = [], [d for d in sorted(documents) if d[1].strip()]
        else:
            train, val = split_domain(domain, documents, val_fraction, min_val, rng)
        train_docs += [(domain, name, text) for name, text in train]
        for name, text in val:
            path = os.path.join(text_dir, "val", domain, safe_name(name) + ".txt")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            Path(path).write_text(text, encoding="utf-8")
        stats[domain] = {
            "held_out": domain == HELD_OUT,
            "train_docs": len(train),
            "val_docs": len(val),
            "train_words": sum(len(t.split()) for _, t in train),
            "val_words": sum(len(t.split()) for _, t in val),
        }
    rng.shuffle(train_docs)
    os.makedirs(os.path.join(text_dir, "train"), exist_ok=True)
    width = len(str(len(train_docs)))
    for rank, (domain, name, text) in enumerate(train_docs):
        path = os.path.join(text_dir, "train", f"{rank:0{width}d}-{domain}-{safe_name(name)}.txt")
        Path(path).write_text(text, encoding="utf-8")
    if not train_docs:
        raise UserError("no training documents: every domain is held out")
    return stats


def read_text_layout(out_dir):
    """-> {domain: [(name, text)]} of the held-out documents, and {domain: [paths]} of the training ones."""
    text_dir = os.path.join(out_dir, "text")
    if not os.path.isdir(os.path.join(text_dir, "train")):
        raise UserError(f"{text_dir}/train does not exist: build the text first (without --from-existing)")
    train = {}
    for path in sorted(glob.glob(os.path.join(text_dir, "train", "*.txt"))):
        train.setdefault(os.path.basename(path).split("-")[1], []).append(path)
    val = {
        domain: sorted(glob.glob(os.path.join(text_dir, "val", domain, "*.txt")))
        for domain in sorted(os.listdir(os.path.join(text_dir, "val")))
    }
    return train, val


def pack(out_dir, archive):
    print(f"packing {out_dir}/text into {archive} ...", flush=True)
    write_atomically(archive, lambda tmp: _write_tar(tmp, os.path.join(out_dir, "text")))


def _write_tar(tmp, text_dir):
    with tarfile.open(tmp, "w:xz") as tar:
        tar.add(text_dir, arcname="text")


def unpack(archive, out_dir):
    if not os.path.isfile(archive):
        raise UserError(f"--from-archive {archive}: no such file")
    print(f"unpacking {archive} into {out_dir} ...", flush=True)
    if os.path.exists(os.path.join(out_dir, "text")):
        shutil.rmtree(os.path.join(out_dir, "text"))
    os.makedirs(out_dir, exist_ok=True)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(out_dir, filter="data")
    except tarfile.TarError as error:
        raise UserError(f"{archive} is not a readable tar archive: {error}") from None


# ----------------------------------------------------------------------------- tokenising

_tokenizer = None


def _init_worker(spec):
    global _tokenizer
    _tokenizer = load_tokenizer(spec)


def _count_tokens(path):
    return len(_tokenizer.encode(Path(path).read_text(encoding="utf-8", errors="replace")))


def count_tokens(paths, spec, workers, what):
    """Tokens of each file (without <eos>), with progress lines."""
    progress = Progress(f"counting tokens of {what}", total=len(paths))
    counts = []
    if workers > 1:
        with multiprocessing.Pool(workers, _init_worker, (spec,)) as pool:
            for count in pool.imap(_count_tokens, paths, chunksize=16):
                counts.append(count)
                progress.update()
    else:
        _init_worker(spec)
        for path in paths:
            counts.append(_count_tokens(path))
            progress.update()
    return counts


def write_eval_set(path, paths, tok):
    """The held-out documents of one domain tokenised, each followed by <eos>; doc_starts: their offsets."""
    pieces, starts, offset = [], [], 0
    for file in paths:
        ids = tok.encode(Path(file).read_text(encoding="utf-8", errors="replace")) + [tok.eos_id]
        starts.append(offset)
        pieces.append(np.asarray(ids, dtype=prepare.token_dtype(tok.vocab_size)))
        offset += len(ids)
    tokens = np.concatenate(pieces)
    write_atomically(path, lambda tmp: _save_npz(tmp, tokens=tokens, doc_starts=np.asarray(starts, np.int64)))
    return len(tokens)


def _save_npz(tmp, **arrays):
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)


def load_eval_set(path):
    """-> (tokens int64, [token array of each document, <eos> included])."""
    with np.load(path) as data:
        tokens, starts = data["tokens"].astype(np.int64), data["doc_starts"]
    return tokens, np.split(tokens, starts[1:])


def tokenize(out_dir, vocab_size, workers, stats):
    train, val = read_text_layout(out_dir)
    tokens_dir = os.path.join(out_dir, "tokens")
    if os.path.exists(tokens_dir):
        shutil.rmtree(tokens_dir)
    n_train = sum(len(paths) for paths in train.values())
    in_run_val_fraction = min(0.5, max(0.005, 2 / n_train))  # at least two pieces even for a tiny corpus
    meta = prepare.prepare(
        [os.path.join(out_dir, "text", "train")],
        tokens_dir,
        "sentencepiece",
        vocab_size,
        val_fraction=in_run_val_fraction,
        workers=workers,
    )
    spec = prepare.tokenizer_spec(meta, tokens_dir)
    tok = load_tokenizer(spec)
    for domain, paths in train.items():
        stats.setdefault(domain, {})["train_tokens"] = sum(count_tokens(paths, spec, workers, domain))
    progress = Progress("tokenising the held-out documents", total=len(val))
    for domain, paths in val.items():
        stats.setdefault(domain, {})["val_tokens"] = write_eval_set(
            os.path.join(tokens_dir, "eval", f"{domain}.npz"), paths, tok
        )
        progress.update()
    return meta


def summary_table(stats):
    rows = [
        "| domain | train docs | train words | train tokens | val docs | val words | val tokens |",
        "|---|---|---|---|---|---|---|",
    ]
    total = {}
    for domain, s in stats.items():
        name = domain + (" (held out)" if s.get("held_out") else "")
        keys = ("train_docs", "train_words", "train_tokens", "val_docs", "val_words", "val_tokens")
        rows.append(f"| {name} | " + " | ".join(f"{s.get(k, 0):,}" for k in keys) + " |")
        for k in keys:
            total[k] = total.get(k, 0) + s.get(k, 0)
    rows.append("| all | " + " | ".join(f"{total[k]:,}" for k in total) + " |")
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder, e.g. data/real_text")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--from-folders", metavar="DIR", help="<domain>/*.txt folders instead of the packages"
    )
    source.add_argument("--from-archive", metavar="FILE", help="a text archive written by --pack")
    source.add_argument("--from-existing", action="store_true", help="tokenise the text already under --out")
    parser.add_argument("--gensim-wheel", help="the gensim wheel (default: data/wheels/gensim-*.whl)")
    parser.add_argument(
        "--val-fraction",
        type=positive_float,
        default=0.05,
        help="documents of each domain held out for validation (default 0.05)",
    )
    parser.add_argument("--min-val-docs", type=positive_int, default=8, help="at least this many per domain")
    parser.add_argument("--vocab-size", type=positive_int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--workers", type=positive_int, default=os.cpu_count() or 1)
    parser.add_argument("--pack", metavar="FILE", help="also write the text as a .tar.xz archive")
    parser.add_argument(
        "--no-tokenize", action="store_true", help="stop after writing (and packing) the text"
    )
    args = parser.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        parser.error(f"--val-fraction must be in (0, 1), got {args.val_fraction}")
    stats_path = os.path.join(args.out, "corpus.json")
    sources_path = os.path.join(args.out, "text", "sources.json")
    if args.from_archive or args.from_existing:
        if args.from_archive:
            unpack(args.from_archive, args.out)
        stats = {}
        train, val = read_text_layout(args.out)
        for domain in sorted(set(train) | set(val)):
            stats[domain] = {
                "held_out": domain not in train,
                "train_docs": len(train.get(domain, [])),
                "val_docs": len(val.get(domain, [])),
                "train_words": sum(len(Path(p).read_text().split()) for p in train.get(domain, [])),
                "val_words": sum(len(Path(p).read_text().split()) for p in val.get(domain, [])),
            }
    else:
        if args.from_folders:
            domains, sources = read_folders(args.from_folders), {}
        else:
            domains, sources = read_packages(args.gensim_wheel)
        stats = write_text(domains, args.out, args.val_fraction, args.min_val_docs)
        write_json_atomically(sources_path, sources)  # inside text/: an archive written by --pack carries it
    if args.pack:
        pack(args.out, args.pack)
    sources = json.loads(Path(sources_path).read_text()) if os.path.isfile(sources_path) else {}
    if not args.no_tokenize:
        meta = tokenize(args.out, args.vocab_size, args.workers, stats)
        stats = {"tokenizer": meta["tokenizer"], "vocab_size": meta["vocab_size"], "domains": stats}
    else:
        stats = {"domains": stats}
    stats["sources"] = sources
    for domain, source in sources.items():
        print(f"{domain}: {source}")
    write_json_atomically(stats_path, stats)
    print(summary_table(stats["domains"]), end="")
    print(f"wrote {args.out}" + ("" if args.no_tokenize else f" (train.py --data {args.out}/tokens)"))


if __name__ == "__main__":
    run_main(main)

"""What the command-line scripts share: one-line errors for bad input, option types that check their values,
files written atomically, and progress lines with an ETA.

A user error (bad path, bad option value, wrong file type, corrupt file) is raised as `UserError` and printed by
`run_main` as one line on stderr with exit status 2; any other exception is a bug and keeps its traceback.
Set NIRVANA_DEBUG=1 to see the traceback of a user error too.
"""

import argparse
import os
import sys
import time
from pathlib import Path


class UserError(Exception):
    """Bad input that the user can fix: the message names the problem and, where there is one, the fix."""


def run_main(main, *args, **kwargs):
    """Call main(*args, **kwargs); a UserError becomes one line on stderr and exit status 2."""
    try:
        return main(*args, **kwargs)
    except UserError as error:
        if os.environ.get("NIRVANA_DEBUG"):
            raise
        prog = os.path.basename(sys.argv[0]) or "nirvana"
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------------------------
# Option types: argparse reports a bad value as "argument --x: ..." with exit status 2, before any work starts.


def _number(kind, text, low, low_inclusive, what):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value != value or value < low or (value == low and not low_inclusive):  # value != value: NaN
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    return value


def positive_int(text):
    return _number(int, text, 1, True, "a positive integer")


def non_negative_int(text):
    return _number(int, text, 0, True, "an integer >= 0")


def positive_float(text):
    return _number(float, text, 0.0, False, "a number > 0")


def non_negative_float(text):
    return _number(float, text, 0.0, True, "a number >= 0")


def positive_int_list(text):
    """'4096,8192' -> [4096, 8192]: a comma-separated list of positive integers."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return [positive_int(part) for part in parts]


def existing_file(text):
    """A path that must be an existing file (not a folder)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; a file is needed")
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f"{text} does not exist")
    return text


# ----------------------------------------------------------------------------------------------------------
# Files


def write_atomically(path, write):
    """write(tmp_path) fills a temporary file beside `path`, which then replaces `path` in one step, so a crash
    never leaves a half-written checkpoint, shard, table or picture (the old file, if any, stays intact)."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")  # the writer creates it: usual permissions, same extension
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomically(path, text):
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def save_figure(path, figure, dpi=120):
    """A matplotlib figure as a PNG, written atomically."""
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


# ----------------------------------------------------------------------------------------------------------
# Progress


class Progress:
    """Progress lines with an ETA for long CPU work, at most one every `every` seconds (and the last one).

        progress = Progress("tokenizing", total=len(files))
        for path in files:
            ...
            progress.update()
    """

    def __init__(self, what, total=None, every=10.0, stream=None):
        self.what, self.total, self.every = what, total, every
        self.stream = stream if stream is not None else sys.stderr
        self.done, self.start = 0, time.perf_counter()
        self.last_print = self.start

    def update(self, count=1):
        self.done += count
        now = time.perf_counter()
        finished = self.total is not None and self.done >= self.total
        if finished or now - self.last_print >= self.every:
            self.last_print = now
            print(self.line(now), file=self.stream, flush=True)

    def line(self, now):
        elapsed = now - self.start
        if not self.total:
            return f"{self.what}: {self.done} done, {elapsed:.0f} s"
        remaining = elapsed / max(self.done, 1) * (self.total - self.done)
        return f"{self.what}: {self.done}/{self.total} ({100 * self.done / self.total:.0f}%), {elapsed:.0f} s, ETA {remaining:.0f} s"

"""What the command-line scripts share: one-line errors for bad input, option types that check their values,
files written atomically, progress lines with an ETA, and a train.py checkpoint loaded for inference.

A user error (bad path, bad option value, wrong file type, corrupt file) is raised as `UserError` and printed by
`run_main` as one line on stderr with exit status 2; any other exception is a bug and keeps its traceback.
Set NIRVANA_DEBUG=1 to see the traceback of a user error too.
"""

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
import zipfile
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


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line on stderr (exit status 2) pointing to --help, not a usage
    block; subcommands' parsers are of the same class."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


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


def comma_separated(text):
    """'a, b,,c' -> ['a', 'b', 'c']: the items of a comma-separated option value, blanks dropped."""
    return [part.strip() for part in text.split(",") if part.strip()]


def names_from(choices, what):
    """The option type of a comma-separated list of names from `choices` (at least one)."""

    def names(text):
        items = comma_separated(text)
        if not items or any(item not in choices for item in items):
            raise argparse.ArgumentTypeError(f"expected {what} from {','.join(choices)}, got {text!r}")
        return items

    return names


def positive_int_list(text):
    """'4096,8192' -> [4096, 8192]: a comma-separated list of positive integers."""
    parts = comma_separated(text)
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return [positive_int(part) for part in parts]


def fraction(text):
    """A number strictly between 0 and 1."""
    value = _number(float, text, 0.0, False, "a number in (0, 1)")
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1), got {text!r}")
    return value


def unit_interval_list(text):
    """'0,0.5,1' -> [0.0, 0.5, 1.0]: comma-separated numbers in [0, 1]."""
    parts = comma_separated(text)
    if not parts:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    values = [non_negative_float(part) for part in parts]
    if max(values) > 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers in [0, 1], got {text!r}")
    return values


def torch_device(text):
    """cpu, cuda or cuda:N; cuda only where torch sees a CUDA device."""
    import torch

    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if kind == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: torch sees no CUDA device here; use cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text}: there are {torch.cuda.device_count()} CUDA devices")
    return text


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
    # the writer creates it: usual permissions, same extension
    tmp = os.path.join(folder, f".tmp-{os.getpid()}-{name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_text_atomically(path, text):
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomically(path, obj):
    write_text_atomically(path, json.dumps(obj, indent=2) + "\n")


def save_figure(path, figure, dpi=120):
    """A matplotlib figure as a PNG, written atomically."""
    write_atomically(path, lambda tmp: figure.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight"))


@contextlib.contextmanager
def no_half_made_output(folder):
    """A block that writes new files or folders into `folder`: when it fails (an error, Ctrl-C, or SIGTERM from
    a job's time limit or `kill`), what it added there is removed, and the folder too if the block created it,
    so a failed run leaves nothing half-made behind; a failure that is not a UserError also says what was
    removed. Entries that were there before are kept (the block must not change those in place).
    The block gets a function keep(): called once what the block has written so far is whole (each file
    written atomically, e.g. the results of the methods finished so far), it keeps those entries through a
    later failure, which then removes only what came after them."""
    existed = os.path.isdir(folder)
    before = set(os.listdir(folder)) if existed else set()
    kept = set()

    def keep():
        kept.update(set(os.listdir(folder)) - before if os.path.isdir(folder) else ())

    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may handle signals
    previous = signal.signal(signal.SIGTERM, _exit_on_signal) if in_main_thread else None
    try:
        yield keep
    except BaseException as error:
        added = sorted(set(os.listdir(folder)) - before - kept) if os.path.isdir(folder) else []
        for name in added:
            path = os.path.join(folder, name)
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
        if not existed and os.path.isdir(folder) and not os.listdir(folder):
            os.rmdir(folder)
        if added and not isinstance(error, UserError):  # a user error is its one line alone
            whole = not existed and not kept
            removed = folder if whole else ", ".join(os.path.join(folder, name) for name in added)
            print(f"the run failed: removed {removed}, which it had written", file=sys.stderr)
        if kept:
            print(f"kept what it had finished in {folder}: {', '.join(sorted(kept))}", file=sys.stderr)
        raise
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_signal(signum, frame):
    """SIGTERM as an exception, so that cleanups run."""
    raise SystemExit(128 + signum)


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


# ----------------------------------------------------------------------------------------------------------
# A train.py checkpoint for inference: what eval.py, sample.py and mri.py share


def default_device():
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


DTYPES = ("float32", "bfloat16", "float16")


def parse_dtype(name, device):
    """None -> bfloat16 on CUDA, float32 elsewhere; else one of DTYPES."""
    import torch

    if name is None:
        return torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: use one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def read_checkpoint(path):
    """The dict a train.py checkpoint holds, its tensors memory-mapped (not read into memory); a missing,
    corrupt or foreign file is a UserError naming it."""
    import torch

    if os.path.isdir(path):
        raise UserError(f"checkpoint {path} is a folder; pass the ckpt.pt file inside it")
    if not os.path.isfile(path):
        raise UserError(
            f"checkpoint {path} does not exist; train.py writes <run folder>/ckpt.pt "
            f"(out/nirvana-tiny/ckpt.pt for `python train.py`)"
        )
    if not zipfile.is_zipfile(
        path
    ):  # torch.save writes a zip archive; its own error for anything else misleads
        raise UserError(
            f"{path} is not a PyTorch checkpoint (not the zip archive torch.save writes: another kind "
            f"of file, or cut short); pass a ckpt.pt written by train.py"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:120] if str(error).strip() else type(error).__name__
        raise UserError(
            f"{path} is not a readable PyTorch checkpoint ({reason}); pass a ckpt.pt written by train.py"
        ) from error
    if not isinstance(checkpoint, dict) or not {"config", "model"} <= set(checkpoint):
        raise UserError(f"{path} holds no 'config' and 'model' entries: not a checkpoint written by train.py")
    return checkpoint


def checkpoint_tokenizer(checkpoint, tokenizer=None):
    """The tokenizer of a train.py checkpoint (its weights are not read), or the spec `tokenizer` overriding it."""
    from tokenizer import load_tokenizer

    spec = tokenizer or read_checkpoint(checkpoint).get("tokenizer")
    if spec is None:
        raise UserError(
            f"checkpoint {checkpoint} names no tokenizer (key 'tokenizer'); pass --tokenizer SPEC "
            f"('bytes', '<path>.model' or 'tiktoken:<path>')"
        )
    return load_tokenizer(spec)


def load_model(checkpoint, device=None, dtype=None, tokenizer=None):
    """-> (model in eval mode on device, tokenizer) from a train.py checkpoint. tokenizer: a spec overriding
    the one the checkpoint names. Every problem with the file or the tokenizer is one UserError."""
    from nirvana import Nirvana

    device = device or default_device()
    tok = checkpoint_tokenizer(checkpoint, tokenizer)
    try:
        model = Nirvana.from_checkpoint(checkpoint, map_location="cpu")
    except (ValueError, RuntimeError) as error:
        raise UserError(
            f"checkpoint {checkpoint} does not fit nirvana.py's model: {str(error).splitlines()[0][:200]}"
        ) from error
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(
            f"tokenizer {tok.spec!r} has {tok.vocab_size} tokens but the model's vocabulary is "
            f"{model.config.vocab_size}: wrong --tokenizer for this checkpoint?"
        )
    model.to(device=device, dtype=parse_dtype(dtype, device)).eval()
    return model, tok

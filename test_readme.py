"""The commands of README.md and of each script's --help run as written, in order.

Commands whose comment names a need beyond a CPU ("GPU", "8 GPUs", "your data", "needs lm_eval") and those of
README sections other than Set up, Pretraining and Evaluation are only parsed: argparse must accept them. The
others run in-process (through cli.run_main, as `python <script>` would) in a temporary folder, one after the
other, and must exit with status 0. There `python train.py` runs a two-step schedule instead of its 500 steps
(TINY_DEFAULTS shortened here; the command line is the README's), and the built-in corpus goes to the
folder's data/pydoc instead of the repository's.
"""

import os
import re
import shlex
import sys

import pytest

import bench
import cli
import eval as ev
import mri
import prepare
import sample
import train

REPO = os.path.dirname(os.path.abspath(__file__))
NEEDS = re.compile(r"\b(GPUs?|your data|needs)\b")
RUN_SECTIONS = ("Set up", "Pretraining", "Evaluation")


def logical_lines(lines):
    """Joins lines ending in a backslash with the next."""
    joined, current = [], ""
    for line in lines:
        current += line.rstrip()
        if current.endswith("\\"):
            current = current[:-1] + " "
            continue
        joined.append(current.strip())
        current = ""
    return joined


def split_command(line):
    """'python x.py --a 1   # GPU' -> (['python', 'x.py', '--a', '1'], 'GPU')."""
    match = re.search(r"\s#\s(.*)$", line)
    return shlex.split(line[: match.start()] if match else line), match.group(1) if match else ""


def readme_commands():
    """(section, argv, comment) of every command in README.md's bash blocks."""
    commands, section, block = [], "", None
    for line in open(os.path.join(REPO, "README.md"), encoding="utf-8"):
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```"):
            if block is not None:
                commands += [(section, *split_command(text)) for text in logical_lines(block) if text]
                block = None
            elif line.strip() == "```bash":
                block = []
        elif block is not None:
            block.append(line)
    return commands


def docstring_commands(module):
    """(argv, comment) of the command lines in a script's docstring (its --help)."""
    lines = module.__doc__.splitlines()
    starts = [i for i, line in enumerate(lines) if line.strip().startswith(("python ", "torchrun "))]
    commands = []
    for i in starts:
        block, j = [lines[i]], i
        while lines[j].rstrip().endswith("\\"):
            j += 1
            block.append(lines[j])
        commands.append(split_command(logical_lines(block)[0]))
    return commands


SCRIPTS = {
    "train.py": train,
    "eval.py": ev,
    "sample.py": sample,
    "prepare.py": prepare,
    "mri.py": mri,
    "bench.py": bench,
}


def script_and_args(argv):
    """-> (script name, its arguments), or None for set-up lines (pip, apt-get, ruff), pytest and experiments/ (whose
    pipeline test_experiments.py runs); environment assignments skipped."""
    while argv and re.match(r"^[A-Z_]+=", argv[0]):
        argv = argv[1:]
    if argv[0] in ("pip", "apt-get", "ruff") or argv[:3] == ["python", "-m", "pytest"]:
        return None
    if any(word.startswith("experiments/") for word in argv[:2]):
        return None
    # python X.py or torchrun ... X.py
    position = next(i for i, word in enumerate(argv) if word.endswith(".py"))
    assert argv[0] in ("python", "torchrun") and argv[position] in SCRIPTS, argv
    return argv[position], argv[position + 1 :]


def parses(script, args, monkeypatch):
    """argparse accepts args (files the command would read need not exist)."""
    with monkeypatch.context() as patch:
        for module in SCRIPTS.values():
            # cli.existing_file, mri.py's --data and --anatomy checks
            for path_type in ("existing_file", "volume_folder", "nifti_file"):
                if hasattr(module, path_type):
                    patch.setattr(module, path_type, lambda text: text)
        if script == "eval.py":
            ev.build_parser().parse_args(args)
        elif script == "bench.py":
            patch.setattr(sys, "argv", ["bench.py"] + args)
            bench.parse_args()
        else:
            SCRIPTS[script].parse_args(args)


def runs(script, args, capsys):
    capsys.readouterr()  # the failure message shows this command's stderr only
    try:
        cli.run_main(SCRIPTS[script].main, args)
    except SystemExit as exit_info:
        pytest.fail(f"{script} {shlex.join(args)} exited with {exit_info.code}: {capsys.readouterr().err}")


@pytest.fixture
def folder(tmp_path, monkeypatch):
    """A fresh working folder whose data/pydoc is the built-in corpus's, and a two-step tiny schedule."""
    monkeypatch.chdir(tmp_path)
    for module in (train, prepare):
        monkeypatch.setattr(module, "BUILTIN_DIR", str(tmp_path / "data" / "pydoc"))
    steps = 2
    tokens = steps * train.TINY_DEFAULTS["global_batch_tokens"]
    monkeypatch.setattr(
        train,
        "TINY_DEFAULTS",
        dict(
            train.TINY_DEFAULTS,
            max_tokens=tokens,
            warmup_tokens=tokens // 2,
            eval_every=steps,
            save_every=steps,
        ),
    )
    return tmp_path


def run_in_order(commands, run_all, monkeypatch, capsys, done):
    """commands: (argv, comment, may run). Skips what `done` (argv strings) already ran in this folder."""
    ran, parsed = [], []
    for argv, comment, may_run in commands:
        target = script_and_args(argv)
        if target is None:
            continue
        script, args = target
        if may_run and run_all and not NEEDS.search(comment):
            if shlex.join(argv) not in done:
                runs(script, args, capsys)
                done.add(shlex.join(argv))
            ran.append(shlex.join(argv))
        else:
            parses(script, args, monkeypatch)
            parsed.append(shlex.join(argv))
    return ran, parsed


def test_readme_then_eval_and_sample_help_commands_run_in_order(folder, monkeypatch, capsys):
    readme = readme_commands()
    assert ["pip", "install", "-r", "requirements.txt"] in [argv for _, argv, _ in readme if argv[0] == "pip"]
    assert os.path.isfile(os.path.join(REPO, "requirements.txt"))
    done = set()
    ran, parsed = run_in_order(
        [(argv, comment, section.startswith(RUN_SECTIONS)) for section, argv, comment in readme],
        True,
        monkeypatch,
        capsys,
        done,
    )
    assert ran[:2] == ["python train.py", "python train.py --resume"]
    assert any(command.startswith("python eval.py ppl") for command in ran)
    assert any(command.startswith("python sample.py") for command in ran)
    assert any(command.startswith("torchrun") for command in parsed)
    assert (folder / "out" / "nirvana-tiny" / "ckpt.pt").is_file()
    assert (folder / "eval_out" / "ppl_nirvana-tiny_pydoc.png").is_file()
    # the --help of eval.py and sample.py start "After `python train.py`": in the same folder
    for module in (ev, sample):
        run_in_order(
            [(argv, comment, True) for argv, comment in docstring_commands(module)],
            True,
            monkeypatch,
            capsys,
            done,
        )


@pytest.mark.parametrize("module", [train, prepare], ids=["train.py", "prepare.py"])
def test_help_commands_run_in_order_in_a_fresh_folder(folder, monkeypatch, capsys, module):
    commands = docstring_commands(module)
    assert commands, f"no commands in {module.__name__}'s --help"
    ran, _ = run_in_order(
        [(argv, comment, True) for argv, comment in commands], True, monkeypatch, capsys, set()
    )
    assert ran  # at least its first command runs on a CPU
    assert (folder / "data" / "pydoc" / "meta.json").is_file()

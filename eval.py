"""Nirvana evaluation: the paper's measurements as commands on a checkpoint written by train.py.

After `python train.py` (which writes out/nirvana-tiny/ckpt.pt and prepares data/pydoc), on a CPU:
    python eval.py ppl   --checkpoint out/nirvana-tiny/ckpt.pt --data data/pydoc     # all validation tokens
    python eval.py niah  --checkpoint out/nirvana-tiny/ckpt.pt --tasks pk --lengths 256 --samples 1 \\
        --depths 0,1 --answer-tokens 8
    python eval.py gates --checkpoint out/nirvana-tiny/ckpt.pt --text "The patient's MRI shows"   # t and |p|
    python eval.py export --checkpoint out/nirvana-tiny/ckpt.pt --out out/nirvana-tiny-hf   # safetensors
The paper's measurements, on a 350m or 1.3b checkpoint (a comment says what a command needs beyond a CPU):
    python eval.py extrapolate --checkpoint out/nirvana-1.3b/ckpt.pt out/transformer-1.3b/ckpt.pt \\
        --data long.txt --lengths 4096,8192,12288,16384,20480                        # Fig. 7; GPU, your data
    python eval.py niah    --checkpoint out/nirvana-1.3b/ckpt.pt --tasks pk,n,w --samples 10   # Table 3; GPU
    python eval.py lambada --checkpoint out/nirvana-1.3b/ckpt.pt --data lambada.jsonl  # Table 2; GPU, your data
    python eval.py harness --checkpoint out/nirvana-1.3b/ckpt.pt --tasks paper   # Table 2; GPU, needs lm_eval, hub
    python eval.py speed   --size 350m --prompt-len 4096 --batch-size 4 --new-tokens 128       # Table 4; GPU

Every command prints its result and where it wrote its files under --out-dir (default eval_out/), named after
the run folder of the checkpoint (out/nirvana-tiny/ckpt.pt -> nirvana-tiny) or --name, so runs of different
checkpoints do not overwrite each other. --data is a text file (tokenised with the checkpoint's tokenizer), a
prepare.py folder (its --split, default val: all of it, where train.py's validation reads only the first
--eval-tokens) or one of its .bin shards.
`harness` runs lm-evaluation-harness (requirements-eval.txt), by default on local tasks, offline; the adapter
(class HarnessLM) registers the model with it:
    import lm_eval, eval; eval.register_lm_eval()      # registers model name "nirvana"
    lm_eval.simple_evaluate(model="nirvana", model_args="checkpoint=out/nirvana-tiny/ckpt.pt", tasks=[...])
"""

import argparse
import contextlib
import functools
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from cli import (
    DTYPES,
    ArgumentParser,
    Progress,
    UserError,
    checkpoint_tokenizer,
    comma_separated,
    default_device,
    existing_file,
    load_model,
    names_from,
    non_negative_int,
    parse_dtype,
    positive_int,
    positive_int_list,
    run_main,
    torch_device,
    unit_interval_list,
    write_atomically,
    write_json_atomically,
    write_text_atomically,
)
from cli import save_figure as save_png
from nirvana import PRESETS, VARIANTS, Nirvana, NirvanaConfig
from prepare import TokenShards, load_meta

# -----------------------------------------------------------------------------------------------------------
# Files: atomic writes (temp file in the same folder, then os.replace)


def save_npz(path, arrays):
    with open(path, "wb") as f:  # a file object: np.savez adds no ".npz"
        np.savez(f, **arrays)


def save_figure(fig, path):
    import matplotlib.pyplot as plt

    save_png(path, fig, dpi=130)
    plt.close(fig)


def new_figure(*args, **kwargs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def markdown_table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------------------------------------
# Data (a model and its tokenizer come from cli.load_model)


def model_device(model):
    return next(model.parameters()).device


def read_tokens(path, tok, split="val"):
    """A 1-D int64 array of token ids from a folder written by prepare.py (its `split`), one .bin shard
    of such a folder, or any other file read as UTF-8 text and encoded with `tok`."""
    if os.path.isdir(path):
        meta = load_meta(path)
        check_tokenizer_matches(meta, tok, path)
        shards = TokenShards(path, split)
        tokens = shards.read(0, shards.num_tokens)
    elif path.endswith(".bin"):
        meta = load_meta(os.path.dirname(os.path.abspath(path)))
        check_tokenizer_matches(meta, tok, path)
        tokens = np.memmap(path, dtype=meta["dtype"], mode="r")
    elif os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                tokens = tok.encode(f.read())
        except UnicodeDecodeError as error:
            raise UserError(
                f"--data {path} is not UTF-8 text ({error.reason} at byte {error.start}); give a "
                f"text file, a prepare.py folder or one of its .bin shards"
            ) from error
    else:
        raise UserError(
            f"--data {path} does not exist (a text file, a prepare.py folder or one of its .bin "
            f"shards; `python train.py` prepares data/pydoc)"
        )
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= tok.vocab_size):
        raise UserError(
            f"{path}: token id {int(tokens.max())} is outside the tokenizer's vocabulary "
            f"[0, {tok.vocab_size}): the data was made with another tokenizer"
        )
    return tokens


def check_tokenizer_matches(meta, tok, path):
    if meta["vocab_size"] != tok.vocab_size:
        raise UserError(
            f"{path} was tokenised with '{meta['tokenizer']}' (vocab {meta['vocab_size']}), the model "
            f"uses '{tok.spec}' (vocab {tok.vocab_size}): re-run prepare.py with --tokenizer {tok.spec}"
        )
    if meta["tokenizer"] != tok.spec:
        print(f"note: {path} names tokenizer '{meta['tokenizer']}', the model '{tok.spec}' (same vocab size)")


# -----------------------------------------------------------------------------------------------------------
# Scoring tokens. Every model variant is causal, so right-padding a batch never changes the scores of
# the real tokens; long sequences go through the backbone once and the LM head in chunks (no (B,T,V)).


@torch.no_grad()
def score_tokens(model, idx, targets, head_chunk=1024):
    """idx, targets (B, T) long -> (log p(targets) (B, T) float32, targets == argmax (B, T) bool)."""
    h = model.backbone(model.embed(idx))  # (B, T, d_model)
    logprob = torch.empty(targets.shape, dtype=torch.float32, device=idx.device)
    greedy = torch.empty(targets.shape, dtype=torch.bool, device=idx.device)
    for s in range(0, idx.shape[1], head_chunk):
        logits = model.lm_head(h[:, s : s + head_chunk]).float()  # (B, chunk, V)
        tgt = targets[:, s : s + head_chunk]
        logprob[:, s : s + head_chunk] = -F.cross_entropy(logits.transpose(1, 2), tgt, reduction="none")
        greedy[:, s : s + head_chunk] = logits.argmax(-1) == tgt
    return logprob, greedy


def window_logprobs(model, tokens, context_length, batch_size=1, show_progress=False):
    """The stream cut into non-overlapping windows of context_length predictions (the last may be shorter),
    each read from a fresh state. Yields (first predicted position, predictions, sum of their log-probs)
    per window, where the prediction of tokens[i] sees the tokens of its window before i."""
    device = model_device(model)
    tokens = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
    n_pred = len(tokens) - 1
    if n_pred < 1:
        raise UserError("need at least 2 tokens to measure perplexity")
    starts = list(range(0, n_pred, context_length))
    full = [s for s in starts if s + context_length <= n_pred]
    batches = [full[i : i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in starts if s + context_length > n_pred]  # the shorter last window
    progress = (
        Progress(f"perplexity at context {context_length}: windows", len(starts)) if show_progress else None
    )
    for batch in batches:
        length = min(context_length, n_pred - batch[0])
        window = torch.stack([tokens[s : s + length + 1] for s in batch]).to(device)  # (B, length+1)
        logprob, _ = score_tokens(model, window[:, :-1], window[:, 1:])
        for start, row in zip(batch, logprob.double().sum(dim=1).tolist()):
            yield start + 1, length, row
        if progress:
            progress.update(len(batch))


def stream_logprob(model, tokens, context_length, batch_size=1):
    """Sum over i >= 1 of log p(tokens[i] | tokens of its window before i) (see window_logprobs).
    -> (sum of log-probs, number of predicted tokens)."""
    windows = list(window_logprobs(model, tokens, context_length, batch_size))
    return sum(w[2] for w in windows), sum(w[1] for w in windows)


def perplexity(model, tokens, context_length, batch_size=1, show_progress=False):
    """exp of the mean next-token loss over the stream (see window_logprobs)."""
    windows = list(window_logprobs(model, tokens, context_length, batch_size, show_progress))
    return perplexity_of_windows(windows, context_length)


def perplexity_of_windows(windows, context_length):
    total, count = sum(w[2] for w in windows), sum(w[1] for w in windows)
    return {
        "context_length": context_length,
        "tokens": count,
        "loss": -total / count,
        "ppl": math.exp(-total / count),
    }


def encode_pair(tok, context, continuation):
    """Token ids of (context, continuation) as lm-evaluation-harness splits them: trailing spaces of the
    context move to the continuation, the continuation is what encoding the whole adds after the
    context's tokens, and an empty context is a single <eos>."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    if not context:
        return [tok.eos_id], tok.encode(continuation)
    context_ids = tok.encode(context)
    whole = tok.encode(context + continuation)
    return context_ids, whole[len(context_ids) :]


def continuation_scores(model, pairs, max_length, batch_size=1, progress=None):
    """pairs: [(context ids, continuation ids)] -> [(sum log p(continuation | context), all greedy)].
    The context is cut from the left so that the whole fits max_length tokens. progress: a cli.Progress."""
    device = model_device(model)
    results = [None] * len(pairs)
    for i, (_, cont) in enumerate(pairs):
        if not cont:
            raise UserError(f"request {i}: the continuation encodes to no tokens")
        if len(cont) > max_length:
            raise UserError(
                f"request {i}: continuation of {len(cont)} tokens exceeds max_length {max_length}"
            )
    order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
    for b in range(0, len(order), batch_size):
        batch = order[b : b + batch_size]
        seqs = [(pairs[i][0] + pairs[i][1])[-(max_length + 1) :] for i in batch]
        width = max(len(s) for s in seqs) - 1
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        tgt = torch.zeros(len(batch), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            idx[row, : len(s) - 1] = torch.tensor(s[:-1])
            tgt[row, : len(s) - 1] = torch.tensor(s[1:])
        logprob, greedy = score_tokens(model, idx.to(device), tgt.to(device))
        for row, (i, s) in enumerate(zip(batch, seqs)):
            n = len(pairs[i][1])
            span = slice(len(s) - 1 - n, len(s) - 1)
            results[i] = (logprob[row, span].double().sum().item(), bool(greedy[row, span].all()))
        if progress:
            progress.update(len(batch))
    return results


# -----------------------------------------------------------------------------------------------------------
# Generation (the model's O(1)-per-token decode path)


def generate_ids(model, prompt_ids, max_new_tokens, temperature=0.0, top_k=None):
    """-> the new token ids after prompt_ids (one sequence); temperature 0 is greedy decoding."""
    idx = torch.tensor([prompt_ids], dtype=torch.long, device=model_device(model))
    return model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)[
        0, len(prompt_ids) :
    ].tolist()


# -----------------------------------------------------------------------------------------------------------
# S-NIAH as RULER defines it (Hsieh et al. 2024): one key-value needle in a haystack, the model asked for
# the value. pk: pass-key retrieval, repeated noise haystack, 7-digit number; n: number in an essay-like
# haystack; w: word in an essay-like haystack (the paper's S-NIAH-W). The essay haystack (RULER: Paul
# Graham essays) is generated locally from a small grammar, so nothing is downloaded.

NOISE_SENTENCES = [
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
]
ESSAY_SUBJECTS = [
    "The old lighthouse keeper",
    "A patient gardener",
    "The village baker",
    "Our neighbour",
    "The tired traveller",
    "A curious child",
    "The morning ferry",
    "A quiet librarian",
    "The mountain guide",
    "An old fisherman",
    "The school teacher",
    "A wandering musician",
    "The harbour master",
    "My grandmother",
    "The young carpenter",
    "A shy painter",
]
ESSAY_PREDICATES = [
    "walked slowly",
    "waited patiently",
    "sang softly",
    "looked around",
    "rested for a while",
    "told a long story",
    "watched the clouds",
    "counted the boats",
    "mended the fence",
    "painted the door",
    "read a faded letter",
    "listened to the rain",
    "cleaned the windows",
    "planted some seeds",
    "carried a heavy basket",
    "wrote in a notebook",
]
ESSAY_PLACES = [
    "near the bridge",
    "after lunch",
    "in the garden",
    "before sunset",
    "under the tall trees",
    "by the harbour",
    "on the hill",
    "during the storm",
    "beside the well",
    "at the edge of town",
    "in the evening",
    "along the river bank",
    "behind the church",
    "on a cold morning",
]
KEY_ADJECTIVES = [
    "amber",
    "brisk",
    "cobalt",
    "dusty",
    "eager",
    "frosty",
    "hollow",
    "ivory",
    "jolly",
    "lively",
    "mellow",
    "nimble",
    "proud",
    "quaint",
    "rustic",
    "silent",
    "tawny",
    "vivid",
    "witty",
    "zesty",
]
KEY_NOUNS = [
    "anchor",
    "badger",
    "canyon",
    "dagger",
    "falcon",
    "goblet",
    "igloo",
    "jigsaw",
    "kettle",
    "lantern",
    "meadow",
    "nectar",
    "pebble",
    "quiver",
    "rocket",
    "saddle",
    "thimble",
    "violin",
]
VALUE_WORDS = [
    "apricot",
    "blizzard",
    "compass",
    "dolphin",
    "emerald",
    "flamingo",
    "glacier",
    "hammock",
    "iceberg",
    "juniper",
    "kayak",
    "lobster",
    "mosaic",
    "nutmeg",
    "octopus",
    "pelican",
    "quartz",
    "raccoon",
    "sapphire",
    "tornado",
    "umbrella",
    "volcano",
    "waffle",
    "yogurt",
]

NIAH_INTRO = (
    "Some special magic {kinds} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {kinds} afterwards.\n"
)
NIAH_NEEDLE = "One of the special magic {kinds} for {key} is: {value}."
NIAH_QUESTION = (
    "\nWhat is the special magic {kind} for {key} mentioned in the provided text? "
    "The special magic {kind} for {key} mentioned in the provided text is"
)


@dataclass(frozen=True)
class NiahTask:
    name: str  # as in the paper's Table 3
    haystack: str  # "noise" | "essay"
    value: str  # "number" | "word"
    lengths: tuple  # the paper's context lengths for this task


NIAH_TASKS = {
    "pk": NiahTask("S-NIAH-PK", "noise", "number", (2048, 4096, 8192)),
    "n": NiahTask("S-NIAH-N", "essay", "number", (2048, 4096, 8192)),
    "w": NiahTask("S-NIAH-W", "essay", "word", (1024, 2048, 4096)),
}


@dataclass
class NiahSample:
    task: str
    length: int  # token budget: prompt plus the tokens the answer may take
    depth: float  # where the needle sits in the haystack, 0 = first sentence, 1 = last
    key: str
    answer: str
    prompt: str
    needle_start: int  # character offset of the needle in the prompt
    haystack_start: int
    haystack_end: int
    prompt_tokens: int


def haystack_sentence(kind, index, rng):
    """Sentence `index` of a haystack: the noise sentences in a cycle, or a random essay-like sentence."""
    if kind == "noise":
        return NOISE_SENTENCES[index % len(NOISE_SENTENCES)]
    return f"{rng.choice(ESSAY_SUBJECTS)} {rng.choice(ESSAY_PREDICATES)} {rng.choice(ESSAY_PLACES)}."


def render_niah(task, key, value, sentences, depth):
    """-> (prompt, needle_start, haystack_start, haystack_end) with the needle inserted between sentences
    at index round(depth * len(sentences))."""
    kinds = task.value + "s"
    needle = NIAH_NEEDLE.format(kinds=kinds, key=key, value=value)
    at = round(depth * len(sentences))
    intro = NIAH_INTRO.format(kinds=kinds)
    before = " ".join(sentences[:at])
    haystack = " ".join(sentences[:at] + [needle] + sentences[at:])
    prompt = intro + haystack + NIAH_QUESTION.format(kind=task.value, key=key)
    needle_start = len(intro) + len(before) + (1 if before else 0)
    return prompt, needle_start, len(intro), len(intro) + len(haystack)


def make_niah_sample(task_id, length, depth, tok, seed, answer_tokens=32):
    """One S-NIAH prompt whose tokens plus answer_tokens fit `length`, the haystack as long as that allows."""
    if task_id not in NIAH_TASKS:
        raise UserError(f"unknown S-NIAH task '{task_id}': use one of {', '.join(NIAH_TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise UserError(f"needle depth {depth} is outside [0, 1]")
    task = NIAH_TASKS[task_id]
    rng = random.Random(f"{task_id}-{length}-{depth}-{seed}")
    key = f"{rng.choice(KEY_ADJECTIVES)}-{rng.choice(KEY_NOUNS)}"
    value = str(rng.randint(10**6, 10**7 - 1)) if task.value == "number" else rng.choice(VALUE_WORDS)
    budget = length - answer_tokens
    pool = []  # haystack sentences, drawn as the search needs them

    def fits(n):
        while len(pool) < n:
            pool.append(haystack_sentence(task.haystack, len(pool), rng))
        return len(tok.encode(render_niah(task, key, value, pool[:n], depth)[0])) <= budget

    if not fits(0):
        raise UserError(
            f"S-NIAH length {length} is too short for the prompt template and "
            f"{answer_tokens} answer tokens: use a longer --lengths or fewer --answer-tokens"
        )
    hi = 16
    while fits(hi):
        hi *= 2
    lo = hi // 2 if hi > 16 else 0  # fits(lo), not fits(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    prompt, needle_start, hay_start, hay_end = render_niah(task, key, value, pool[:lo], depth)
    return NiahSample(
        task_id, length, depth, key, value, prompt, needle_start, hay_start, hay_end, len(tok.encode(prompt))
    )


def niah_correct(prediction, answer):
    """RULER's string_match_all for one reference: the answer appears in the prediction, any case."""
    return answer.lower() in prediction.lower()


def run_niah(model, tok, task_ids, depths, samples, lengths=None, answer_tokens=32, seed=0):
    """-> one record per generated answer (task, length, depth, answer, prediction, correct)."""
    unknown = [t for t in task_ids if t not in NIAH_TASKS]
    if unknown:
        raise UserError(f"unknown S-NIAH task(s) {unknown}: use {', '.join(NIAH_TASKS)}")
    cells = [(task_id, length) for task_id in task_ids for length in lengths or NIAH_TASKS[task_id].lengths]
    for task_id, length in cells:  # every length fits the prompt template before the first generation
        make_niah_sample(task_id, length, 0.0, tok, seed, answer_tokens)
    progress = Progress("S-NIAH: answers", len(cells) * len(depths) * samples)
    records = []
    for task_id in task_ids:
        for length in lengths or NIAH_TASKS[task_id].lengths:
            for depth in depths:
                for i in range(samples):
                    progress.update()
                    s = make_niah_sample(task_id, length, depth, tok, seed * 1_000_003 + i, answer_tokens)
                    new_ids = generate_ids(model, tok.encode(s.prompt), answer_tokens)
                    prediction = tok.decode([t for t in new_ids if t != tok.eos_id])
                    records.append(
                        {
                            "task": task_id,
                            "length": length,
                            "depth": depth,
                            "sample": i,
                            "answer": s.answer,
                            "prediction": prediction,
                            "correct": niah_correct(prediction, s.answer),
                        }
                    )
            hits = [r["correct"] for r in records if r["task"] == task_id]
            print(f"  {NIAH_TASKS[task_id].name}: {sum(hits)}/{len(hits)} correct so far", flush=True)
    return records


def niah_accuracy(records):
    """-> {(task, length): accuracy in %} averaged over depths and samples."""
    cells = {}
    for r in records:
        cells.setdefault((r["task"], r["length"]), []).append(r["correct"])
    return {cell: 100.0 * sum(v) / len(v) for cell, v in cells.items()}


def niah_table(accuracy_by_model):
    """Table 3: a row per model, a column per (task, length), and the average."""
    cells = sorted(
        {c for acc in accuracy_by_model.values() for c in acc},
        key=lambda c: (list(NIAH_TASKS).index(c[0]), c[1]),
    )
    header = (
        ["Model"]
        + [
            f"{NIAH_TASKS[t].name} {length // 1024}K"
            if length % 1024 == 0
            else f"{NIAH_TASKS[t].name} {length}"
            for t, length in cells
        ]
        + ["Avg."]
    )
    rows = []
    for name, acc in accuracy_by_model.items():
        values = [acc.get(c) for c in cells]
        shown = [v for v in values if v is not None]
        rows.append(
            [name] + ["-" if v is None else f"{v:.1f}" for v in values] + [f"{sum(shown) / len(shown):.1f}"]
        )
    return markdown_table(header, rows)


def plot_niah(records, path, title):
    """Accuracy over (needle depth, context length), a panel per task."""
    task_ids = [t for t in NIAH_TASKS if any(r["task"] == t for r in records)]
    fig, axes = new_figure(
        1, len(task_ids), figsize=(4.5 * len(task_ids), 3.8), squeeze=False, layout="constrained"
    )
    for ax, task_id in zip(axes[0], task_ids):
        rs = [r for r in records if r["task"] == task_id]
        lengths = sorted({r["length"] for r in rs})
        depths = sorted({r["depth"] for r in rs})
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, length in enumerate(lengths):
                hits = [r["correct"] for r in rs if r["depth"] == d and r["length"] == length]
                grid[i, j] = 100.0 * sum(hits) / len(hits)
                ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(x) for x in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(NIAH_TASKS[task_id].name)
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy (%)")
    fig.suptitle(title)
    save_figure(fig, path)


# -----------------------------------------------------------------------------------------------------------
# LAMBADA: last-word prediction (lm-eval's lambada_openai: context = all but the last word, target = " "
# + last word; acc = the target is the greedy continuation; ppl = exp(-mean log p(target | context)))


def read_lambada(path):
    """A .jsonl file with one {"text": ...} per line -> [(context, " " + last word)]."""
    if not os.path.isfile(path):
        raise UserError(f"LAMBADA file '{path}' not found (a .jsonl with a 'text' field per line)")
    examples = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{n} is not a JSON object with a 'text' field") from e
            context, _, last = text.strip().rpartition(" ")
            if not context or not last:
                raise UserError(f"{path}:{n}: text has no last word to predict")
            examples.append((context, " " + last))
    if not examples:
        raise UserError(f"{path} holds no examples")
    return examples


def lambada(model, tok, examples, max_length, batch_size=16):
    """-> {"acc": % of targets that are the greedy continuation, "ppl": exp(-mean target log-prob)}."""
    pairs = [encode_pair(tok, c, t) for c, t in examples]
    scores = continuation_scores(
        model, pairs, max_length, batch_size, Progress("LAMBADA: examples", len(pairs))
    )
    logprobs = [lp for lp, _ in scores]
    return {
        "examples": len(examples),
        "acc": 100.0 * sum(g for _, g in scores) / len(scores),
        "ppl": math.exp(-sum(logprobs) / len(logprobs)),
    }


# -----------------------------------------------------------------------------------------------------------
# lm-evaluation-harness adapter. HarnessLM implements the harness's custom-LM interface (requests are
# objects whose .args are the arguments) without importing lm_eval; register_lm_eval() makes the
# harness's LM subclass of it and registers it as "nirvana".


class HarnessLM:
    def __init__(self, model, tok, batch_size=1, max_length=None):
        self.model, self.tok = model, tok
        self.batch_size = int(batch_size)
        self.max_length = int(max_length or model.config.context_length)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        """lm-eval's constructor: "checkpoint=ckpt.pt,device=cuda,dtype=bfloat16,batch_size=8,tokenizer=..."."""
        args = dict(kv.split("=", 1) for kv in arg_string.split(",") if kv.strip())
        args.update({k: v for k, v in (additional_config or {}).items() if v is not None})
        if "checkpoint" not in args:
            raise ValueError("model_args must name checkpoint=<path to a train.py checkpoint>")
        model, tok = load_model(
            args["checkpoint"], args.get("device"), args.get("dtype"), args.get("tokenizer")
        )
        batch_size = args.get("batch_size", 1)
        return cls(model, tok, 1 if batch_size in ("auto", None) else batch_size, args.get("max_length"))

    def loglikelihood(self, requests):
        """args (context, continuation) -> [(log p(continuation | context), continuation is greedy)]."""
        pairs = [encode_pair(self.tok, *r.args) for r in requests]
        return continuation_scores(self.model, pairs, self.max_length, self.batch_size)

    def loglikelihood_rolling(self, requests):
        """args (text,) -> [log p(text)], the text read after an <eos> in windows of max_length."""
        return [
            stream_logprob(self.model, [self.tok.eos_id] + self.tok.encode(text), self.max_length)[0]
            for (text,) in (r.args for r in requests)
        ]

    def generate_until(self, requests):
        """args (context, {"until": [...], "max_gen_toks": n, "do_sample": b, "temperature": x}) -> [text]."""
        outputs = []
        for context, gen_kwargs in (r.args for r in requests):
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            temperature = float(gen_kwargs.get("temperature", 0.0))
            sample = gen_kwargs.get("do_sample", False) and temperature > 0
            prompt = self.tok.encode(context)[-max(1, self.max_length - max_new) :] or [self.tok.eos_id]
            new_ids = generate_ids(self.model, prompt, max_new, temperature if sample else 0.0)
            if self.tok.eos_id in new_ids:
                new_ids = new_ids[: new_ids.index(self.tok.eos_id)]
            text = self.tok.decode(new_ids)
            cuts = [text.index(stop) for stop in until if stop and stop in text]
            outputs.append(text[: min(cuts)] if cuts else text)
        return outputs


_registered_lm_eval_class = None


def register_lm_eval(name="nirvana"):
    """Registers HarnessLM with lm-evaluation-harness under `name` (imports lm_eval; once per process)."""
    global _registered_lm_eval_class
    if _registered_lm_eval_class is None:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model

        class NirvanaLM(HarnessLM, LM):
            def __init__(self, *args, **kwargs):
                LM.__init__(self)
                HarnessLM.__init__(self, *args, **kwargs)

        _registered_lm_eval_class = register_model(name)(NirvanaLM)
    return _registered_lm_eval_class


if "lm_eval" in sys.modules:  # `import lm_eval; import eval` registers "nirvana" without another call
    register_lm_eval()


# -----------------------------------------------------------------------------------------------------------
# Gate and Trigger pictures: t of eq.(8) per Nirvana layer and token, and |p| of eq.(5)


@torch.no_grad()
def gate_maps(model, ids):
    """-> (t (layers, T) in [0,1]: 1 = all SWA, 0 = all linear attention; |p| (layers, T) or None)."""
    idx = torch.tensor([ids], dtype=torch.long, device=model_device(model))
    _, _, trace = model(idx, None, return_trace=True)
    if not trace.get("gate"):
        raise UserError(
            f"variant '{model.config.variant}' has no Updater gate t to show "
            f"(use a nirvana, nirvana-notrigger or nirvana-rope checkpoint)"
        )
    t = torch.stack([g[0] for g in trace["gate"]]).float().cpu().numpy()  # (L, T)
    p = trace.get("p")
    p_norm = torch.stack([x[0].float().norm(dim=-1) for x in p]).cpu().numpy() if p else None  # (L, T)
    return t, p_norm


def plot_gates(t, p_norm, labels, first_layer, path, title):
    """Heatmaps over (layer, token): the gate t (1 = all SWA, 0 = all linear attention) and |p|."""
    panels = [
        (
            "Updater gate t (1 = SWA, 0 = linear attention), eq. (8)",
            t,
            dict(vmin=0.0, vmax=1.0, cmap="coolwarm"),
        )
    ]
    if p_norm is not None:
        panels.append(("Trigger fast-weight norm |p|, eq. (5)", p_norm, dict(cmap="viridis")))
    width = min(24.0, 5.0 + 0.2 * t.shape[1])
    height = max(2.0, 1.0 + 0.3 * t.shape[0])
    fig, axes = new_figure(
        len(panels), 1, figsize=(width, height * len(panels)), squeeze=False, layout="constrained"
    )
    for ax, (label, values, style) in zip(axes[:, 0], panels):
        im = ax.imshow(values, aspect="auto", interpolation="nearest", **style)
        ax.set_yticks(range(values.shape[0]), [str(first_layer + i) for i in range(values.shape[0])])
        ax.set_ylabel("layer")
        ax.set_title(label, fontsize=10)
        fig.colorbar(im, ax=ax, pad=0.01)
        if len(labels) <= 96:
            ax.set_xticks(range(len(labels)), labels, rotation=90, fontsize=7)
        else:
            ax.set_xlabel("token position")
    fig.suptitle(title)
    save_figure(fig, path)


def token_labels(tok, ids):
    """One printable label per token id (spaces shown as ␣)."""
    return [tok.decode([i]).replace(" ", "␣").replace("\n", "\\n") or "·" for i in ids]


# -----------------------------------------------------------------------------------------------------------
# Inference speed (Table 4): generated tokens/s after a prompt, and decode time per token vs context


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WARMUP_STEPS = 3  # eager decode steps before the timed ones (kernel autotuning, allocator warm-up)
PREFILL_CHUNK = 4096  # prompts are prefilled through the caches in chunks of this many tokens


def decode_step(model, token, input_pos):
    """token (B, 1) at position input_pos -> next-token logits (B, V) through the caches: the model's
    forward without the host-side token-range check of model.embed (a device sync that would stall every
    eager step)."""
    return model.lm_head(model.backbone(model.token_embedding(token), input_pos))[:, -1]


@functools.cache
def compiled_decode_step():
    """decode_step under torch.compile (gpt-fast's decode_one_token): inductor fuses the elementwise work
    between the GEMMs (gates, norms, residuals, the Updater's interpolation) into a few kernels; the Triton
    decode kernels run as they are between its graphs. Static shapes: a model compiles once per cache size,
    and input_pos must be a device tensor (an int would recompile at every position)."""
    return torch.compile(decode_step, dynamic=False)


class DecodeStep:
    """decode_step (torch.compile'd with compile) on static inputs, gpt-fast style: the token (B, 1) and its
    position (a 0-dim device tensor) live in buffers that each call overwrites, so that every call, the
    warm-up's included, hands the step the same tensors. After capture(), a call replays a CUDA graph of
    the step instead of running it. A compiled step must not recompile after its warm-up (inside a capture
    that breaks the capture): those calls run under dynamo's error_on_recompile."""

    def __init__(self, model, batch_size, compile=False):
        device = model_device(model)
        self.model, self.compile = model, compile
        self.step = compiled_decode_step() if compile else decode_step
        self.token = torch.zeros(batch_size, 1, dtype=torch.long, device=device)  # static inputs
        self.input_pos = torch.zeros((), dtype=torch.long, device=device)
        self.graph = self.logits = None
        self.warmed_up = False

    def run(self):
        if not (self.compile and self.warmed_up):
            return self.step(self.model, self.token, self.input_pos)
        with torch._dynamo.config.patch(error_on_recompile=True):
            return self.step(self.model, self.token, self.input_pos)

    def capture(self):
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.run()

    def __call__(self, token, input_pos):
        self.token.copy_(token)
        self.input_pos.fill_(input_pos)
        if self.graph is None:
            return self.run()
        self.graph.replay()
        return self.logits


@torch.no_grad()
def prefill_and_decode(model, prompt, steps, use_graph, tokens=None, compile=False, cache_len=None):
    """Fresh caches (cache_len tokens, default the prompt, the warm-up and the steps), prefill prompt (B, T)
    (timed), WARMUP_STEPS steps (they compile, with compile), then `steps` timed decode steps (eager or
    compiled, or replays of a CUDA graph of that step captured before the clock starts) fed `tokens`
    (steps, B, 1) or the greedy choice. -> (prefill seconds, decode seconds, logits of the timed steps
    (steps, B, V)). Every step runs on the same static inputs (DecodeStep)."""
    device = prompt.device
    model.setup_caches(prompt.shape[0], cache_len or prompt.shape[1] + WARMUP_STEPS + steps)
    step = DecodeStep(model, prompt.shape[0], compile)
    try:
        sync(device)
        t0 = time.perf_counter()
        for s in range(0, prompt.shape[1], PREFILL_CHUNK):
            logits = model(prompt[:, s : s + PREFILL_CHUNK], input_pos=s)[0][:, -1]
        sync(device)
        t1 = time.perf_counter()
        token = logits.argmax(-1, keepdim=True) if tokens is None else tokens[0]
        position = prompt.shape[1]
        for i in range(WARMUP_STEPS):
            step(token, position + i)
        step.warmed_up = True
        position += WARMUP_STEPS
        if use_graph:
            step.capture()
        sync(device)
        t2 = time.perf_counter()
        out = []
        for i in range(steps):
            logits = step(token, position + i)
            out.append(logits.to(torch.float32, copy=True))
            token = logits.argmax(-1, keepdim=True) if tokens is None else tokens[min(i + 1, steps - 1)]
        sync(device)
        t3 = time.perf_counter()
    finally:
        model.clear_caches()
    return t1 - t0, t3 - t2, torch.stack(out)


def random_prompt(model, batch_size, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch_size, length), generator=g).to(
        model_device(model)
    )


def relative_error(x, reference):
    return ((x - reference).norm() / reference.norm()).item()


CHECK_PROMPT, CHECK_STEPS = 64, 6  # decode_logits: the prompt and the steps that checks compare


def check_cache_len(prompt_len, steps):
    """One cache size for a timed run and the checks before it (a compiled step compiles once per size)."""
    return max(prompt_len, CHECK_PROMPT) + WARMUP_STEPS + max(steps, CHECK_STEPS)


@torch.no_grad()
def decode_logits(model, batch_size, steps=CHECK_STEPS, use_graph=False, compile=False, cache_len=None):
    """The logits of `steps` decode steps fed fixed random tokens after a fixed random CHECK_PROMPT-token
    prompt."""
    prompt = random_prompt(model, batch_size, CHECK_PROMPT, seed=1)
    tokens = random_prompt(model, batch_size, steps, seed=2).T.unsqueeze(-1)  # (steps, B, 1)
    return prefill_and_decode(model, prompt, steps, use_graph, tokens, compile, cache_len)[2]


@torch.no_grad()
def graph_is_safe(model, batch_size, compile=False, cache_len=None, direct=None):
    """Does a replayed CUDA graph of the decode step give what that step gives run directly, on the same
    tokens? direct: decode_logits of the step run directly, when the caller has them already."""
    if model_device(model).type != "cuda":
        return False
    if direct is None:
        direct = decode_logits(model, batch_size, compile=compile, cache_len=cache_len)
    try:
        graphed = decode_logits(model, batch_size, use_graph=True, compile=compile, cache_len=cache_len)
    except RuntimeError as e:
        print(f"  CUDA graph capture failed: {str(e).splitlines()[0]}", flush=True)
        return False
    error = relative_error(graphed, direct)
    if error > 1e-3:
        print(f"  CUDA graph replay differs from direct decoding (rel. error {error:.2e})", flush=True)
    return error <= 1e-3


@torch.no_grad()
def decode_speed(
    model, prompt_len=4096, batch_size=4, new_tokens=128, cuda_graph=True, seed=0, compile=False
):
    """Table 4: prefill a random prompt (batch_size, prompt_len), then greedily generate new_tokens per
    sequence through the cache path (torch.compile'd with compile), replayed from CUDA graphs when
    cuda_graph and graph_is_safe, else run directly. decode_tokens_per_s = batch_size * new_tokens / decode
    seconds; end_to_end_tokens_per_s also counts the prefill. With compile, compiled_rel_error is the
    compiled step's relative logit error against the eager one's on the same tokens (both in the model's
    dtype), and setup_s the seconds before the timed run (the compilation in most of them)."""
    start = time.perf_counter()
    cache_len = check_cache_len(prompt_len, new_tokens)
    # the compiled step's check logits, computed once: the graph check and the error against eager share them
    compiled = decode_logits(model, batch_size, compile=True, cache_len=cache_len) if compile else None
    use_graph = cuda_graph and graph_is_safe(model, batch_size, compile, cache_len, direct=compiled)
    prompt = random_prompt(model, batch_size, prompt_len, seed)
    prefill_and_decode(model, prompt, 4, use_graph, compile=compile, cache_len=cache_len)  # warm-up
    setup_s = time.perf_counter() - start
    prefill_s, decode_s, _ = prefill_and_decode(
        model, prompt, new_tokens, use_graph, compile=compile, cache_len=cache_len
    )
    generated = batch_size * new_tokens
    result = {
        "prompt_len": prompt_len,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "cuda_graph": use_graph,
        "compile": compile,
        "prefill_s": prefill_s,
        "decode_s": decode_s,
        "ms_per_token": 1000.0 * decode_s / new_tokens,
        "decode_tokens_per_s": generated / decode_s,
        "end_to_end_tokens_per_s": generated / (prefill_s + decode_s),
    }
    if compile:
        eager = decode_logits(model, batch_size, cache_len=cache_len)
        result.update(compiled_rel_error=relative_error(compiled, eager), setup_s=setup_s)
    return result


@torch.no_grad()
def decode_latency(model, contexts, batch_size=4, steps=32, cuda_graph=True, seed=0, compile=False):
    """Decode milliseconds per token after each context length: flat for O(1) decoding, growing with the
    context for a KV-cache Transformer (its cache is sized to the context, as in a real deployment)."""
    rows = []
    for context in contexts:
        cache_len = check_cache_len(context, steps)
        use_graph = cuda_graph and graph_is_safe(model, batch_size, compile, cache_len)
        prompt = random_prompt(model, batch_size, context, seed)
        _, decode_s, _ = prefill_and_decode(
            model, prompt, steps, use_graph, compile=compile, cache_len=cache_len
        )
        rows.append({"context": context, "ms_per_token": 1000.0 * decode_s / steps, "cuda_graph": use_graph})
        print(f"  context {context}: {rows[-1]['ms_per_token']:.3f} ms/token", flush=True)
    return rows


def speed_model(variant, size, backend, device, dtype, vocab_size):
    """A random-weight model of a preset, built directly on the device."""
    cfg = NirvanaConfig.from_preset(f"{variant}-{size}", backend=backend, vocab_size=vocab_size)
    torch.manual_seed(0)
    with torch.device(device):
        return Nirvana(cfg).to(dtype=dtype).eval()


def speed_backend(requested, device):
    """The Triton kernels on a GPU when they import, else the PyTorch reference (said on stdout)."""
    if requested != "triton":
        return requested
    if not device.startswith("cuda"):
        print("  the Triton kernels need a GPU; using backend=torch on the CPU", flush=True)
        return "torch"
    try:
        import kernels  # noqa: F401  (the Triton backend's package)
    except ImportError as e:
        print(f"  `import kernels` failed ({e}); using backend=torch", flush=True)
        return "torch"
    return "triton"


def plot_speed(latency_by_model, path, title):
    fig, ax = new_figure(figsize=(6, 4))
    for name, rows in latency_by_model.items():
        ax.plot([r["context"] for r in rows], [r["ms_per_token"] for r in rows], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode time per token (ms)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    save_figure(fig, path)


def plot_extrapolation(results, path):
    fig, ax = new_figure(figsize=(6, 4))
    for name, rows in results.items():
        ax.plot([r["context_length"] for r in rows], [r["ppl"] for r in rows], marker="o", label=name)
    ax.set_xlabel("evaluation context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("Length extrapolation (paper Fig. 7)")
    save_figure(fig, path)


# -----------------------------------------------------------------------------------------------------------
# Commands


def context_list(text):
    """'' -> [] (no latency curve), else comma-separated positive integers."""
    return positive_int_list(text) if text.strip() else []


def preset_size(text):
    if text not in PRESETS:
        raise argparse.ArgumentTypeError(f"expected a preset size from {', '.join(PRESETS)}, got {text!r}")
    return text


def model_name(checkpoint):
    """What a checkpoint's results are named after: its run folder for train.py's <run>/ckpt.pt, else the
    file name without extension."""
    path = os.path.abspath(checkpoint)
    if os.path.basename(path) == "ckpt.pt":
        return os.path.basename(os.path.dirname(path))
    return os.path.splitext(os.path.basename(path))[0]


def data_name(path):
    return os.path.splitext(os.path.basename(os.path.normpath(path)))[0]


def print_written(paths):
    print("wrote " + ", ".join(paths), flush=True)


def plot_window_losses(windows, result, path, title):
    """The mean loss of each window along the data, and the mean over all tokens."""
    fig, ax = new_figure(figsize=(7, 4))
    ax.plot([w[0] for w in windows], [-w[2] / w[1] for w in windows], marker=".", linewidth=1, label="window")
    ax.axhline(result["loss"], color="black", linestyle="--", label=f"all tokens: ppl {result['ppl']:.2f}")
    ax.set_xlabel("token position of the window's first prediction")
    ax.set_ylabel("mean loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title)
    save_figure(fig, path)


def cmd_ppl(args):
    model, tok = load_model(args.checkpoint, args.device, args.dtype, args.tokenizer)
    tokens = read_tokens(args.data, tok, args.split)
    length = args.context_length or model.config.context_length
    what = f"the {args.split} split of " if os.path.isdir(args.data) else ""
    print(
        f"perplexity of {args.checkpoint} on all {len(tokens):,} tokens of {what}{args.data} in windows of "
        f"{length}",
        flush=True,
    )
    windows = list(window_logprobs(model, tokens, length, args.batch_size, show_progress=True))
    result = perplexity_of_windows(windows, length)
    result.update(
        checkpoint=args.checkpoint, data=args.data, split=args.split if os.path.isdir(args.data) else None
    )
    print(
        f"ppl {result['ppl']:.4f}  loss {result['loss']:.4f}  over all {result['tokens']:,} predicted tokens"
    )
    name = args.name or f"{model_name(args.checkpoint)}_{data_name(args.data)}"
    stem = os.path.join(args.out_dir, f"ppl_{name}")
    table = markdown_table(
        ["checkpoint", "data", "predicted tokens", "context", "loss", "ppl"],
        [
            [
                args.checkpoint,
                what + args.data,
                result["tokens"],
                length,
                f"{result['loss']:.4f}",
                f"{result['ppl']:.4f}",
            ]
        ],
    )
    write_text_atomically(stem + ".md", table)
    write_json_atomically(stem + ".json", result)
    plot_window_losses(windows, result, stem + ".png", f"{name}: loss per window of {length} tokens")
    print_written([stem + ".md", stem + ".json", stem + ".png"])


def check_checkpoints(checkpoints, tokenizer):
    """Every checkpoint readable, with its tokenizer, before the first (long) evaluation of any of them."""
    for checkpoint in checkpoints:
        checkpoint_tokenizer(checkpoint, tokenizer)


def cmd_extrapolate(args):
    check_checkpoints(args.checkpoint, args.tokenizer)
    if not os.path.exists(args.data):
        raise UserError(
            f"--data {args.data} does not exist (a text file, a prepare.py folder or one of its .bin shards)"
        )
    results = {}
    for checkpoint in args.checkpoint:
        model, tok = load_model(checkpoint, args.device, args.dtype, args.tokenizer)
        tokens = read_tokens(args.data, tok, args.split)[: args.max_tokens]
        name = f"{model_name(checkpoint)} ({model.config.variant})"
        results[name] = []
        for length in args.lengths:
            print(f"{name}: context {length}", flush=True)
            results[name].append(perplexity(model, tokens, length, args.batch_size, show_progress=True))
            print(f"  ppl {results[name][-1]['ppl']:.4f}", flush=True)
        del model
    header = ["Model"] + [str(length) for length in args.lengths]
    rows = [[name] + [f"{r['ppl']:.3f}" for r in rs] for name, rs in results.items()]
    table = markdown_table(header, rows)
    print(table)
    names = args.name or "+".join(model_name(checkpoint) for checkpoint in args.checkpoint)
    stem = os.path.join(args.out_dir, f"extrapolation_{names}")
    write_text_atomically(stem + ".md", table)
    write_json_atomically(stem + ".json", results)
    plot_extrapolation(results, stem + ".png")
    print_written([stem + ".md", stem + ".json", stem + ".png"])


def cmd_niah(args):
    check_checkpoints(args.checkpoint, args.tokenizer)
    accuracy, all_records, written = {}, [], []
    for checkpoint in args.checkpoint:
        model, tok = load_model(checkpoint, args.device, args.dtype, args.tokenizer)
        name = f"{model_name(checkpoint)} ({model.config.variant})"
        print(f"S-NIAH on {name}", flush=True)
        records = run_niah(
            model, tok, args.tasks, args.depths, args.samples, args.lengths, args.answer_tokens, args.seed
        )
        accuracy[name] = niah_accuracy(records)
        all_records += [dict(r, model=name) for r in records]
        picture = os.path.join(args.out_dir, f"niah_{model_name(checkpoint)}.png")
        plot_niah(records, picture, f"S-NIAH: {name}")
        written.append(picture)
        del model
    table = niah_table(accuracy)
    print(table)
    stem = os.path.join(args.out_dir, f"niah_{args.name or '+'.join(model_name(c) for c in args.checkpoint)}")
    write_text_atomically(stem + ".md", table)
    write_text_atomically(stem + "_predictions.jsonl", "".join(json.dumps(r) + "\n" for r in all_records))
    print_written([stem + ".md", stem + "_predictions.jsonl"] + written)


def cmd_lambada(args):
    examples = read_lambada(args.data)[: args.limit]
    model, tok = load_model(args.checkpoint, args.device, args.dtype, args.tokenizer)
    print(f"LAMBADA: {len(examples)} examples from {args.data}", flush=True)
    result = lambada(model, tok, examples, args.max_length or model.config.context_length, args.batch_size)
    result.update(checkpoint=args.checkpoint, data=args.data)
    print(f"LAMBADA acc {result['acc']:.2f}%  ppl {result['ppl']:.3f}")
    stem = os.path.join(args.out_dir, f"lambada_{args.name or model_name(args.checkpoint)}")
    write_text_atomically(
        stem + ".md",
        markdown_table(
            ["checkpoint", "examples", "acc (%)", "ppl"],
            [[args.checkpoint, result["examples"], f"{result['acc']:.2f}", f"{result['ppl']:.3f}"]],
        ),
    )
    write_json_atomically(stem + ".json", result)
    print_written([stem + ".md", stem + ".json"])


def harness_task_names(text):
    """--tasks: lm-eval task names; 'local' (harness_tasks.LOCAL_TASKS) and 'paper' (PAPER_TASKS) expand."""
    from harness_tasks import LOCAL_TASKS, PAPER_TASKS

    names = []
    for name in comma_separated(text):
        for task in {"local": LOCAL_TASKS, "paper": PAPER_TASKS}.get(name, [name]):
            if task not in names:
                names.append(task)
    if not names:
        raise argparse.ArgumentTypeError(f"expected comma-separated lm-eval task names, got {text!r}")
    return names


@contextlib.contextmanager
def nltk_downloads_off():
    """lm_eval's RULER module asks nltk to download its sentence splitter (punkt_tab) when it is imported;
    only the essay haystacks use it (niah_single_1 repeats a noise sentence), and nothing here downloads.
    (lm_eval then prints "Downloaded punkt_tab on rank 0" all the same.)"""
    import nltk

    download = nltk.download
    nltk.download = lambda *args, **kwargs: False
    try:
        yield
    finally:
        nltk.download = download


def harness_results_table(results):
    """lm-eval's results {task: {"metric,filter": value}} -> rows (task, metric, value), without the
    standard errors and RULER's -1 for lengths it did not run."""
    rows = []
    for task, metrics in results.items():
        for key, value in metrics.items():
            metric, _, _ = key.partition(",")
            numeric = isinstance(value, (int, float)) and value != -1
            if "," in key and not metric.endswith("_stderr") and numeric:
                rows.append((task, metric, value))
    return rows


def cmd_harness(args):
    from harness_tasks import LOCAL_TASKS, write_tasks

    if set(args.tasks) <= set(LOCAL_TASKS):  # nothing to fetch: keep datasets and the hub off the network
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError(
            "the harness command needs lm-evaluation-harness: pip install -r requirements-eval.txt"
        ) from None
    from nirvana_hf import save_tokenizer

    lm_class = register_lm_eval()
    model, tok = load_model(args.checkpoint, args.device, args.dtype, args.tokenizer)
    tasks_dir = os.path.join(args.out_dir, "tasks")
    write_tasks(tasks_dir)
    metadata, max_length = {}, args.max_length or model.config.context_length
    if "niah_single_1" in args.tasks:
        # RULER sizes its haystacks with a tokenizer transformers loads: the model's own, saved with the tasks
        tokenizer_dir = os.path.abspath(os.path.join(tasks_dir, "tokenizer"))
        save_tokenizer(tok.spec, tokenizer_dir)
        metadata = {"tokenizer": tokenizer_dir, "max_seq_lengths": args.niah_lengths}
        max_length = args.max_length or max(max_length, *args.niah_lengths)  # no prompt cut short
        with nltk_downloads_off():
            import lm_eval.tasks.ruler.prepare_niah  # its import builds RULER's 6M-key word list
    lm = lm_class(model, tok, args.batch_size, max_length)
    task_manager = TaskManager(include_path=tasks_dir, metadata=metadata)
    unknown = [task for task in args.tasks if task not in task_manager.all_tasks]
    if unknown:
        raise UserError(
            f"unknown lm-eval task(s) {unknown}: use 'local', 'paper' or names lm_eval lists "
            f"(`lm_eval ls tasks`)"
        )
    results = lm_eval.simple_evaluate(
        model=lm, tasks=args.tasks, num_fewshot=args.num_fewshot, limit=args.limit, task_manager=task_manager
    )
    rows = harness_results_table(results["results"])
    table = markdown_table(["task", "metric", "value"], [(t, m, f"{v:.4f}") for t, m, v in rows])
    print(table)
    stem = os.path.join(args.out_dir, f"harness_{args.name or model_name(args.checkpoint)}")
    write_text_atomically(stem + ".md", table)
    write_json_atomically(stem + ".json", json.loads(json.dumps(results["results"], default=str)))
    print_written([stem + ".md", stem + ".json"])
    return rows


def cmd_export(args):
    from nirvana_hf.folder import export_checkpoint

    folder = export_checkpoint(args.checkpoint, args.out, args.tokenizer)
    print(f"wrote {folder}: {', '.join(sorted(os.listdir(folder)))}")
    print(
        f"load it with nirvana_hf.load_pretrained({folder!r}) or transformers' "
        f"AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True)"
    )


def cmd_gates(args):
    model, tok = load_model(args.checkpoint, args.device, args.dtype, args.tokenizer)
    if args.text_file:
        with open(args.text_file, encoding="utf-8", errors="replace") as f:
            text = f.read()
    else:
        text = args.text
    ids = tok.encode(text)[: args.max_tokens]
    if not ids:
        raise UserError("the text encodes to no tokens: give a non-empty --text or --text-file")
    t, p_norm = gate_maps(model, ids)
    first_layer = model.config.n_prelude
    name = args.name or model_name(args.checkpoint)
    stem = os.path.join(args.out_dir, f"gates_{name}")
    plot_gates(
        t,
        p_norm,
        token_labels(tok, ids),
        first_layer,
        stem + ".png",
        f"Updater gate t and Trigger |p|: {name}",
    )
    arrays = {"t": t, "token_ids": np.array(ids)} | ({"p_norm": p_norm} if p_norm is not None else {})
    write_atomically(stem + ".npz", lambda tmp: save_npz(tmp, arrays))
    print(f"t per layer (mean over tokens): {np.round(t.mean(axis=1), 3).tolist()}")
    if p_norm is not None:
        print(f"|p| per layer (mean over tokens): {np.round(p_norm.mean(axis=1), 3).tolist()}")
    print_written([stem + ".png", stem + ".npz"])


def cmd_speed(args):
    device = args.device or default_device()
    dtype = parse_dtype(args.dtype, device)
    backend = speed_backend(args.backend, device)
    table_rows, latency, results = [], {}, {}
    for variant in args.variants:
        compiled = ", torch.compile" if args.compile else ""
        print(f"{variant}-{args.size} ({backend}, {dtype}, {device}{compiled})", flush=True)
        torch._dynamo.reset()  # each variant compiles afresh, within the recompile limit
        model = speed_model(variant, args.size, backend, device, dtype, args.vocab_size)
        result = decode_speed(
            model, args.prompt_len, args.batch_size, args.new_tokens, not args.eager, compile=args.compile
        )
        result.update(variant=variant, params=model.num_params(), backend=backend)
        results[variant] = result
        print(
            f"  {result['decode_tokens_per_s']:.1f} generated tokens/s (decode), "
            f"{result['end_to_end_tokens_per_s']:.1f} with prefill, cuda_graph={result['cuda_graph']}",
            flush=True,
        )
        if args.contexts:
            latency[variant] = decode_latency(
                model,
                args.contexts,
                args.batch_size,
                args.latency_steps,
                not args.eager,
                compile=args.compile,
            )
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = results.get("transformer")
    for variant, r in results.items():
        ratio = f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f}x" if base else "-"
        table_rows.append(
            [
                variant,
                f"{r['params'] / 1e6:.0f}M",
                f"{r['decode_tokens_per_s']:.1f}",
                f"{r['end_to_end_tokens_per_s']:.1f}",
                f"{r['ms_per_token']:.2f}",
                ratio,
                str(r["cuda_graph"]),
            ]
        )
    table = markdown_table(
        [
            "Model",
            "params",
            "decode tokens/s",
            "end-to-end tokens/s",
            "ms/step",
            "vs transformer",
            "CUDA graph",
        ],
        table_rows,
    )
    print(
        f"prompt {args.prompt_len}, batch {args.batch_size}, {args.new_tokens} new tokens, "
        f"{torch.cuda.get_device_name() if device.startswith('cuda') else device}"
        f"{', decode step under torch.compile' if args.compile else ''}\n{table}"
    )
    stem = os.path.join(args.out_dir, f"speed_{args.name or args.size}")
    write_text_atomically(stem + ".md", table)
    write_json_atomically(stem + ".json", {"speed": results, "latency": latency})
    written = [stem + ".md", stem + ".json"]
    if latency:
        plot_speed(latency, stem + "_latency.png", f"decode time per token, batch {args.batch_size}")
        written.append(stem + "_latency.png")
    print_written(written)


def add_model_args(p, many=False):
    p.add_argument(
        "--checkpoint",
        required=True,
        nargs="+" if many else None,
        type=existing_file,
        help="train.py checkpoint(s), e.g. out/nirvana-tiny/ckpt.pt",
    )
    p.add_argument("--tokenizer", default=None, help="tokenizer spec overriding the checkpoint's")
    add_output_args(p)


def add_output_args(p):
    p.add_argument("--device", default=None, type=torch_device, help="default: cuda if available, else cpu")
    p.add_argument("--dtype", default=None, choices=DTYPES, help="default: bfloat16 on cuda, else float32")
    p.add_argument("--out-dir", default="eval_out")
    p.add_argument(
        "--name",
        default=None,
        help="name of the output files (default: the checkpoint's run folder, e.g. nirvana-tiny)",
    )


def build_parser():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ppl", help="perplexity of a text file or token shard")
    add_model_args(p)
    p.add_argument("--data", required=True, help="text file, prepare.py folder, or one of its .bin shards")
    p.add_argument("--split", default="val", choices=["train", "val"], help="split of a prepare.py folder")
    p.add_argument(
        "--context-length", type=positive_int, default=None, help="default: the model's context_length"
    )
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.set_defaults(run=cmd_ppl)

    p = sub.add_parser("extrapolate", help="perplexity vs evaluation context length (Fig. 7)")
    add_model_args(p, many=True)
    p.add_argument("--data", required=True, help="text file, prepare.py folder, or one of its .bin shards")
    p.add_argument("--split", default="val", choices=["train", "val"], help="split of a prepare.py folder")
    p.add_argument("--lengths", type=positive_int_list, default=[4096, 8192, 12288, 16384, 20480])
    p.add_argument(
        "--max-tokens", type=positive_int, default=None, help="use only the first N tokens of --data"
    )
    p.add_argument("--batch-size", type=positive_int, default=1)
    p.set_defaults(run=cmd_extrapolate)

    p = sub.add_parser("niah", help="S-NIAH-PK/N/W accuracy (Table 3)")
    add_model_args(p, many=True)
    p.add_argument(
        "--tasks", type=names_from(NIAH_TASKS, "S-NIAH tasks"), default=list(NIAH_TASKS), help="pk,n,w"
    )
    p.add_argument(
        "--lengths", type=positive_int_list, default=None, help="default: the paper's lengths per task"
    )
    p.add_argument("--depths", type=unit_interval_list, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=positive_int, default=10, help="samples per (task, length, depth)")
    p.add_argument(
        "--answer-tokens", type=positive_int, default=32, help="greedy tokens generated per answer"
    )
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.set_defaults(run=cmd_niah)

    p = sub.add_parser("lambada", help="LAMBADA last-word accuracy and perplexity from a .jsonl")
    add_model_args(p)
    p.add_argument(
        "--data",
        required=True,
        type=existing_file,
        help=".jsonl with a 'text' field per line (lambada_openai)",
    )
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--max-length", type=positive_int, default=None)
    p.add_argument("--limit", type=positive_int, default=None)
    p.set_defaults(run=cmd_lambada)

    p = sub.add_parser("harness", help="lm-evaluation-harness tasks, by default the local ones (lm_eval)")
    add_model_args(p)
    p.add_argument(
        "--tasks",
        type=harness_task_names,
        default=harness_task_names("local"),
        help="comma-separated lm-eval task names; 'local' (the default: the corpus tasks of "
        "harness_tasks.py and RULER's niah_single_1, all offline) and 'paper' (Table 2: "
        "wikitext, lambada_openai, piqa, hellaswag, winogrande, arc_easy, arc_challenge, "
        "social_iqa, boolq; lm_eval fetches their data from the hub) expand to their lists",
    )
    p.add_argument(
        "--niah-lengths",
        type=positive_int_list,
        default=[4096],
        help="niah_single_1's prompt lengths in tokens, answer included (default: RULER's 4096)",
    )
    p.add_argument("--num-fewshot", type=non_negative_int, default=None)
    p.add_argument("--limit", type=positive_int, default=None, help="documents per task (default: all)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help="tokens per scored window and generation prompt (default: the model's "
        "context_length, or the longest --niah-lengths if longer)",
    )
    p.set_defaults(run=cmd_harness)

    p = sub.add_parser("export", help="a train.py checkpoint -> model.safetensors + config.json + code")
    p.add_argument("--checkpoint", required=True, type=existing_file, help="train.py checkpoint (ckpt.pt)")
    p.add_argument("--out", required=True, help="folder to write (transformers loads it: trust_remote_code)")
    p.add_argument("--tokenizer", default=None, help="tokenizer spec overriding the checkpoint's")
    p.set_defaults(run=cmd_export)

    p = sub.add_parser("gates", help="heatmap of the gate t and the Trigger's |p| over layers and tokens")
    add_model_args(p)
    text = p.add_mutually_exclusive_group(required=True)
    text.add_argument("--text")
    text.add_argument("--text-file", type=existing_file)
    p.add_argument("--max-tokens", type=positive_int, default=512)
    p.set_defaults(run=cmd_gates)

    p = sub.add_parser("speed", help="generated tokens/s (Table 4) and decode ms/token vs context")
    p.add_argument(
        "--variants",
        type=names_from(VARIANTS, "variants"),
        default=["nirvana", "nirvana-notrigger", "gated-deltanet", "transformer"],
    )
    p.add_argument(
        "--size",
        type=preset_size,
        default="350m",
        help="preset size: tiny, 125m, 350m, 1.3b (random weights)",
    )
    p.add_argument("--backend", default="triton", choices=["triton", "torch"])
    p.add_argument("--vocab-size", type=positive_int, default=32000)
    p.add_argument("--prompt-len", type=positive_int, default=4096)
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument(
        "--contexts",
        type=context_list,
        default=[1024, 2048, 4096, 8192, 16384],
        help="context lengths for the ms/token curve ('' to skip)",
    )
    p.add_argument("--latency-steps", type=positive_int, default=32)
    p.add_argument("--eager", action="store_true", help="time eager decoding, not CUDA-graph replays")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the decode step (fuses its elementwise work; compiles once per model and context)",
    )
    add_output_args(p)
    p.set_defaults(run=cmd_speed)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    run_main(main)

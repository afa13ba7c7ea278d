"""The paper's language claims at small scale, on real text: every variant trained on the same tokens, then
measured side by side. Resumable run by run: re-run the same command until it prints "all done".

    python experiments/real_text.py --out data/real_text                      # the corpus (see its set-up)
    python experiments/small_scale.py --data data/real_text --time-budget 540  # ~45M-parameter models, GPU
    python experiments/small_scale.py --data data/real_text --gpus 0,1,2,3,4,5,6,7 --time-budget 540
    python experiments/small_scale.py --data data/tiny --size tiny             # the whole pipeline, CPU

Runs (RUNS): nirvana and nirvana-notrigger with two seeds each, nirvana-rope, gated-deltanet, hybrid and
transformer with one, and two ablations of nirvana: eta_ref 1.0 (the model's default is 0.1) and the Trigger's
inner gradient detached. The seed sets the initial weights only: every run reads the same token stream in the
same order. A run's checkpoint lives in <runs>/<run>/ (train.py's ckpt.pt, log.csv); training goes in chunks
of steps (train.py --stop-step, then --resume), so --time-budget can stop between chunks and the next call
continues. A run's record lives beside the report, in <results>/runs/<run>/: train_done.json (steps, tokens,
seconds, seed, parameters, tokens/s, device) and a copy of log.csv once it is trained, then
measure/<name>.json for each measurement, written once and skipped after. The report is built from the
records alone, and they are small: committed with the results, they let a fresh checkout (on a fresh machine,
without the checkpoints) continue with the runs not yet recorded.

Measurements (MEASUREMENTS), all on documents no run trained on:
    ppl        perplexity of each domain's held-out documents and of the held-out Wikipedia articles (Table 5)
    context    perplexity at 1x, 2x, 4x the training context and loss against position up to 4x (Fig. 7)
    niah       S-NIAH pk / n / w accuracy at 1x, 2x, 4x the training context (Tables 3, 6)
    trigger    the Updater's gate t per domain; the Trigger's p: its distance from its start (all-ones), its
               spread between domains and between documents, and a nearest-centroid probe of a document's
               mean p (and mean t) for its domain, leave-one-out, against chance
Training tokens/s come from train.py's log. The report (results.md, results.json and PNGs under --results)
is rewritten from whatever exists at the end of every call.

With --gpus, each listed GPU takes a share of the pending runs in a worker process of its own (log in
<runs>/worker_<gpu>.log); the report is written when all have stopped.
"""

import argparse
import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_text import HELD_OUT, load_eval_set

import eval as evaluation
import train
from cli import UserError, non_negative_float, run_main, write_json_atomically, write_text_atomically


@dataclasses.dataclass(frozen=True)
class Size:
    """A model size and everything its runs and measurements need."""

    preset_size: str  # nirvana.py preset the overrides apply to
    overrides: dict  # NirvanaConfig fields (train.py --set)
    backend: str  # "triton" on a GPU, "torch" on the CPU
    micro_batch: int
    global_batch_tokens: int
    train_steps: int  # tokens seen = train_steps * global_batch_tokens
    warmup_tokens: int
    lr: float
    eval_every: int  # train.py's in-run validation
    eval_tokens: int
    save_every: int
    first_chunk_steps: int  # steps of the first training chunk; later chunks aim at chunk_seconds
    chunk_seconds: float
    ppl_tokens: int  # held-out tokens scored per domain
    context_windows: int  # windows of 4x the context for the position curve
    niah_depths: tuple
    niah_samples: int
    niah_answer_tokens: int
    probe_docs: int  # documents per domain for the Trigger and gate statistics

    @property
    def context(self):
        return self.overrides["context_length"]


SIZES = {
    # ~45M parameters with a 16k vocabulary (nirvana 46.8M ... transformer 42.5M): 763 steps of 128k tokens
    "small": Size(
        "125m",
        dict(d_model=512, n_layers=8, n_heads=8, window=512, context_length=1024),
        "triton",
        micro_batch=32,
        global_batch_tokens=131072,
        train_steps=763,
        warmup_tokens=4_194_304,
        lr=1e-3,
        eval_every=100,
        eval_tokens=65_536,
        save_every=50,
        first_chunk_steps=20,
        chunk_seconds=150,
        ppl_tokens=262_144,
        context_windows=32,
        niah_depths=(0.0, 0.25, 0.5, 0.75, 1.0),
        niah_samples=2,
        niah_answer_tokens=12,
        probe_docs=64,
    ),
    # the whole pipeline on the CPU in about a minute: a model of a few ten thousand parameters
    "tiny": Size(
        "tiny",
        dict(
            d_model=32,
            n_layers=3,
            n_prelude=1,
            n_heads=2,
            window=32,
            context_length=384,
            lowrank=4,
            trigger_dim=8,
            bank_size=4,
        ),
        "torch",
        micro_batch=1,
        global_batch_tokens=384,
        train_steps=4,
        warmup_tokens=384,
        lr=3e-3,
        eval_every=4,
        eval_tokens=384,
        save_every=2,
        first_chunk_steps=2,
        chunk_seconds=60,
        ppl_tokens=768,
        context_windows=1,
        niah_depths=(0.5,),
        niah_samples=1,
        niah_answer_tokens=4,
        probe_docs=3,
    ),
}


@dataclasses.dataclass(frozen=True)
class Run:
    name: str
    variant: str
    seed: int
    overrides: tuple = ()  # ((field, value), ...) on top of the size's
    note: str = ""


# In the order they are trained: every variant once, then the second seeds, then the ablations, so that a
# call cut short leaves the widest comparison.
RUNS = [
    Run("nirvana-s1", "nirvana", 1),
    Run("nirvana-notrigger-s1", "nirvana-notrigger", 1),
    Run("transformer-s1", "transformer", 1),
    Run("gated-deltanet-s1", "gated-deltanet", 1),
    Run("nirvana-rope-s1", "nirvana-rope", 1),
    Run("hybrid-s1", "hybrid", 1),
    Run("nirvana-s2", "nirvana", 2),
    Run("nirvana-notrigger-s2", "nirvana-notrigger", 2),
    Run("nirvana-eta1-s1", "nirvana", 1, (("eta_ref", 1.0),), "eta_ref 1.0"),
    Run("nirvana-detach-s1", "nirvana", 1, (("detach_inner_grad", True),), "inner gradient detached"),
]
MEASUREMENTS = ("ppl", "context", "niah", "trigger")
FIRST_CHUNK_SECONDS = 60  # what a call's first chunk or a measurement is assumed to take before one was timed
# left over after a chunk sized to the budget: train.py's start-up and its checkpoint
CHUNK_MARGIN_SECONDS = 15


# ----------------------------------------------------------------------------- paths and small files


def read_json(path):
    with open(path) as f:
        return json.load(f)


class Clock:
    """The call's time budget: work starts only when its estimated length still fits. runs_persist: the
    runs folder outlives the call, so a run may begin even when it cannot finish within the budget."""

    def __init__(self, budget, runs_persist=False):
        self.budget, self.start, self.runs_persist = budget, time.time(), runs_persist

    def left(self):
        return math.inf if not self.budget else self.budget - (time.time() - self.start)

    def fits(self, seconds):
        return seconds <= self.left()


def data_paths(data):
    tokens = os.path.join(data, "tokens")
    if not os.path.isfile(os.path.join(tokens, "meta.json")):
        raise UserError(
            f"{data} holds no tokens/meta.json: build it with `python experiments/real_text.py --out {data}`"
        )
    eval_dir = os.path.join(tokens, "eval")
    domains = sorted(Path(p).stem for p in Path(eval_dir).glob("*.npz")) if os.path.isdir(eval_dir) else []
    if not domains:
        raise UserError(f"{eval_dir} holds no held-out sets (<domain>.npz): rebuild {data} with real_text.py")
    return os.path.abspath(tokens), {d: os.path.join(eval_dir, d + ".npz") for d in domains}


def corpus_fingerprint(tokens_dir):
    """The first 16 hex digits of a SHA-256 over the tokenizer, the token files and the held-out sets: the same
    set-up command gives another corpus when a Debian mirror ships other package versions, and runs trained on
    different corpora must not share a table."""
    digest = hashlib.sha256()
    for path in sorted(Path(tokens_dir).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(tokens_dir)).encode())
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def check_same_corpus(records, corpus):
    """Refuses to add runs on this corpus to records of runs trained on another one."""
    others = sorted(
        path.parent.name
        for path in Path(records).glob("*/train_done.json")
        if read_json(path).get("corpus") != corpus
    )
    if others:
        raise UserError(
            f"{records} holds run(s) {others} trained on another corpus than this one ({corpus}): "
            "give --results a new folder, or delete those records to retrain them"
        )


# ----------------------------------------------------------------------------- training


def train_args(run, size, tokens_dir, run_dir, device):
    args = [
        "--preset",
        f"{run.variant}-{size.preset_size}",
        "--backend",
        size.backend,
        "--data",
        tokens_dir,
        "--out",
        run_dir,
        "--seed",
        str(run.seed),
        "--micro-batch",
        str(size.micro_batch),
        "--seq-len",
        str(size.context),
        "--global-batch-tokens",
        str(size.global_batch_tokens),
        "--max-tokens",
        str(size.train_steps * size.global_batch_tokens),
        "--warmup-tokens",
        str(size.warmup_tokens),
        "--lr",
        str(size.lr),
        "--eval-every",
        str(size.eval_every),
        "--eval-tokens",
        str(size.eval_tokens),
        "--save-every",
        str(size.save_every),
        "--device",
        device,
    ]
    for field, value in list(size.overrides.items()) + list(run.overrides):
        args += ["--set", f"{field}={value}"]
    return args


def checkpoint_step(path):
    if not os.path.isfile(path):
        return 0
    return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])


def whole_run_seconds(run, size, records):
    """What training run from scratch plus its measurements should take, judged by the finished runs'
    records (those of the same variant if any); None before any run has finished."""
    per_step = {}
    for path in Path(records).glob("*/train_done.json"):
        done = read_json(path)
        per_step.setdefault(done.get("variant"), []).append(done["seconds"] / done["steps"])
    if not per_step:
        return None
    rates = per_step.get(run.variant) or [r for rates in per_step.values() for r in rates]
    return float(np.mean(rates)) * size.train_steps + sum(measured_seconds(records).values())


def train_run(run, size, tokens_dir, run_dir, record_dir, device, clock, corpus):
    """Trains run up to size.train_steps in chunks; -> True when finished, False when the budget ran out.
    A finished run's train_done.json and log.csv go to its record folder."""
    done_path = os.path.join(record_dir, "train_done.json")
    if os.path.isfile(done_path):
        return True
    checkpoint, progress_path = os.path.join(run_dir, "ckpt.pt"), os.path.join(run_dir, "train_seconds.json")
    step, chunk_steps, seconds_per_step = checkpoint_step(checkpoint), size.first_chunk_steps, None
    seconds = read_json(progress_path)["seconds"] if step and os.path.isfile(progress_path) else 0.0
    if step == 0:
        whole_run = whole_run_seconds(run, size, os.path.dirname(record_dir))
        if whole_run is not None and not clock.runs_persist and not clock.fits(whole_run):
            return False  # a run begun now would be cut, and its checkpoint may not outlive the machine
    while step < size.train_steps:
        if seconds_per_step is not None:
            # chunks of chunk_seconds, the last one shrunk to what the budget has left
            chunk_steps = int(min(size.chunk_seconds, clock.left() - CHUNK_MARGIN_SECONDS) / seconds_per_step)
            if chunk_steps < 1:
                return False
        estimate = FIRST_CHUNK_SECONDS if seconds_per_step is None else chunk_steps * seconds_per_step
        target = min(size.train_steps, step + chunk_steps)
        if not clock.fits(estimate):
            return False
        print(f"[{run.name}] training steps {step} -> {target} of {size.train_steps}", flush=True)
        started = time.time()
        argv = train_args(run, size, tokens_dir, run_dir, device) + ["--stop-step", str(target)]
        train.main(argv + (["--resume"] if step > 0 else []))
        seconds_per_step = (time.time() - started) / (target - step)
        seconds += time.time() - started
        step = checkpoint_step(checkpoint)
        if step != target:
            raise RuntimeError(f"[{run.name}] train.py stopped at step {step}, expected {target}")
        write_json_atomically(progress_path, {"step": step, "seconds": seconds})
    with open(os.path.join(run_dir, "log.csv")) as f:
        write_text_atomically(os.path.join(record_dir, "log.csv"), f.read())
    rows = train.Log.read(os.path.join(record_dir, "log.csv"))
    speeds = [r["tokens_per_s"] for r in rows if r.get("tokens_per_s")]
    params = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)["model"]
    write_json_atomically(
        done_path,
        {
            "steps": step,
            "tokens": step * size.global_batch_tokens,
            "seconds": seconds,
            "seed": run.seed,
            "variant": run.variant,
            "params": int(sum(v.numel() for v in params.values())),
            "tokens_per_s": float(np.median(speeds)) if speeds else None,
            "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
            "backend": size.backend,
            "corpus": corpus,
        },
    )
    return True


# ----------------------------------------------------------------------------- measurements


def measure_ppl(model, tok, size, eval_sets):
    out = {}
    for domain, path in eval_sets.items():
        tokens, _ = load_eval_set(path)
        out[domain] = evaluation.perplexity(model, tokens[: size.ppl_tokens + 1], size.context, batch_size=8)
    return out


@torch.no_grad()
def measure_context(model, tok, size, eval_sets):
    """ppl at 1x, 2x, 4x the context on the same stream, and the mean loss per position over windows of 4x."""
    name = HELD_OUT if HELD_OUT in eval_sets else min(eval_sets)
    stream, _ = load_eval_set(eval_sets[name])
    length = 4 * size.context
    windows = max(1, min(size.context_windows, (len(stream) - 1) // length))
    stream = stream[: windows * length + 1]
    if len(stream) < length + 1:
        raise UserError(f"the held-out set {name} has {len(stream)} tokens: fewer than 4x the context + 1")
    by_length = {
        f"{k}x": evaluation.perplexity(model, stream, k * size.context, batch_size=4) for k in (1, 2, 4)
    }
    device = evaluation.model_device(model)
    losses = []
    for w in range(windows):
        window = torch.as_tensor(stream[w * length : (w + 1) * length + 1], device=device)[None]
        logprob, _ = evaluation.score_tokens(model, window[:, :-1], window[:, 1:])
        losses.append(-logprob[0].double().cpu().numpy())
    bucket = max(1, size.context // 8)
    curve = np.mean(losses, axis=0).reshape(-1, bucket).mean(axis=1)
    return {
        "stream": name,
        "tokens": int(windows * length),
        "by_length": by_length,
        "position_bucket": bucket,
        "loss_by_position": curve.tolist(),
    }


def measure_niah(model, tok, size, eval_sets):
    lengths = [k * size.context for k in (1, 2, 4)]
    records = evaluation.run_niah(
        model,
        tok,
        ["pk", "n", "w"],
        list(size.niah_depths),
        size.niah_samples,
        lengths,
        size.niah_answer_tokens,
        seed=0,
    )
    accuracy = evaluation.niah_accuracy(records)
    return {
        "accuracy": {f"{task}@{length}": value for (task, length), value in accuracy.items()},
        "samples_per_cell": len(size.niah_depths) * size.niah_samples,
        "records": records,
    }


def nearest_centroid_accuracy(features, labels):
    """Leave-one-out nearest-centroid classification (z-scored features) -> (balanced accuracy, chance)."""
    x = np.asarray(features, dtype=np.float64)
    x = (x - x.mean(0)) / (x.std(0) + 1e-12)
    labels = np.asarray(labels)
    classes = sorted(set(labels))
    sums = {c: x[labels == c].sum(0) for c in classes}
    counts = {c: int((labels == c).sum()) for c in classes}
    recalls = {c: [] for c in classes}
    for i, label in enumerate(labels):
        best, best_distance = None, math.inf
        for c in classes:
            n = counts[c] - (c == label)
            if n == 0:
                continue
            centroid = (sums[c] - (x[i] if c == label else 0)) / n
            distance = float(((x[i] - centroid) ** 2).sum())
            if distance < best_distance:
                best, best_distance = c, distance
        recalls[label].append(best == label)
    return float(np.mean([np.mean(r) for r in recalls.values()])), 1.0 / len(classes)


def spread(features, labels):
    """RMS distance of the domain centroids from their mean, and of documents from their domain's centroid."""
    x, labels = np.asarray(features, dtype=np.float64), np.asarray(labels)
    centroids = {c: x[labels == c].mean(0) for c in sorted(set(labels))}
    grand = np.mean(list(centroids.values()), axis=0)
    between = math.sqrt(np.mean([((m - grand) ** 2).mean() for m in centroids.values()]))
    within = math.sqrt(np.mean([((x[i] - centroids[c]) ** 2).mean() for i, c in enumerate(labels)]))
    return between, within


@torch.no_grad()
def measure_trigger(model, tok, size, eval_sets):
    """Gate t and Trigger p on the first context of up to size.probe_docs held-out documents per domain."""
    device = evaluation.model_device(model)
    t_docs, p_docs, labels, p_distance, p_token_std = [], [], [], [], []
    for domain, path in eval_sets.items():
        _, documents = load_eval_set(path)
        documents = [d for d in documents if len(d) >= 16][: size.probe_docs]
        for doc in documents:
            idx = torch.as_tensor(doc[: size.context], device=device)[None]
            _, _, trace = model(idx, return_trace=True)
            if not trace.get("gate"):
                return None  # a variant without the Updater
            t_docs.append([g[0].float().mean().item() for g in trace["gate"]])  # (layers,)
            if trace.get("p"):
                p = torch.stack([x[0].float() for x in trace["p"]])  # (layers, T, K)
                p_docs.append(p.mean(1).flatten().cpu().numpy())
                # RMS |p - 1| per layer
                p_distance.append((p - 1).pow(2).mean(-1).sqrt().mean(1).cpu().numpy())
                p_token_std.append(p.std(1).mean().item())
            labels.append(domain)
    t_docs = np.asarray(t_docs)
    out = {
        "docs": len(labels),
        "domains": sorted(set(labels)),
        "labels": labels,
        "t_by_domain": {d: float(t_docs[np.asarray(labels) == d].mean()) for d in sorted(set(labels))},
        "t_by_layer": t_docs.mean(0).tolist(),
    }
    out["t_probe"], out["chance"] = nearest_centroid_accuracy(t_docs, labels)
    if p_docs:
        out["p_distance_by_layer"] = np.mean(p_distance, axis=0).tolist()
        out["p_distance"] = float(np.mean(p_distance))
        out["p_between_domains"], out["p_between_documents"] = spread(p_docs, labels)
        out["p_within_document"] = float(np.mean(p_token_std))
        out["p_probe"], _ = nearest_centroid_accuracy(p_docs, labels)
        out["p_doc_means_2d"] = pca_2d(np.asarray(p_docs)).tolist()
    return out


def pca_2d(x):
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T if vt.shape[0] >= 2 else np.concatenate([x @ vt.T, np.zeros((len(x), 1))], 1)


MEASURE = {"ppl": measure_ppl, "context": measure_context, "niah": measure_niah, "trigger": measure_trigger}


def measured_seconds(records):
    """{measurement: the longest time it took any run so far}: the estimate for the next one."""
    seconds = {}
    for path in Path(records).glob("*/measure/*.json"):
        seconds[path.stem] = max(seconds.get(path.stem, 0.0), read_json(path)["seconds"])
    return seconds


def measure_run(run, size, run_dir, record_dir, eval_sets, device, clock):
    """Each missing measurement of a finished run, into its record folder, while the budget allows; -> True
    when all exist."""
    todo = [m for m in MEASUREMENTS if not os.path.isfile(os.path.join(record_dir, "measure", m + ".json"))]
    if not todo:
        return True
    estimates = measured_seconds(os.path.dirname(record_dir))
    model, tok = evaluation.load_model(os.path.join(run_dir, "ckpt.pt"), device)
    for name in todo:
        if not clock.fits(estimates.get(name, FIRST_CHUNK_SECONDS)):
            return False
        print(f"[{run.name}] measuring {name} ...", flush=True)
        started = time.time()
        result = MEASURE[name](model, tok, size, eval_sets)
        write_json_atomically(
            os.path.join(record_dir, "measure", name + ".json"),
            {"result": result, "seconds": time.time() - started},
        )
    return True


# ----------------------------------------------------------------------------- the report


def run_results(records):
    """{run name: {"train": ..., measurement: result}} of whatever the records hold."""
    results = {}
    for run in RUNS:
        run_dir = os.path.join(records, run.name)
        entry = {}
        if os.path.isfile(os.path.join(run_dir, "train_done.json")):
            entry["train"] = read_json(os.path.join(run_dir, "train_done.json"))
        for name in MEASUREMENTS:
            path = os.path.join(run_dir, "measure", name + ".json")
            if os.path.isfile(path):
                entry[name] = read_json(path)["result"]
        if os.path.isfile(os.path.join(run_dir, "log.csv")):
            entry["log"] = [
                {"tokens": r["tokens"], "loss": r["loss"], "val_loss": r.get("val_loss")}
                for r in train.Log.read(os.path.join(run_dir, "log.csv"))
            ]
        results[run.name] = entry
    return results


def table(header, rows):
    return evaluation.markdown_table(header, rows)


def number(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}"


def variant_label(run):
    """The run's variant, and its ablation where it has one: "nirvana (eta_ref 1.0)"."""
    return run.variant + (f" ({run.note})" if run.note else "")


def run_label(run, entry):
    """The first columns of every table: run, variant (and ablation), seed, tokens seen."""
    variant = variant_label(run)
    tokens = entry.get("train", {}).get("tokens")
    shown = "-" if tokens is None else f"{tokens / 1e6:.1f}M" if tokens >= 1e6 else f"{tokens:,}"
    return [run.name, variant, str(run.seed), shown]


LABEL = ["run", "variant", "seed", "tokens"]


def geometric_mean_ppl(ppl, domains):
    """Geometric mean of the perplexities of `domains` in a run's ppl record; None until all are measured."""
    values = [ppl.get(d, {}).get("ppl") for d in domains]
    return math.exp(np.mean([math.log(v) for v in values])) if ppl and None not in values else None


def seed_spread(results, trained):
    """Per variant (an ablation counts as its own) with at least two measured seeds: each seed's geometric mean
    over the trained domains and held-out perplexity, their mean and range (max - min). Then every pair of
    such variants: the difference of the means against the larger of their two ranges, the scale on which
    two seeds of one variant already differ (with two seeds a range, not a confidence interval)."""
    groups = {}
    for run in RUNS:
        ppl = results[run.name].get("ppl", {})
        geo, held_out = geometric_mean_ppl(ppl, trained), ppl.get(HELD_OUT, {}).get("ppl")
        if geo is not None and held_out is not None:
            groups.setdefault(variant_label(run), []).append((run.seed, geo, held_out))
    spread = {}
    for variant, seeds in groups.items():
        if len(seeds) < 2:
            continue
        geo, held_out = np.array([s[1] for s in seeds]), np.array([s[2] for s in seeds])
        spread[variant] = dict(
            seeds=[s[0] for s in seeds],
            geometric_mean=geo.tolist(),
            geometric_mean_mean=float(geo.mean()),
            geometric_mean_range=float(np.ptp(geo)),
            held_out=held_out.tolist(),
            held_out_mean=float(held_out.mean()),
            held_out_range=float(np.ptp(held_out)),
        )
    pairs = []
    names = list(spread)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            pair = dict(a=a, b=b)
            for key in ("geometric_mean", "held_out"):
                difference = spread[a][f"{key}_mean"] - spread[b][f"{key}_mean"]
                seed_range = max(spread[a][f"{key}_range"], spread[b][f"{key}_range"])
                pair[key] = dict(
                    difference=difference, seed_range=seed_range, beyond=abs(difference) > seed_range
                )
            pairs.append(pair)
    return spread, pairs


def seed_spread_section(results, trained):
    """The seed-spread tables of results.md (seed_spread); nothing until a variant has two measured seeds."""
    spread, pairs = seed_spread(results, trained)
    if not spread:
        return []
    rows = [
        [
            name,
            ", ".join(map(str, s["seeds"])),
            " / ".join(number(v) for v in s["geometric_mean"]),
            number(s["geometric_mean_mean"]),
            number(s["geometric_mean_range"]),
            " / ".join(number(v) for v in s["held_out"]),
            number(s["held_out_mean"]),
            number(s["held_out_range"]),
        ]
        for name, s in spread.items()
    ]
    text = [
        "## Seeds: how far two runs of one variant differ\n",
        "Geometric mean of the domains' perplexities and the held-out perplexity, per seed; range = max - min "
        "(with two seeds a range, not a confidence interval).\n\n",
        table(
            [
                "variant",
                "seeds",
                "geo. mean per seed",
                "mean",
                "range",
                f"{HELD_OUT} per seed",
                f"{HELD_OUT} mean",
                f"{HELD_OUT} range",
            ],
            rows,
        ),
    ]
    if pairs:
        rows = [
            [
                f"{p['a']} - {p['b']}",
                *(
                    f"{number(p[key]['difference'])} (range {number(p[key]['seed_range'])}: "
                    f"{'beyond' if p[key]['beyond'] else 'within'} it)"
                    for key in ("geometric_mean", "held_out")
                ),
            ]
            for p in pairs
        ]
        text += [
            "Difference of the seed means, against the larger of the two variants' seed ranges:\n\n",
            table(["variants", "geo. mean", HELD_OUT], rows),
        ]
    return text


def report(results, size_name, size, domains, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    trained = [d for d in domains if d != HELD_OUT]
    sections = [
        f"# Small-scale reproduction: size `{size_name}`\n",
        f"Context {size.context}, {size.train_steps} steps of {size.global_batch_tokens:,} tokens "
        f"(the same token stream for every run; the seed sets the initial weights). Model: preset "
        f"{size.preset_size} with {size.overrides}, backend {size.backend}. Perplexities are on held-out "
        f"documents; `{HELD_OUT}` was never trained on. '-' = not measured yet.\n",
    ]

    rows = []
    for run in RUNS:
        ppl = results[run.name].get("ppl", {})
        rows.append(
            run_label(run, results[run.name])
            + [number(ppl.get(d, {}).get("ppl")) for d in trained]
            + [number(geometric_mean_ppl(ppl, trained))]
            + [number(ppl.get(HELD_OUT, {}).get("ppl"))]
        )
    scored = next((r["ppl"] for r in results.values() if "ppl" in r), {})
    counts = ", ".join(f"{d} {scored[d]['tokens']:,}" for d in domains if d in scored)
    sections += [
        "## Validation perplexity per domain (Table 5's form)\n",
        f"Held-out tokens scored, in windows of {size.context}: {counts or '-'}.\n\n",
        table(LABEL + trained + ["geometric mean", HELD_OUT + " (held out)"], rows),
    ]

    sections += seed_spread_section(results, trained)

    lengths = [k * size.context for k in (1, 2, 4)]
    rows = []
    for run in RUNS:
        accuracy = results[run.name].get("niah", {}).get("accuracy", {})
        cells = [accuracy.get(f"{task}@{length}") for task in ("pk", "n", "w") for length in lengths]
        rows.append(run_label(run, results[run.name]) + [number(v, 1) for v in cells])
    samples = len(size.niah_depths) * size.niah_samples
    sections += [
        f"## S-NIAH accuracy (%) at 1x, 2x, 4x the training context ({samples} prompts per cell)\n",
        table(LABEL + [f"{t} {length}" for t in ("pk", "n", "w") for length in lengths], rows),
    ]

    rows = []
    for run in RUNS:
        context = results[run.name].get("context", {})
        by_length = context.get("by_length", {})
        rows.append(
            run_label(run, results[run.name])
            + [number(by_length.get(k, {}).get("ppl")) for k in ("1x", "2x", "4x")]
        )
    stream = next((r["context"]["stream"] for r in results.values() if "context" in r), HELD_OUT)
    sections += [
        f"## Perplexity against evaluation context ({stream} stream, Fig. 7); "
        "loss against position in context.png\n",
        table(LABEL + [f"ppl @ {length}" for length in lengths], rows),
    ]

    rows = []
    for run in RUNS:
        t = results[run.name].get("train", {})
        rows.append(
            run_label(run, results[run.name])
            + [
                "-" if not t else f"{t['params'] / 1e6:.1f}M",
                "-" if not t.get("tokens_per_s") else f"{t['tokens_per_s']:,.0f}",
                t.get("device", "-"),
            ]
        )
    sections += [
        "## Training throughput (median over train.py's log intervals, eager)\n",
        table(LABEL + ["parameters", "tokens/s", "device"], rows),
    ]

    rows = []
    for run in RUNS:
        trig = results[run.name].get("trigger")
        if not trig:
            continue
        rows.append(
            run_label(run, results[run.name])
            + [
                number(trig.get("p_distance"), 4),
                number(trig.get("p_between_domains"), 4),
                number(trig.get("p_between_documents"), 4),
                number(trig.get("p_within_document"), 4),
                number(trig.get("p_probe"), 2),
                number(trig.get("t_probe"), 2),
                number(trig.get("chance"), 2),
                str(trig["docs"]),
            ]
            + [number(trig["t_by_domain"].get(d), 3) for d in domains]
        )
    sections += [
        "## The Trigger and the gate t\n",
        "p starts at all-ones; distance = RMS of p - 1 over the bank, mean over tokens and layers. Between "
        "domains = RMS spread of the domains' mean p; between documents = RMS distance of a document's "
        "mean p from its domain's; within a document = std of p over its tokens. Probe = leave-one-out "
        "nearest-centroid balanced accuracy of the domain from a document's mean p (or mean t per layer), "
        "against chance. t (1 = sliding window, 0 = linear attention) is the mean per domain.\n\n",
        table(
            LABEL
            + [
                "p distance",
                "between domains",
                "between docs",
                "within doc",
                "p probe",
                "t probe",
                "chance",
                "docs",
            ]
            + [f"t {d}" for d in domains],
            rows,
        )
        if rows
        else "(no run with an Updater measured yet)\n",
    ]

    text = "\n".join(sections)
    write_text_atomically(os.path.join(out_dir, "results.md"), text)
    runs = {
        name: {
            k: ({a: b for a, b in v.items() if a != "records"} if k == "niah" else v)
            for k, v in entry.items()
        }
        for name, entry in results.items()
    }  # S-NIAH's answers themselves stay in each run's record, measure/niah.json
    write_json_atomically(
        os.path.join(out_dir, "results.json"),
        {"size": size_name, "config": dataclasses.asdict(size), "runs": runs},
    )
    plots(results, size, domains, out_dir)
    return text


def plots(results, size, domains, out_dir):
    fig, ax = evaluation.new_figure(figsize=(9, 4.5))
    names = [r.name for r in RUNS if "ppl" in results[r.name]]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        ax.bar(
            np.arange(len(domains)) + i * width,
            [results[name]["ppl"][d]["ppl"] for d in domains],
            width,
            label=name,
        )
    ax.set_xticks(np.arange(len(domains)) + 0.4 - width / 2, domains)
    ax.set(ylabel="perplexity (held-out documents)", yscale="log", title="Validation perplexity per domain")
    ax.legend(fontsize=7, ncol=2)
    evaluation.save_figure(fig, os.path.join(out_dir, "ppl_per_domain.png"))

    fig, ax = evaluation.new_figure(figsize=(7, 4.5))
    for run in RUNS:
        context = results[run.name].get("context")
        if context:
            curve = context["loss_by_position"]
            ax.plot((np.arange(len(curve)) + 0.5) * context["position_bucket"], curve, label=run.name)
    ax.axvline(size.context, color="gray", ls="--", lw=1)
    ax.set(
        xlabel="position in the window (tokens); dashed: training context",
        ylabel="mean loss (nats)",
        title="Loss against position up to 4x the training context (Fig. 7)",
    )
    ax.legend(fontsize=7)
    evaluation.save_figure(fig, os.path.join(out_dir, "context.png"))

    lengths = [k * size.context for k in (1, 2, 4)]
    fig, axes = evaluation.new_figure(1, 3, figsize=(13, 4), sharey=True)
    for ax, task in zip(axes, ("pk", "n", "w")):
        for run in RUNS:
            accuracy = results[run.name].get("niah", {}).get("accuracy")
            if accuracy:
                ax.plot(
                    lengths,
                    [accuracy.get(f"{task}@{length}", np.nan) for length in lengths],
                    "o-",
                    label=run.name,
                )
        ax.set(
            xscale="log",
            xticks=lengths,
            xticklabels=[str(x) for x in lengths],
            title=f"S-NIAH-{task.upper()}",
            xlabel="context (tokens)",
        )
    axes[0].set_ylabel("accuracy (%)")
    axes[-1].legend(fontsize=7)
    evaluation.save_figure(fig, os.path.join(out_dir, "niah.png"))

    fig, axes = evaluation.new_figure(1, 2, figsize=(13, 4.5))
    gated = [r for r in RUNS if results[r.name].get("trigger")]
    grid = np.array(
        [[results[r.name]["trigger"]["t_by_domain"].get(d, np.nan) for d in domains] for r in gated]
    )
    if len(gated):
        image = axes[0].imshow(grid, aspect="auto", cmap="coolwarm", vmin=0, vmax=1)
        fig.colorbar(image, ax=axes[0])
        for (row, column), value in np.ndenumerate(grid):
            axes[0].text(column, row, f"{value:.3f}", ha="center", va="center", fontsize=7)
    axes[0].set(xticks=range(len(domains)), yticks=range(len(gated)), title="gate t per domain (1 = SWA)")
    axes[0].set_xticklabels(domains, rotation=30)
    axes[0].set_yticklabels([r.name for r in gated])
    for run in gated:
        distance = results[run.name]["trigger"].get("p_distance_by_layer")
        if distance:
            axes[1].plot(range(len(distance)), distance, "o-", label=run.name)
    axes[1].set(
        xlabel="Nirvana layer (after the prelude)",
        ylabel="RMS |p - 1|",
        title="how far the Trigger's p moves from all-ones",
    )
    axes[1].xaxis.get_major_locator().set_params(integer=True)
    axes[1].legend(fontsize=7)
    evaluation.save_figure(fig, os.path.join(out_dir, "trigger.png"))

    with_p = [r for r in gated if results[r.name]["trigger"].get("p_doc_means_2d")]
    fig, axes = evaluation.new_figure(
        1, max(1, len(with_p)), figsize=(4.5 * max(1, len(with_p)), 4), squeeze=False
    )
    for ax, run in zip(axes[0], with_p):
        trig = results[run.name]["trigger"]
        points, labels = np.asarray(trig["p_doc_means_2d"]), np.asarray(trig["labels"])
        for domain in trig["domains"]:
            ax.scatter(*points[labels == domain].T, s=10, label=domain)
        ax.set(title=f"{run.name}: documents' mean p (PCA)")
    axes[0][0].legend(fontsize=7)
    evaluation.save_figure(fig, os.path.join(out_dir, "p_documents.png"))

    fig, ax = evaluation.new_figure(figsize=(7, 4.5))
    for run in RUNS:
        log = [r for r in results[run.name].get("log", []) if r["val_loss"] is not None]
        if log:
            ax.plot([r["tokens"] for r in log], [r["val_loss"] for r in log], label=run.name)
    ax.set(xlabel="tokens", ylabel="in-run validation loss", title="train.py's validation loss")
    ax.legend(fontsize=7)
    evaluation.save_figure(fig, os.path.join(out_dir, "loss.png"))


# ----------------------------------------------------------------------------- the command


def work(runs, size, tokens_dir, eval_sets, runs_dir, records, device, clock, corpus):
    """Trains then measures each run in turn on the corpus of that fingerprint; -> the runs left unfinished."""
    pending = []
    for i, run in enumerate(runs):
        run_dir, record_dir = os.path.join(runs_dir, run.name), os.path.join(records, run.name)
        finished = train_run(run, size, tokens_dir, run_dir, record_dir, device, clock, corpus)
        if not finished and os.path.isfile(os.path.join(run_dir, "ckpt.pt")):
            # begun and cut by the budget: starting the next runs would only leave more of them half-trained
            return pending + [r.name for r in runs[i:]]
        if not finished or not measure_run(run, size, run_dir, record_dir, eval_sets, device, clock):
            pending.append(run.name)
    return pending


def complete(records, run):
    """Is the run trained and every measurement of it recorded?"""
    names = ["train_done.json"] + [os.path.join("measure", m + ".json") for m in MEASUREMENTS]
    return all(os.path.isfile(os.path.join(records, run.name, name)) for name in names)


def spawn_workers(args, runs, gpus, device, clock):
    """One worker process per GPU, each with its share of the runs and what is left of the budget; -> their
    exit codes."""
    os.makedirs(args.runs, exist_ok=True)
    workers = []
    for i, gpu in enumerate(gpus):
        share = [r.name for r in runs[i :: len(gpus)]]
        if not share:
            continue
        argv = [sys.executable, os.path.abspath(__file__), "--data", args.data, "--size", args.size]
        argv += ["--runs", args.runs, "--results", args.results, "--only", ",".join(share)]
        argv += ["--device", device, "--no-report"]
        if clock.budget:
            argv += ["--time-budget", f"{max(1.0, clock.left()):.0f}"]
        log = open(os.path.join(args.runs, f"worker_{gpu}.log"), "a")  # noqa: SIM115 (open while it runs)
        env = dict(os.environ, CUDA_VISIBLE_DEVICES=str(gpu))
        workers.append((gpu, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log))
        print(f"GPU {gpu}: {', '.join(share)} (log {log.name})", flush=True)
    codes = []
    for gpu, process, log in workers:
        codes.append(process.wait())
        log.close()
        print(f"GPU {gpu}: worker exited with status {codes[-1]}", flush=True)
    return codes


def main(argv: list[str] | None = None) -> dict | None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", required=True, help="folder written by experiments/real_text.py")
    parser.add_argument("--size", default="small", choices=sorted(SIZES))
    parser.add_argument(
        "--runs", default=None, help="checkpoints and measurements (default runs/small_scale/<size>)"
    )
    parser.add_argument(
        "--results", default=None, help="tables and PNGs (default experiments/results/<size>)"
    )
    parser.add_argument("--only", default=None, help="comma-separated run names (default: all of RUNS)")
    parser.add_argument(
        "--time-budget",
        type=non_negative_float,
        default=0,
        help="seconds this call may work; unfinished runs continue in the next call (0: no limit)",
    )
    parser.add_argument(
        "--runs-persist",
        action="store_true",
        help="the runs folder outlives this call (a kept disk, a GPU machine kept warm for the next call): "
        "begin a run even when it cannot finish within --time-budget",
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    parser.add_argument("--gpus", default="", help="e.g. 0,1,2,3: one worker process per GPU")
    parser.add_argument("--no-report", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    size = SIZES[args.size]
    args.runs = args.runs or os.path.join("runs", "small_scale", args.size)
    args.results = args.results or os.path.join(
        os.path.dirname(os.path.abspath(__file__)), "results", args.size
    )
    runs = RUNS
    if args.only:
        names = args.only.split(",")
        unknown = sorted(set(names) - {r.name for r in RUNS})
        if unknown:
            raise UserError(f"--only: unknown run(s) {unknown}; runs are {[r.name for r in RUNS]}")
        runs = [r for r in RUNS if r.name in names]
    tokens_dir, eval_sets = data_paths(args.data)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if size.backend == "triton" and not device.startswith("cuda"):
        raise UserError(
            f"size {args.size} trains with the Triton kernels and needs a GPU; use --size tiny on the CPU"
        )
    clock = Clock(args.time_budget, args.runs_persist)
    records = os.path.join(args.results, "runs")
    corpus = corpus_fingerprint(tokens_dir)
    check_same_corpus(records, corpus)
    if args.gpus:
        gpus = [g for g in args.gpus.split(",") if g.strip()]
        codes = spawn_workers(args, [r for r in runs if not complete(records, r)], gpus, device, clock)
        if any(codes):
            raise RuntimeError(f"worker(s) failed (exit status {codes}); see {args.runs}/worker_*.log")
    else:
        work(runs, size, tokens_dir, eval_sets, args.runs, records, device, clock, corpus)
    if args.no_report:
        return None
    results = run_results(records)
    text = report(results, args.size, size, sorted(eval_sets), args.results)
    print(text)
    pending = [r.name for r in runs if not all(k in results[r.name] for k in ("train",) + MEASUREMENTS)]
    if pending:
        print(f"PENDING: {', '.join(pending)}: run the same command again to continue")
    else:
        print(f"all done: {args.results}/results.md")
    return results


if __name__ == "__main__":
    run_main(main)

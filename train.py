"""Pretraining for Nirvana and its baselines: the same script on one device and, under torchrun, on many.

Usage (a comment says what a command needs beyond a CPU):
    python train.py                        # nirvana-tiny on the built-in corpus: a few CPU minutes
    python train.py --resume               # continue out/nirvana-tiny/ckpt.pt where it stopped
    python prepare.py --input fineweb/sample-10BT --out data/fineweb --workers 16        # your data
    python train.py --preset nirvana-350m --data data/fineweb --backend triton            # GPU, your data
    python train.py --preset transformer-350m --data data/fineweb --compile               # GPU, your data
    torchrun --nproc_per_node=8 train.py --preset nirvana-1.3b --data data/fineweb --dist fsdp   # 8 GPUs
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=run1 \\
        train.py --preset nirvana-1.3b --data data/fineweb --dist fsdp                    # 32 GPUs, your data
    python train.py --preset nirvana-125m --set d_model=384 --set n_layers=6 --set window=256   # GPU

A run folder that holds a checkpoint is never replaced silently: continue it with --resume, replace it with
--overwrite, or choose another --out.

Defaults are the paper's (Sec. 3): context = the preset's (4096), global batch 0.5M tokens, AdamW peak lr 4e-4
with linear warm-up over 1B tokens then cosine decay, 100B tokens. The tiny presets default to a short CPU
schedule instead (TINY_DEFAULTS). Every rank reads its own slice of each global batch from one token stream,
so the losses depend on the global batch, not on the number of devices.

Writes into --out: ckpt.pt (atomically; model, optimizer, schedule, data position, RNG), log.csv (or --log
FILE.jsonl) and loss.png. The validation loss and perplexity it prints and logs are over the first
--eval-tokens tokens of the validation split (8,192 for the tiny presets), a quick check during training;
`python eval.py ppl` measures all of them, so its perplexity differs.
With every checkpoint it also writes the weights as model.safetensors + config.json (the folder then
loads with nirvana_hf.load_pretrained or transformers, see nirvana_hf/).
"""

import argparse
import ast
import contextlib
import csv
import dataclasses
import json
import math
import os
import resource
import time

import numpy as np
import torch
import torch.distributed as dist

from cli import (
    ArgumentParser,
    UserError,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    read_checkpoint,
    run_main,
    torch_device,
    write_atomically,
)
from nirvana import Nirvana, NirvanaConfig, fuse_optimizer_state
from prepare import BUILTIN_DIR, TokenShards, load_meta, prepare_builtin

PAPER_DEFAULTS = dict(
    seq_len=None,
    micro_batch=4,
    global_batch_tokens=524_288,
    max_tokens=100_000_000_000,
    warmup_tokens=1_000_000_000,
    lr=4e-4,
    eval_every=1000,
    eval_tokens=4_194_304,
    save_every=1000,
)
TINY_DEFAULTS = dict(
    seq_len=128,
    micro_batch=8,
    global_batch_tokens=2048,
    max_tokens=1_024_000,
    warmup_tokens=102_400,
    lr=2e-3,
    eval_every=50,
    eval_tokens=8192,
    save_every=100,
)
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense, per GPU


def probability(text):
    """A number in [0, 1)."""
    value = non_negative_float(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def device_option(text):
    return text if text == "auto" else torch_device(text)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--preset", default="nirvana-tiny", help="<variant>-<size> of nirvana.py, e.g. nirvana-350m"
    )
    p.add_argument("--backend", default="torch", choices=["torch", "triton"])
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        dest="config_overrides",
        help="override one NirvanaConfig field of the preset, e.g. --set window=256 (repeatable)",
    )
    p.add_argument(
        "--data", default=None, help=f"folder written by prepare.py (default: built-in, {BUILTIN_DIR})"
    )
    p.add_argument("--out", default=None, help="run folder (default out/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue from <out>/ckpt.pt")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoint and log already in --out")
    p.add_argument(
        "--seq-len", type=positive_int, help="tokens per sequence (default: the preset's context_length)"
    )
    p.add_argument("--micro-batch", type=positive_int, help="sequences per device per forward pass")
    p.add_argument(
        "--global-batch-tokens", type=positive_int, help="tokens per optimizer step over all devices"
    )
    p.add_argument(
        "--max-tokens", type=positive_int, help="training length in tokens (sets the cosine schedule)"
    )
    p.add_argument("--warmup-tokens", type=non_negative_int, help="linear warm-up length in tokens")
    p.add_argument(
        "--stop-step",
        type=positive_int,
        help="end this run after this step (schedule unchanged; --resume later)",
    )
    p.add_argument("--lr", type=positive_float, help="peak learning rate")
    p.add_argument(
        "--min-lr-fraction", type=probability, default=0.1, help="cosine decays to this fraction of --lr"
    )
    p.add_argument("--weight-decay", type=non_negative_float, default=0.1)
    p.add_argument("--beta1", type=probability, default=0.9)
    p.add_argument("--beta2", type=probability, default=0.95)
    p.add_argument(
        "--grad-clip", type=non_negative_float, default=1.0, help="max global gradient norm (0: off)"
    )
    p.add_argument("--eval-every", type=positive_int, help="steps between validation runs")
    p.add_argument(
        "--eval-tokens",
        type=positive_int,
        help="validation tokens per run: the first ones of the validation split",
    )
    p.add_argument(
        "--save-every",
        type=non_negative_int,
        help="steps between checkpoints, one also at the end (0: none, e.g. for benchmarks)",
    )
    p.add_argument("--log-every", type=positive_int, default=10, help="steps between log lines")
    p.add_argument("--log", default=None, help="log file, .csv or .jsonl (default <out>/log.csv)")
    p.add_argument("--plot", default=None, help="loss-curve PNG (default <out>/loss.png)")
    p.add_argument(
        "--dist", default="ddp", choices=["ddp", "fsdp"], help="multi-process wrapper under torchrun"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument(
        "--cuda-graph",
        action="store_true",
        help="capture the whole training step (forward, backward, clipping, AdamW) as one CUDA graph and replay "
        "it: no host time between kernels (one GPU, eager)",
    )
    p.add_argument(
        "--device", default="auto", type=device_option, help="auto (cuda if available), cpu or cuda"
    )
    p.add_argument("--seed", type=non_negative_int, default=1337)
    args = p.parse_args(argv)
    defaults = TINY_DEFAULTS if args.preset.endswith("-tiny") else PAPER_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.config_overrides = parse_config_overrides(p, args.config_overrides)
    try:  # an unknown preset or field, or values the model rejects, fail here, before any work
        NirvanaConfig.from_preset(args.preset, **args.config_overrides)
    except (ValueError, TypeError) as error:
        sets = "".join(f" --set {field}={value!r}" for field, value in args.config_overrides.items())
        p.error(f"--preset {args.preset}{sets}: {error}")
    args.out = args.out or os.path.join("out", args.preset)
    args.log = args.log or os.path.join(args.out, "log.csv")
    if not args.log.endswith((".csv", ".jsonl")):
        p.error(f"--log {args.log}: the file name must end in .csv or .jsonl")
    args.plot = args.plot or os.path.join(args.out, "loss.png")
    if not args.plot.endswith(".png"):
        p.error(f"--plot {args.plot}: the file name must end in .png")
    if args.resume and args.overwrite:
        p.error("--resume continues the run in --out and --overwrite replaces it: give one of them")
    return args


def parse_config_overrides(parser, items):
    """["d_model=384", "detach_inner_grad=True", ...] -> {field: value}; values are Python literals."""
    overrides = {}
    for item in items:
        field, sep, text = item.partition("=")
        if not sep or not field:
            parser.error(f"--set {item!r}: expected FIELD=VALUE, e.g. --set window=256")
        if field in ("vocab_size", "backend"):
            parser.error(f"--set {field}: the data sets vocab_size and --backend sets backend")
        try:
            overrides[field] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            overrides[field] = text  # a bare word stays a string
    return overrides


# ----------------------------------------------------------------------------- distributed setup


@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def master(self):
        return self.rank == 0

    def mean(self, value):
        """The mean of a float over ranks."""
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() / self.world

    def barrier(self):
        if self.world > 1:
            dist.barrier()


def setup_distributed(device_arg):
    """Reads torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT); NCCL on GPU, gloo on CPU."""
    use_cuda = torch.cuda.is_available() if device_arg == "auto" else device_arg.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but torch sees no CUDA device")
    if "RANK" not in os.environ:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return Dist(rank, local_rank, world, device)


# ----------------------------------------------------------------------------- data


def open_data(args, d):
    """The train and validation streams; the built-in corpus is prepared on first use (by rank 0)."""
    data_dir = args.data or BUILTIN_DIR
    if args.data is None and not os.path.isfile(os.path.join(data_dir, "meta.json")):
        if d.master:
            print(f"preparing the built-in corpus into {data_dir} ...", flush=True)
            prepare_builtin(data_dir)
        d.barrier()
    load_meta(data_dir)  # a clear error for a missing or foreign folder
    return TokenShards(data_dir, "train"), TokenShards(data_dir, "val")


def get_batch(stream, position, batch, seq_len, vocab_size, device):
    """batch sequences of seq_len tokens from stream position: inputs and next-token targets, (B, T) each."""
    tokens = stream.read(position, batch * seq_len + 1)
    if tokens.max() >= vocab_size:
        bad = int(np.argmax(tokens >= vocab_size))
        raise UserError(
            f"token id {tokens[bad]} at data position {position + bad} is outside the model's "
            f"vocabulary [0, {vocab_size}): the data was made with another tokenizer; prepare it again"
        )
    tokens = torch.from_numpy(tokens)
    x = tokens[:-1].view(batch, seq_len)
    y = tokens[1:].view(batch, seq_len)  # y[i, t] = x[i, t + 1]; across sequence ends the stream continues
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


# ----------------------------------------------------------------------------- model, optimizer, schedule


def model_config(args, vocab_size):
    """The preset's NirvanaConfig with the run's overrides; checks that --compile can run it."""
    config = NirvanaConfig.from_preset(
        args.preset, **args.config_overrides, vocab_size=vocab_size, backend=args.backend
    )
    if args.compile and config.trigger and config.backend == "torch" and not config.detach_inner_grad:
        raise UserError(
            f"--compile with {args.preset} on the torch backend fails: torch.compile cannot take the "
            "double backward through the Trigger's inner gradient (eq. 4); use --backend triton "
            "or leave out --compile"
        )
    return config


def build_model(args, config, d):
    """The model, wrapped for the run: DDP or FSDP2 under torchrun, optionally compiled.
    Returns (model to call, the plain model whose state dicts the checkpoints hold)."""
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    with d.device:
        model = Nirvana(config)
    wrapped = model
    if d.world > 1 and args.dist == "ddp":
        device_ids = [d.local_rank] if d.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    elif d.world > 1:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(d.device.type, (d.world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)  # the root: embeddings, the shared Trigger bank, final norm, lm_head
    return wrapped, model


def build_optimizer(args, model):
    """AdamW; weight decay on matrices and embeddings (dim >= 2), none on norms, biases and gates. On a GPU the
    fused implementation: the whole update in one pass over each parameter, not several foreach passes."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)


@dataclasses.dataclass
class Schedule:
    """Linear warm-up to peak_lr, then cosine decay to min_lr at max_steps (paper Sec. 3)."""

    peak_lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int

    def lr(self, step):  # step: 0-based optimizer step
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps))
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1 + math.cos(math.pi * progress))


def flops_per_token(config, model, seq_len):
    """Estimated training FLOPs per token (forward + backward = 3 x forward): 6 per weight, plus token mixing
    that weights do not count: attention scores and sums over the keys seen, the delta-rule state update and
    read-out (~8 Dk Dv per head, as the recurrence counts it), and the Trigger's W(p) = sum_k p_k W_k."""
    H, Dk = config.n_heads, config.head_dim
    Dv = Dk * config.expand_v
    mixing = 0.0
    for layer in range(config.n_layers):
        kind = config.layer_kind(layer)
        if kind in ("gdn", "nirvana"):
            mixing += 3 * 8 * H * Dk * Dv
        if kind in ("swa", "nirvana"):
            mixing += 3 * 2 * H * (Dk + Dv) * min(config.window, seq_len / 2)
        if kind == "attention":
            mixing += 3 * 2 * H * (Dk + Dv) * seq_len / 2
        if kind == "nirvana" and config.trigger:
            mixing += 3 * 3 * 2 * config.bank_size * config.trigger_dim**2
    return 6 * model.num_params(non_embedding=True) + mixing


def peak_flops(device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


# ----------------------------------------------------------------------------- checkpoints


def state_dict_options():
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def save_checkpoint(path, model, optimizer, schedule, config, tokenizer, step, data_position, args, d):
    """Gathers the full state on rank 0 (a collective under FSDP) and writes it atomically."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from nirvana_hf.folder import save_state_dict

    model_state = get_model_state_dict(model, options=state_dict_options())
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=state_dict_options())
    if d.master:
        checkpoint = {
            "config": dataclasses.asdict(config),
            "model": model_state,
            "tokenizer": tokenizer,
            "optimizer": optimizer_state,
            "scheduler": dataclasses.asdict(schedule),
            "step": step,
            "data_position": data_position,
            "global_batch_tokens": args.global_batch_tokens,
            "seq_len": args.seq_len,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state() if d.device.type == "cuda" else None,
            },
        }
        # a crash keeps the previous checkpoint
        write_atomically(path, lambda tmp: torch.save(checkpoint, tmp))
        # the weights again in the form models are shared in, beside ckpt.pt: model.safetensors + config.json
        save_state_dict(model_state, config, tokenizer, os.path.dirname(path))
    d.barrier()


def load_checkpoint(path, model, optimizer, config, tokenizer, d):
    """Restores model and optimizer into the (wrapped) model; returns the checkpoint for the rest."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not os.path.isfile(path):
        raise UserError(f"--resume: no checkpoint at {path}; leave out --resume to start a new run there")
    checkpoint = read_checkpoint(path)
    missing = {"config", "model", "optimizer", "step", "data_position"} - set(checkpoint)
    if missing:
        raise UserError(
            f"checkpoint {path} lacks {sorted(missing)}: not written by train.py, cannot --resume"
        )
    wanted = dataclasses.asdict(config)
    differ = {
        k: (checkpoint["config"].get(k), v)
        for k, v in wanted.items()
        if checkpoint["config"].get(k) != v and k != "backend"
    }  # the backend may change between runs
    if differ:
        listing = ", ".join(f"{k}: checkpoint {a!r} vs requested {b!r}" for k, (a, b) in differ.items())
        raise UserError(
            f"checkpoint {path} is from another model config ({listing}); resume with the run's "
            f"--preset and --set options"
        )
    if checkpoint.get("tokenizer") != tokenizer:
        raise UserError(
            f"checkpoint {path} used tokenizer {checkpoint.get('tokenizer')!r}, "
            f"the data uses {tokenizer!r}: resume with the run's --data"
        )
    set_model_state_dict(model, checkpoint["model"], options=state_dict_options())
    # a run begun before the projections were fused keeps its AdamW moments, concatenated like the weights
    optimizer_state = fuse_optimizer_state(model, checkpoint["optimizer"])
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=state_dict_options())
    torch.set_rng_state(checkpoint["rng"]["torch"])
    if d.device.type == "cuda" and checkpoint["rng"]["cuda"] is not None:
        torch.cuda.set_rng_state(checkpoint["rng"]["cuda"])
    return checkpoint


# ----------------------------------------------------------------------------- logging

LOG_FIELDS = [
    "step",
    "tokens",
    "loss",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "val_loss",
    "val_ppl",
    "elapsed_s",
]


class Log:
    """Rows of LOG_FIELDS in a .csv or .jsonl file (rank 0 only); a resumed run keeps the rows up to its step.
    The file is (re)written at the first new row: a run that fails before its first step leaves it as it was."""

    def __init__(self, path, resume_step, enabled):
        self.path, self.enabled, self.rows, self.started = path, enabled, [], False
        if enabled and resume_step is not None and os.path.isfile(path):
            self.rows = [r for r in self.read(path) if int(r["step"]) <= resume_step]

    @staticmethod
    def read(path):
        with open(path) as f:
            if path.endswith(".csv"):
                return [
                    {
                        k: None if v in ("", None) else int(v) if k in ("step", "tokens") else float(v)
                        for k, v in row.items()
                    }
                    for row in csv.DictReader(f)
                ]
            return [json.loads(line) for line in f if line.strip()]

    def rewrite(self):
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "w", newline="") as f:
            if self.path.endswith(".csv"):
                f.write(",".join(LOG_FIELDS) + "\n")
            for row in self.rows:
                self.write_row(f, row)

    def write_row(self, f, row):
        if self.path.endswith(".csv"):
            f.write(",".join("" if row.get(k) is None else repr(row[k]) for k in LOG_FIELDS) + "\n")
        else:
            f.write(json.dumps({k: row.get(k) for k in LOG_FIELDS}) + "\n")

    def append(self, **row):
        if not self.enabled:
            return
        if not self.started:
            self.rewrite()
            self.started = True
        self.rows.append(row)
        with open(self.path, "a", newline="") as f:
            self.write_row(f, row)

    def plot(self, path, title):
        """Training and validation loss against tokens, written atomically as a PNG."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(r["tokens"], r["loss"]) for r in self.rows if r.get("loss") is not None]
        val = [(r["tokens"], r["val_loss"]) for r in self.rows if r.get("val_loss") is not None]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if train:
            ax.plot(*zip(*train), label="train")
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set(xlabel="tokens", ylabel="cross-entropy (nats/token)", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        write_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"))
        plt.close(fig)


def memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    # Linux reports kB: the process's peak RSS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


# ----------------------------------------------------------------------------- evaluation and training


@torch.no_grad()
def evaluate(model, val, args, vocab_size, d, autocast):
    """Mean validation loss over the first args.eval_tokens tokens of the validation split (at least one
    batch). Batch j goes to rank j % world; every rank runs as many forwards (FSDP needs them all), the
    padding batches counting zero, so the result does not depend on the number of ranks."""
    model.eval()
    batch_tokens = args.micro_batch * args.seq_len
    batches = max(1, args.eval_tokens // batch_tokens)
    total = 0.0
    for j in range(d.rank, math.ceil(batches / d.world) * d.world, d.world):
        x, y = get_batch(val, j * batch_tokens, args.micro_batch, args.seq_len, vocab_size, d.device)
        with autocast:
            _, loss = model(x, y)
        total += loss.item() if j < batches else 0.0
    model.train()
    return d.mean(total) * d.world / batches


def gradient_sync(model, d, enabled):
    """Only the last micro-step of an accumulation all-reduces (DDP) or reduce-scatters (FSDP) gradients."""
    if d.world == 1:
        return contextlib.nullcontext()
    model = getattr(model, "_orig_mod", model)  # the wrapper inside torch.compile's
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if enabled else model.no_sync()
    model.set_requires_gradient_sync(enabled)
    return contextlib.nullcontext()


def grad_accum_steps(args, d):
    per_micro_step = d.world * args.micro_batch * args.seq_len
    if args.global_batch_tokens % per_micro_step:
        raise UserError(
            f"--global-batch-tokens {args.global_batch_tokens} is not a multiple of "
            f"devices x micro-batch x seq-len = {d.world} x {args.micro_batch} x {args.seq_len}"
        )
    return args.global_batch_tokens // per_micro_step


def micro_batches(stream, position, accum, vocab_size, args, d):
    """This rank's accum micro-batches (x, y) of the global batch at stream position: contiguous in it."""
    micro_tokens = args.micro_batch * args.seq_len
    return [
        get_batch(
            stream,
            position + (d.rank * accum + micro) * micro_tokens,
            args.micro_batch,
            args.seq_len,
            vocab_size,
            d.device,
        )
        for micro in range(accum)
    ]


def train_step(model, raw_model, optimizer, stream, position, accum, vocab_size, args, d, autocast):
    """One optimizer step on the global batch at stream position: accum micro-batches per rank, gradients
    averaged over all of them, clipped, then AdamW (skipped when the loss is not finite).
    Returns the mean loss over the global batch and the gradient norm before clipping."""
    total = 0.0
    for micro, (x, y) in enumerate(micro_batches(stream, position, accum, vocab_size, args, d)):
        with gradient_sync(model, d, micro == accum - 1), autocast:
            _, loss = model(x, y)
        (loss / accum).backward()
        total += loss.detach()
    loss = d.mean(float(total) / accum)
    grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), args.grad_clip or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP: a DTensor
    if math.isfinite(loss):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, float(grad_norm)


def device_train_step(model, optimizer, x, y, grad_clip, autocast):
    """train_step's work on the micro-batches x, y (accum, B, T) without one host sync, so that a CUDA graph
    can hold it: forward and backward of each micro-batch, the gradients averaged, clipped (on the device:
    clip_grad_norm_ scales by min(1, clip / norm) without asking the host), AdamW. A non-finite loss skips
    AdamW on the device: the optimizer must be fused AdamW, which skips its update (and its step count) where
    its found_inf is 1, the flag GradScaler uses. Returns (mean loss, gradient norm before clipping), device
    tensors."""
    total = torch.zeros((), device=x.device)
    for micro in range(len(x)):
        with autocast:
            _, loss = model(x[micro], y[micro])
        (loss / len(x)).backward()
        total += loss.detach()
    loss = total / len(x)
    optimizer.found_inf = torch.logical_not(torch.isfinite(loss)).float()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    optimizer.step()
    del optimizer.found_inf
    return loss, grad_norm


class CudaGraphTrainStep:
    """train_step as one CUDA graph (--cuda-graph; one GPU): device_train_step captured once and replayed, so
    that the step's thousands of kernels (Triton kernels, GEMMs, norms, AdamW) start from one launch instead of
    one Python call each; the host time between them was about a sixth of nirvana-350m's eager step.

    The micro-batches, the learning rate, the loss and the gradient norm live in device buffers that every step
    overwrites (the graph reads and writes fixed addresses). The first `warmup` calls run device_train_step
    eagerly on a side stream (they compile the Triton kernels and create AdamW's state, which a capture cannot
    do); the next one captures it and every call from then on replays it. All of them are real training steps.
    What the graph needs that the eager step does not: autocast without its cache of bf16 weight copies (a
    cached copy would be captured stale), the learning rate as a device tensor (fused AdamW takes one),
    AdamW marked capturable, and no host-side checks inside the step (the token range is checked by get_batch
    on the host, before the copy)."""

    def __init__(self, model, optimizer, accum, micro_batch, seq_len, grad_clip, warmup=2):
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise UserError("--cuda-graph needs a CUDA device")
        self.model, self.optimizer, self.grad_clip, self.warmup = model, optimizer, grad_clip, warmup
        self.x = torch.zeros(accum, micro_batch, seq_len, dtype=torch.long, device=device)
        self.y = torch.zeros_like(self.x)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
            group["capturable"] = True
        self.side_stream = torch.cuda.Stream(device)
        self.graph = self.loss = self.grad_norm = None

    def run(self):
        return device_train_step(self.model, self.optimizer, self.x, self.y, self.grad_clip, self.autocast)

    def __call__(self, batches, lr):
        """One training step on batches [(x, y)] * accum at learning rate lr -> (loss, gradient norm)."""
        for micro, (x, y) in enumerate(batches):
            self.x[micro].copy_(x)
            self.y[micro].copy_(y)
        for group in self.optimizer.param_groups:
            group["lr"].fill_(lr)
        if self.warmup:
            self.warmup -= 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                self.loss, self.grad_norm = self.run()
                self.optimizer.zero_grad(set_to_none=True)
            torch.cuda.current_stream().wait_stream(self.side_stream)
        else:
            if self.graph is None:
                self.optimizer.zero_grad(set_to_none=True)  # the graph allocates the gradients it writes
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self.loss, self.grad_norm = self.run()
            self.graph.replay()
        return float(self.loss), float(self.grad_norm)


def check_run_folder(args):
    """A run folder holding a checkpoint is continued (--resume) or replaced (--overwrite), never silently."""
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    if os.path.exists(ckpt_path) and not (args.resume or args.overwrite):
        raise UserError(
            f"{args.out} already holds a checkpoint ({ckpt_path}); continue it with --resume, "
            f"replace it with --overwrite, or choose another --out"
        )
    if args.resume and not os.path.isfile(ckpt_path):
        raise UserError(
            f"--resume: no checkpoint at {ckpt_path}; leave out --resume to start a new run there"
        )


def train(args):
    check_run_folder(args)
    d = setup_distributed(args.device)
    try:
        return run(args, d)
    finally:
        if d.world > 1:
            dist.destroy_process_group()


def run(args, d):
    if d.device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside bf16 autocast
    train_data, val_data = open_data(args, d)
    vocab_size, tokenizer = train_data.vocab_size, train_data.tokenizer
    config = model_config(args, vocab_size)
    args.seq_len = args.seq_len or config.context_length
    accum = grad_accum_steps(args, d)  # every check before the model is built
    if args.cuda_graph and (d.device.type != "cuda" or d.world > 1 or args.compile):
        raise UserError(
            f"--cuda-graph captures the eager step of one process on a GPU; this run has {d.world} x "
            f"{d.device.type}{' and --compile' if args.compile else ''}"
        )
    model, raw_model = build_model(args, config, d)
    max_steps = math.ceil(args.max_tokens / args.global_batch_tokens)
    warmup_steps = max(1, round(args.warmup_tokens / args.global_batch_tokens))
    schedule = Schedule(args.lr, args.lr * args.min_lr_fraction, warmup_steps, max_steps)
    optimizer = build_optimizer(args, raw_model)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    step, data_position = 0, 0
    if args.resume:
        checkpoint = load_checkpoint(ckpt_path, raw_model, optimizer, config, tokenizer, d)
        step, data_position = checkpoint["step"], checkpoint["data_position"]
    log = Log(args.log, step if args.resume else None, d.master)
    forward = torch.compile(model) if args.compile else model
    graph_step = (
        CudaGraphTrainStep(raw_model, optimizer, accum, args.micro_batch, args.seq_len, args.grad_clip)
        if args.cuda_graph
        else None
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if d.device.type == "cuda" else contextlib.nullcontext()
    )
    flops, peak = flops_per_token(config, raw_model, args.seq_len), peak_flops(d.device)
    last_step = min(max_steps, args.stop_step or max_steps)
    eval_batch_tokens = args.micro_batch * args.seq_len
    val_tokens = max(1, args.eval_tokens // eval_batch_tokens) * eval_batch_tokens  # what evaluate() reads
    if d.master:
        wrapper = "" if d.world == 1 else args.dist + ", "
        print(
            f"{args.preset}: {raw_model.num_params() / 1e6:.2f}M parameters, vocab {vocab_size} ({tokenizer}), "
            f"{d.world} x {d.device.type}, {wrapper}micro-batch {args.micro_batch} x {args.seq_len}, "
            f"grad accumulation {accum}, global batch {args.global_batch_tokens} tokens, "
            f"steps {step} -> {last_step} of {max_steps}",
            flush=True,
        )
    if d.master and step >= last_step:
        print(f"{ckpt_path} is already at step {step}: nothing to train", flush=True)
    losses, val_losses = [], []
    interval_seconds, interval_tokens, run_start = 0.0, 0, time.time()
    while step < last_step:
        step_start = time.time()
        lr = schedule.lr(step)
        if graph_step:
            batches = micro_batches(train_data, data_position, accum, vocab_size, args, d)
            loss, grad_norm = graph_step(batches, lr)
        else:
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss, grad_norm = train_step(
                forward, raw_model, optimizer, train_data, data_position, accum, vocab_size, args, d, autocast
            )
        if not math.isfinite(loss):
            left = ckpt_path if os.path.exists(ckpt_path) else "none"
            raise FloatingPointError(
                f"training loss is {loss} at step {step + 1}; stopped before the update "
                f"(last checkpoint: {left}; {args.log} holds the steps before)"
            )
        step += 1
        data_position += args.global_batch_tokens
        interval_tokens += args.global_batch_tokens
        interval_seconds += time.time() - step_start  # the loss's float() waited for the device
        losses.append(loss)
        row = dict(step=step, tokens=data_position, loss=loss, lr=lr, grad_norm=grad_norm)
        if step % args.log_every == 0 or step == last_step:
            tokens_per_s = interval_tokens / interval_seconds
            mfu = flops * tokens_per_s / (peak * d.world) if peak else None
            row.update(tokens_per_s=tokens_per_s, mfu=mfu, elapsed_s=time.time() - run_start)
            if d.master:
                print(
                    f"step {step:6d}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad {grad_norm:.3f} | "
                    f"{tokens_per_s:,.0f} tok/s | MFU {'n/a' if mfu is None else f'{mfu:.1%}'} | "
                    f"mem {memory_gb(d.device):.2f} GB",
                    flush=True,
                )
            interval_seconds, interval_tokens = 0.0, 0
        evaluating = step % args.eval_every == 0 or step == last_step
        if evaluating:
            val_loss = evaluate(forward, val_data, args, vocab_size, d, autocast)
            val_losses.append((step, val_loss))
            row.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50.0)))
            if d.master:
                print(
                    f"step {step:6d} | validation loss {val_loss:.4f} | perplexity {row['val_ppl']:.2f} "
                    f"(first {val_tokens:,} validation tokens)",
                    flush=True,
                )
        log.append(**row)
        if evaluating:
            log.plot(
                args.plot, f"{args.preset} on {os.path.basename(os.path.normpath(args.data or BUILTIN_DIR))}"
            )
        if args.save_every and (step % args.save_every == 0 or step == last_step):
            save_checkpoint(
                ckpt_path, raw_model, optimizer, schedule, config, tokenizer, step, data_position, args, d
            )
            if d.master:
                print(f"step {step:6d} | saved checkpoint {ckpt_path}", flush=True)
    if d.master and losses:
        saved = f"checkpoint {ckpt_path}, " if args.save_every else "no checkpoint (--save-every 0), "
        print(
            f"done: {saved}log {args.log}, loss curve {args.plot}. Validation perplexity above is over the first "
            f"{val_tokens:,} validation tokens; all of them: python eval.py ppl --checkpoint {ckpt_path} "
            f"--data {args.data or os.path.relpath(BUILTIN_DIR)}",
            flush=True,
        )
    return {"losses": losses, "val_losses": val_losses, "step": step, "checkpoint": ckpt_path}


def main(argv: list[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    run_main(main)

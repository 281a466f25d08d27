"""`python -m pe_rlhf <command>`: generate, chat, score, export, train (see `pe_rlhf/cli.py`)."""

from pe_rlhf.cli import run

if __name__ == "__main__":
    run()

"""Data for SFT, reward models and RL prompts: sources -> tokens -> fixed-shape NumPy batches.

    loaded = sources.read_hh_harmless(path)                       # PreferenceExamples
    pairs, stats = tokenize_preferences(loaded.examples, tokenizer, TokenizeOptions(256, 128))
    it = BatchIterator(pairs, 8, functools.partial(batch_preferences, seq_len=384), seed=0)

The tensorflow-datasets builders live in `pe_rlhf.data.tfds_builders`, which
is not imported here (tfds is slow to import).
"""

from pe_rlhf.data.batching import batch_labeled, batch_preferences, batch_prompts, batch_sft, pad_sequences
from pe_rlhf.data.examples import DataError, LabeledExample, Loaded, PreferenceExample, Prompt, PromptResponse
from pe_rlhf.data.iterator import BatchIterator, epoch_order, train_eval_split
from pe_rlhf.data.sources import (default_data_dir, prompts_of, read_hh_harmless, read_labeled_jsonl,
                                  read_preference_jsonl, read_prompts_jsonl, read_sft_jsonl, read_taskmaster,
                                  read_tldr_comparisons, read_tldr_references, sft_from_labeled,
                                  sft_from_preferences)
from pe_rlhf.data.tokenize import (TokenizedLabeled, TokenizedPair, TokenizedSFT, TokenizeOptions, TokenStats,
                                   tokenize_labeled, tokenize_preferences, tokenize_prompts, tokenize_sft)

__all__ = [
    "BatchIterator", "DataError", "LabeledExample", "Loaded", "PreferenceExample", "Prompt", "PromptResponse",
    "TokenizeOptions", "TokenStats", "TokenizedLabeled", "TokenizedPair", "TokenizedSFT",
    "batch_labeled", "batch_preferences", "batch_prompts", "batch_sft", "default_data_dir", "epoch_order",
    "pad_sequences", "prompts_of", "read_hh_harmless", "read_labeled_jsonl", "read_preference_jsonl",
    "read_prompts_jsonl", "read_sft_jsonl", "read_taskmaster", "read_tldr_comparisons", "read_tldr_references",
    "sft_from_labeled", "sft_from_preferences",
    "tokenize_labeled", "tokenize_preferences", "tokenize_prompts", "tokenize_sft", "train_eval_split",
]

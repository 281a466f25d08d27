"""A tiny word-level HF tokenizer: "<pad>"=0, "<eos>"=1, "<bos>"=2, "<unk>"=3, then "a"=4 ... "j"=13."""

WORDS = "a b c d e f g h i j".split()
PAD, EOS, BOS, UNK = 0, 1, 2, 3


def ids(text: str) -> list[int]:
    """Hand reference: the tiny tokenizer's ids of space-separated letters."""
    return [4 + WORDS.index(w) for w in text.split()]


def make_tokenizer(*, bos: bool = True, eos: bool = True, template_bos: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS, "<unk>": UNK} | {w: 4 + i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template_bos:  # like Gemma/Llama: the tokenizer adds BOS itself by default
        tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    special = dict(pad_token="<pad>", unk_token="<unk>")
    if bos:
        special["bos_token"] = "<bos>"
    if eos:
        special["eos_token"] = "<eos>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def make_byte_tokenizer():
    """A byte-level BPE with no merges: every UTF-8 byte is one token (<bos>=256, <eos>=257, <pad>=258).

    Token counts of real text are then `len(text.encode("utf-8"))`, a hand reference.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)} | {"<bos>": 256, "<eos>": 257, "<pad>": 258}
    tok = Tokenizer(models.BPE(vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")

"""`load_backbone`: a model name that is neither known nor a path says which known name was meant."""

import pytest

from pe_rlhf.checkpoints.load import load_backbone

KNOWN = "gemma3-270m, tiny, tiny-gemma3, tiny-llama, tiny-qwen2, tiny-qwen3"


@pytest.mark.parametrize("name, meant", [("gemma-3-270m", "gemma3-270m"), ("gemma3_270m", "gemma3-270m"),
                                         ("tiny-lama", "tiny-llama"), ("Tiny", "tiny")])
def test_an_unknown_name_suggests_the_close_known_one(name, meant):
    with pytest.raises(FileNotFoundError) as e:
        load_backbone(name)
    assert str(e.value) == (f"model {name!r}: not a known name and no such file or directory. Did you mean "
                            f"{meant!r}? Give one of {KNOWN}, a Hugging Face checkpoint directory or a .gguf file")


def test_a_name_close_to_nothing_lists_the_known_ones(tmp_path):
    missing = str(tmp_path / "checkpoint")
    with pytest.raises(FileNotFoundError) as e:
        load_backbone(missing)
    assert str(e.value) == (f"model {missing!r}: not a known name and no such file or directory. Give one of "
                            f"{KNOWN}, a Hugging Face checkpoint directory or a .gguf file")


def test_known_names_still_load():
    model, tokenizer = load_backbone("tiny-qwen3")
    assert model.config.family == "qwen3" and tokenizer.bos_token_id == 2

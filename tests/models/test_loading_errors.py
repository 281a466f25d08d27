"""Bad checkpoints fail early with messages that say what is wrong and where."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pe_rlhf.checkpoints import from_pretrained
from pe_rlhf.checkpoints.hf import CheckpointError
from pe_rlhf.models import UnsupportedModelError
from tests.models.helpers import hf_config, random_hf_model

# hidden 64, intermediate 96 (see helpers.TINY); qwen2 so that biases are part of the name table.
UP = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    directory = tmp_path_factory.mktemp("good")
    random_hf_model(hf_config("qwen2")).save_pretrained(directory)
    return directory


@pytest.fixture
def checkpoint(good_checkpoint, tmp_path):
    """A private copy of the good checkpoint for a test to damage."""
    directory = tmp_path / "ckpt"
    shutil.copytree(good_checkpoint, directory)
    return directory


def _edit_config(directory, **changes):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _edit_tensors(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def test_good_checkpoint_loads(good_checkpoint):
    """The copies below differ from a checkpoint that loads in exactly one respect."""
    model, _ = from_pretrained(str(good_checkpoint))
    assert model.config.family == "qwen2"
    assert model.layers[1].mlp.up_proj.kernel[...].shape == (64, 96)


def test_path_that_does_not_exist(tmp_path):
    missing = str(tmp_path / "no_such_checkpoint")
    with pytest.raises(FileNotFoundError) as e:
        from_pretrained(missing)
    assert missing in str(e.value)
    assert "Hugging Face checkpoint directory or a .gguf file" in str(e.value)


@pytest.mark.parametrize("model_type", ["mistral", "my_own_arch"])
def test_unknown_model_type(checkpoint, model_type):
    _edit_config(checkpoint, model_type=model_type)
    with pytest.raises(UnsupportedModelError) as e:
        from_pretrained(str(checkpoint))
    message = str(e.value)
    assert str(checkpoint / "config.json") in message
    assert repr(model_type) in message
    for supported in ("gemma3_text", "llama", "qwen2", "qwen3"):
        assert supported in message


def test_missing_tensor(checkpoint):
    _edit_tensors(checkpoint, lambda t: t.pop(UP))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(str(checkpoint))
    message = str(e.value)
    assert UP in message
    assert str(checkpoint) in message
    assert "model.layers.0.mlp.up_proj.weight" not in message  # only what is actually missing


def test_wrongly_shaped_norm(checkpoint):
    file = _edit_tensors(checkpoint, lambda t: t.update({"model.norm.weight": np.ones((65,), np.float32)}))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(str(checkpoint))
    message = str(e.value)
    assert str(file) in message
    assert "'model.norm.weight'" in message and "final_norm.scale" in message
    assert "(65,)" in message and "(64,)" in message


def test_wrongly_shaped_kernel(checkpoint):
    # HF stores up_proj as [out=96, in=64]; drop one input column.
    _edit_tensors(checkpoint, lambda t: t.update({UP: np.ascontiguousarray(t[UP][:, :63])}))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(str(checkpoint))
    message = str(e.value)
    assert repr(UP) in message and "layers.1.mlp.up_proj.kernel" in message
    # The file's shape and the expected one in the file's [out, in] orientation, and ours for reference.
    assert "has shape (96, 63) in the file" in message and "needs (96, 64) in the file" in message
    assert "(64, 96) in our [in, out] orientation" in message


def test_config_without_safetensors(checkpoint):
    os.remove(checkpoint / "model.safetensors")
    with pytest.raises(FileNotFoundError) as e:
        from_pretrained(str(checkpoint))
    assert str(checkpoint) in str(e.value)
    assert "no *.safetensors files" in str(e.value)


def test_directory_without_config(checkpoint):
    os.remove(checkpoint / "config.json")
    with pytest.raises(FileNotFoundError) as e:
        from_pretrained(str(checkpoint))
    assert str(checkpoint) in str(e.value) and "no config.json" in str(e.value)


def test_invalid_config_json_names_file_and_line(checkpoint):
    (checkpoint / "config.json").write_text('{\n  "model_type": "qwen2",\n  "hidden_size": ,\n}\n')
    with pytest.raises(CheckpointError) as e:
        from_pretrained(str(checkpoint))
    assert f"{checkpoint / 'config.json'}:3: invalid JSON" in str(e.value)


def test_file_of_unknown_kind(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ValueError, match="not a directory and not a .gguf file") as e:
        from_pretrained(str(path))
    assert str(path) in str(e.value)


def test_damaged_gguf(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 60)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(str(path))
    assert str(path) in str(e.value) and "not a readable GGUF file" in str(e.value)


def test_damaged_safetensors_names_the_file(checkpoint):
    with open(checkpoint / "model.safetensors", "wb") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(str(checkpoint))
    assert str(checkpoint / "model.safetensors") in str(e.value) and "not a readable safetensors" in str(e.value)


def test_bad_head_counts_name_the_config_file(checkpoint):
    import json

    path = checkpoint / "config.json"
    config = json.loads(path.read_text())
    config["num_key_value_heads"] = 3
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError) as e:
        from_pretrained(str(checkpoint))
    assert str(path) in str(e.value) and "multiple of num_kv_heads (3)" in str(e.value)

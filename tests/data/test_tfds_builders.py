"""tensorflow-datasets builders built from the local data directory into a tmp data_dir."""

import os
import subprocess
import sys

import pytest

from pe_rlhf.data import sources


def test_importing_pe_rlhf_data_does_not_import_tfds_or_gin():
    code = ("import sys, pe_rlhf.data; "
            "print(sorted(m for m in ('tensorflow_datasets', 'gin', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data):
    from pe_rlhf.data import tfds_builders

    data_dir = str(tmp_path_factory.mktemp("tfds"))
    return data_dir, {name: tfds_builders.load(name, data_dir=data_dir, manual_dir=shared_data)
                      for name in ("hh_harmless", "taskmaster_coffee", "taskmaster_ticketing")}


def test_counts_of_the_built_sets(built):
    _, sets = built
    assert len(sets["hh_harmless"]) == 1800
    coffee, ticketing = sets["taskmaster_coffee"], sets["taskmaster_ticketing"]
    assert len(coffee) == 3228 and sum(e.label == 1.0 for e in coffee) == 2775
    assert len(ticketing) == 3500 and sum(e.label == 1.0 for e in ticketing) == 552


def test_built_sets_hold_what_the_readers_read(built, shared_data):
    _, sets = built
    key = lambda e: (e.prompt, e.response, e.label)  # noqa: E731
    direct = sources.read_taskmaster(os.path.join(shared_data, sources.TASKMASTER_COFFEE)).examples
    assert sorted(sets["taskmaster_coffee"], key=key) == sorted(direct, key=key)
    hh = sources.read_hh_harmless(os.path.join(shared_data, sources.HH_HARMLESS)).examples
    by_text = lambda e: (e.prompt, e.chosen)  # noqa: E731
    assert sorted(sets["hh_harmless"], key=by_text) == sorted(hh, key=by_text)


def test_registered_names_and_split_slicing(built):
    import tensorflow_datasets as tfds

    data_dir, _ = built
    source = tfds.data_source("taskmaster_ticketing", data_dir=data_dir, split="train[:10%]")
    assert len(source) == 350
    assert set(source[0]) == {"prompt", "response", "label"}
    with pytest.raises(ValueError, match="'mnist' is not one of this module's builders"):
        from pe_rlhf.data import tfds_builders

        tfds_builders.load("mnist", data_dir=data_dir)


def test_missing_source_files_name_where_it_looked(tmp_path, monkeypatch):
    from pe_rlhf.data import tfds_builders
    from pe_rlhf.data.examples import DataError

    monkeypatch.setenv("PE_RLHF_DATA_DIR", str(tmp_path / "elsewhere"))
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "unrelated.txt").write_text("x")
    with pytest.raises(DataError, match=f"taskmaster_coffee: taskmaster/coffee is in none of "
                                        f"\\['{tmp_path}/manual', '{tmp_path}/elsewhere'\\]"):
        tfds_builders.load("taskmaster_coffee", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "manual"))
    # no manual directory at all (tfds's default): only the data directory is tried
    with pytest.raises(DataError, match=f"is in none of \\['{tmp_path}/elsewhere'\\]"):
        tfds_builders.load("taskmaster_coffee", data_dir=str(tmp_path / "tfds"), manual_dir=str(tmp_path / "none"))


def test_plain_tfds_build_falls_back_to_the_data_directory(tmp_path, monkeypatch, shared_data):
    import tensorflow_datasets as tfds

    from pe_rlhf.data import tfds_builders  # noqa: F401  (registers the builders)

    monkeypatch.setenv("PE_RLHF_DATA_DIR", shared_data)
    builder = tfds.builder("hh_harmless", data_dir=str(tmp_path))
    builder.download_and_prepare()  # no download config: tfds's manual dir does not exist
    assert builder.info.splits["train"].num_examples == 1800

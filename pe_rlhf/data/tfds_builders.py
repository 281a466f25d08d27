"""tensorflow-datasets builders for the real sets, built from local files (no network).

Importing this module imports tensorflow_datasets (slow; `pe_rlhf.data` does not
import it) and registers three builders:

    hh_harmless           prompt, chosen, rejected        1,800 pairs
    taskmaster_coffee     prompt, response, label         3,228 examples (2,775 good)
    taskmaster_ticketing  prompt, response, label         3,500 examples (552 good)

Each has one split, "train", holding the whole source file(s) (the HH file is
HH-RLHF's harmless-base *test* split); slice it (`"train[:90%]"`) or use
`iterator.train_eval_split`. Text is split and rendered by `sources`, exactly as
the plain readers do; tfds stores the examples in its own (deterministic,
hashed-key) order, not file order. Files are written as array_record, which needs no
TensorFlow: read them with `tfds.data_source(name, data_dir=...)` or `load`.

The source files are looked up in the manual directory
(`tfds.download.DownloadConfig(manual_dir=...)`) and then in
`sources.default_data_dir()` (../shared/data beside the checkout, or
$PE_RLHF_DATA_DIR). A named set is one gin line, e.g.
`pe_rlhf.data.tfds_builders.load.name = "taskmaster_coffee"`.
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow_datasets as tfds

from pe_rlhf.data import sources
from pe_rlhf.data.examples import DataError, LabeledExample, PreferenceExample

_INSTRUCTIONS = """\
Point the manual directory at the project's data directory (the one holding
hh_harmless/pairs.jsonl.gz and taskmaster/<coffee|ticketing>/reward_*.json, see
../shared/data/README.md), or set $PE_RLHF_DATA_DIR; nothing is downloaded.
"""


class _LocalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Shared plumbing: array_record files and the local source lookup."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First version, read from the local data directory."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = _INSTRUCTIONS
    SOURCE = ""  # path below the data directory
    DESCRIPTION = ""
    HOMEPAGE = ""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # tfds looks for a checksums file beside the builder's code; nothing is
        # downloaded here, and its package probe needs `importlib_resources`,
        # which tensorflow-datasets 4.9.10 uses without declaring it.
        return None

    def __init__(self, *, file_format=None, **kwargs):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _features(self) -> dict:
        raise NotImplementedError

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, description=self.DESCRIPTION, homepage=self.HOMEPAGE,
                                     features=tfds.features.FeaturesDict(self._features()))

    def _source(self, dl_manager) -> str:
        roots = [sources.default_data_dir()]
        try:
            roots.insert(0, os.fspath(dl_manager.manual_dir))
        except AssertionError:  # tfds asserts that a manual directory exists and is not empty
            pass
        for root in roots:
            if os.path.exists(os.path.join(root, self.SOURCE)):
                return os.path.join(root, self.SOURCE)
        raise DataError(f"{self.name}: {self.SOURCE} is in none of {roots}. {_INSTRUCTIONS}")

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(self._source(dl_manager))}


class HhHarmless(_LocalBuilder):
    """Anthropic HH-RLHF harmless-base pairs split into prompt and responses."""

    SOURCE = sources.HH_HARMLESS
    DESCRIPTION = "Anthropic HH-RLHF harmless-base test pairs (MIT), prompt = shared dialogue prefix."
    HOMEPAGE = "https://github.com/anthropics/hh-rlhf"

    def _features(self):
        return {"prompt": tfds.features.Text(), "chosen": tfds.features.Text(), "rejected": tfds.features.Text()}

    def _generate_examples(self, path):
        for i, e in enumerate(sources.read_hh_harmless(path).examples):
            yield i, {"prompt": e.prompt, "chosen": e.chosen, "rejected": e.rejected}


class _Taskmaster(_LocalBuilder, skip_registration=True):
    DESCRIPTION = "Taskmaster reward examples (CC BY 4.0) rendered to text, label 1.0 good / 0.0 bad."
    HOMEPAGE = "https://github.com/google-research-datasets/Taskmaster"

    def _features(self):
        return {"prompt": tfds.features.Text(), "response": tfds.features.Text(),
                "label": tfds.features.Scalar(dtype=np.float32)}

    def _generate_examples(self, path):
        for i, e in enumerate(sources.read_taskmaster(path).examples):
            yield i, {"prompt": e.prompt, "response": e.response, "label": e.label}


class TaskmasterCoffee(_Taskmaster):
    """Taskmaster-4 (2024) coffee ordering reward examples."""

    SOURCE = sources.TASKMASTER_COFFEE


class TaskmasterTicketing(_Taskmaster):
    """Taskmaster-3 (2020) movie ticketing reward examples."""

    SOURCE = sources.TASKMASTER_TICKETING


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def load(name: str, *, data_dir: str, split: str = "train", manual_dir: str | None = None) -> tuple:
    """The examples of a registered set (built into `data_dir` on first use), as `PreferenceExample`s
    (hh_harmless) or `LabeledExample`s (taskmaster_*)."""
    cls = tfds.builder_cls(name)
    if not issubclass(cls, _LocalBuilder):
        raise ValueError(f"{name!r} is not one of this module's builders (hh_harmless, taskmaster_coffee, "
                         "taskmaster_ticketing)")
    builder = cls(data_dir=data_dir)
    config = tfds.download.DownloadConfig(manual_dir=manual_dir or sources.default_data_dir())
    builder.download_and_prepare(download_config=config)
    rows = builder.as_data_source(split=split)
    if isinstance(builder, HhHarmless):
        return tuple(PreferenceExample(_text(r["prompt"]), _text(r["chosen"]), _text(r["rejected"])) for r in rows)
    return tuple(LabeledExample(_text(r["prompt"]), _text(r["response"]), float(r["label"])) for r in rows)

"""Example types shared by the data sources, the tokeniser and the batchers.

Text examples are small frozen dataclasses; a `Loaded` bundles what a reader
returned with what it skipped, so nothing is dropped silently.
"""

from __future__ import annotations

import dataclasses


class DataError(ValueError):
    """A data file that cannot be used; the message names the file, the line or example, and the field."""


@dataclasses.dataclass(frozen=True)
class PreferenceExample:
    """A prompt with a preferred (`chosen`) and a dispreferred (`rejected`) response.

    `margin` is an optional preference strength added inside the Bradley-Terry
    sigmoid (0.0 = plain pairwise loss). `group` names the set a pair came from when
    several are mixed (e.g. "helpful" or "harmless" in the `hh` set), so results can be
    reported per set; "" when there is one.
    """

    prompt: str
    chosen: str
    rejected: str
    margin: float = 0.0
    group: str = ""


@dataclasses.dataclass(frozen=True)
class LabeledExample:
    """A prompt and one response with a scalar label (1.0 good, 0.0 bad for binary reward models)."""

    prompt: str
    response: str
    label: float


@dataclasses.dataclass(frozen=True)
class PromptResponse:
    """A prompt and the response to imitate (supervised fine-tuning)."""

    prompt: str
    response: str


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A prompt alone (RL and evaluation prompt sets)."""

    prompt: str


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What a reader returns: the examples, where they came from, and what it skipped (and why).

    `skipped_identical` counts preference pairs whose chosen and rejected
    responses were the same text: they carry no preference and are left out.
    `skipped_long` counts JSONL lines over the readers' byte limit (`sources.MAX_LINE_BYTES`), left unread.
    """

    examples: tuple
    source: str
    skipped_identical: int = 0
    skipped_long: int = 0

    def __len__(self) -> int:
        return len(self.examples)

    def summary(self) -> str:
        line = f"{self.source}: {len(self.examples)} examples"
        if self.skipped_identical:
            line += f", {self.skipped_identical} pairs skipped (chosen == rejected)"
        if self.skipped_long:
            line += f", {self.skipped_long} lines skipped (over the byte limit)"
        return line

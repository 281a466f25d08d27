"""Every relative link in the Markdown docs points at a file that exists, and at an anchor that file has.

Anchors are GitHub's: a heading's text, lower-cased, punctuation dropped, spaces to hyphens (a repeated
heading gets -1, -2, ...), or an explicit `<a id="...">` / `<a name="...">`. Fenced code is skipped.
"""

import os
import re
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_HTML_ANCHOR = re.compile(r"""<a\s+(?:id|name)=["']([^"']+)["']""")
_LINK = re.compile(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")  # a link's text may span lines
_CODE_SPAN = re.compile(r"`[^`]*`")


def _markdown_files():
    """The tracked .md files; outside a git checkout, every .md file under the repository."""
    out = subprocess.run(["git", "ls-files", "*.md"], cwd=REPO, capture_output=True, text=True)
    if out.returncode == 0 and out.stdout.strip():
        return out.stdout.split()
    return sorted(
        os.path.relpath(os.path.join(d, f), REPO)
        for d, dirs, files in os.walk(REPO)
        if not any(part.startswith(".") for part in os.path.relpath(d, REPO).split(os.sep) if part != ".")
        for f in files
        if f.endswith(".md")
    )


def _prose_lines(path):
    """(line number, text) of the lines outside fenced code blocks."""
    fenced = False
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if _FENCE.match(line):
                fenced = not fenced
                continue
            if not fenced:
                yield n, line.rstrip("\n")


def slug(heading):
    """GitHub's anchor for a heading's text."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text only
    text = text.strip().lower().replace("`", "").replace("*", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    seen, out = {}, set()
    for _, line in _prose_lines(path):
        out.update(_HTML_ANCHOR.findall(line))
        m = _HEADING.match(line)
        if m:
            s = slug(m.group(2))
            k = seen.get(s, 0)
            seen[s] = k + 1
            out.add(s if k == 0 else f"{s}-{k}")
    return out


def test_slug_matches_github():
    assert slug("LoRA against full tuning in RL: HH helpful + harmless") == (
        "lora-against-full-tuning-in-rl-hh-helpful--harmless"
    )
    assert slug("SFT: the vocabulary cross-entropy fused (tokamax)") == (
        "sft-the-vocabulary-cross-entropy-fused-tokamax"
    )
    assert slug("Reward-model step") == "reward-model-step"


@pytest.mark.parametrize("path", _markdown_files())
def test_relative_links_resolve(path):
    broken = []
    for n, line in _prose_lines(path):
        for target in _LINK.findall(_CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            dest = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(os.path.join(REPO, dest)):
                broken.append(f"{path}:{n}: {target} (no file {dest})")
            elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
                broken.append(f"{path}:{n}: {target} (no heading or <a id> '{anchor}' in {dest})")
    assert not broken, "broken links in the docs:\n" + "\n".join(broken)

"""Every relative link in README.md and docs/*.md points at a file (and a heading) that exists."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^(```|~~~).*?^\1[^\n]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1", re.DOTALL)
INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$", re.MULTILINE)
HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$", re.MULTILINE)
#: A URL with a scheme (https:, mailto:) is not a relative link.
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
#: A path named in prose or code, e.g. `docs/bench/ward.json` or docs/benchmarks.md.
NAMED_PATH = re.compile(r"(?<![\w/.-])docs/[\w./{},-]*[\w}]")


def prose(text: str) -> str:
    """The text without fenced code blocks and code spans, where links are not links."""
    return CODE_SPAN.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub("", path.read_text())):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    text = prose(path.read_text())
    return INLINE_LINK.findall(text) + REFERENCE_LINK.findall(text)


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(path):
        if SCHEME.match(target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(dest, path.parent)}")
    return broken


def expand(named: str) -> list[str]:
    """`saturation.{json,png}` names two files."""
    m = re.search(r"\{([^}]*)\}", named)
    if m is None:
        return [named]
    return [
        p
        for alt in m.group(1).split(",")
        for p in expand(named[: m.start()] + alt + named[m.end() :])
    ]


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_points_at_something_that_exists(doc: Path) -> None:
    assert broken_links(doc) == []


def test_the_checker_catches_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## The Redis bus: `redis://` (kept)\n")
    doc = tmp_path / "doc.md"
    doc.write_text(
        "# Doc\n\n## Same heading\n\n## Same heading\n\n"
        "[ok](other.md#the-redis-bus-redis-kept) [ok](#same-heading-1) [web](https://x.org/a.md)\n"
        "![gone](img/none.png) [bad](other.md#nope) [self](#missing)\n"
        "`[in code](none.md)`\n\n```\n[in a block](none.md)\n```\n"
        "[ref]: gone.md\n"
    )
    assert broken_links(doc) == [
        "img/none.png: no such file",
        "other.md#nope: no heading #nope in other.md",
        "#missing: no heading #missing in doc.md",
        "gone.md: no such file",
    ]


def test_every_docs_path_named_in_docs_and_code_exists() -> None:
    """Paths such as `docs/bench/ward.json` in prose, code spans or source comments."""
    history = ROOT / "docs" / "benchmarks-history.md"  # names raw runs kept in git history only
    sources = [*(d for d in DOCS if d != history), ROOT / "Makefile"]
    sources += sorted((ROOT / "src").rglob("*.py"))
    missing = []
    for source in sources:
        for named in NAMED_PATH.findall(source.read_text()):
            for path in expand(named.rstrip(".,")):
                if "*" not in path and not (ROOT / path).exists():
                    missing.append(f"{source.relative_to(ROOT)}: {path}")
    assert missing == []

"""The documentation stays true to the code it describes.

The README's configuration table is the documentation of `Settings`: they are kept equal.
The README and docs/design.md link to files and sections that exist, the design's paths
name files that exist, every `(docs/design.md, "Section")` pointer in the code names one of
its headings, and the code's imports go the one way the design says.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.config import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DESIGN = ROOT / "docs" / "design.md"
DOCS = (README, DESIGN)

CODE_FOLDERS = ("producer", "worker", "ops", "tests", "bench", "imagecheck")
"""Where code comments live; with the top-level schema.sql and Makefile."""

LAYERS = ("producer", "worker", "ops.actions", "ops.service", "ops.cli")
"""The relay's packages in the order their imports go (docs/design.md, "Imports"): each may
import from itself and the ones before it, never from one after it."""


def test_every_setting_is_documented_and_every_documented_setting_exists() -> None:
    documented = set(re.findall(r"^\| `(POSTBACK_[A-Z_]+)` \|", README.read_text(), re.M))
    actual = {f"POSTBACK_{name.upper()}" for name in Settings.model_fields}
    assert documented == actual


def test_documented_defaults_match_the_code() -> None:
    rows = re.findall(r"^\| `POSTBACK_([A-Z_]+)` \| (.+?) \|", README.read_text(), re.M)
    assert rows
    for name, shown in rows:
        assert shown == _as_documented(Settings.model_fields[name.lower()].default), name


def _as_documented(value: object) -> str:
    if value is None:
        return "unset"
    return f"`{value:g}`" if isinstance(value, float) else f"`{value}`"


def _lines_outside_code(text: str) -> Iterator[str]:
    """The lines of a markdown text outside fenced code blocks, where `#` is no heading and
    `[x](y)` no link."""
    fenced = False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced:
            yield line


def _headings(doc: Path) -> list[str]:
    return [
        found[2].strip()
        for line in _lines_outside_code(doc.read_text())
        if (found := re.match(r"(#{1,6}) (.+)", line))
    ]


def _anchors(doc: Path) -> set[str]:
    """The fragment each heading of `doc` gets on GitHub: lower case, punctuation dropped,
    spaces as hyphens, and -1, -2... on a repeated one."""
    anchors: set[str] = set()
    for heading in _headings(doc):
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def _links(doc: Path) -> Iterator[str]:
    for line in _lines_outside_code(doc.read_text()):
        without_code = re.sub(r"`[^`]*`", "", line)
        yield from re.findall(r"\]\(([^)\s]+)\)", without_code)


def test_every_relative_link_leads_to_a_file_and_heading_that_exist() -> None:
    checked = 0
    for doc in DOCS:
        for link in _links(doc):
            if re.match(r"[a-z][a-z+.-]*:", link):  # https:, mailto:
                continue
            path, _, anchor = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            assert target.exists(), f"{doc.name}: {link}: no such file"
            if anchor:
                assert target.suffix == ".md", f"{doc.name}: {link}: a fragment of a non-page"
                assert anchor in _anchors(target), f"{doc.name}: {link}: no such heading"
            checked += 1
    assert checked > 20  # the README alone has more: the links were found


def _code_files() -> Iterator[Path]:
    """Every file of code, but this one, which spells the patterns it looks for."""
    yield ROOT / "schema.sql"
    yield ROOT / "Makefile"
    for folder in CODE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".sql") and path != Path(__file__).resolve():
                yield path


def test_design_pointers_in_the_code_name_headings_of_the_design() -> None:
    headings = set(_headings(DESIGN))
    pointers = 0
    for path in _code_files():
        # A comment may wrap between the file and the section: `docs/design.md,\n# "Name"`.
        for section in re.findall(r'docs/design\.md,[\s#]*"([^"]+)"', path.read_text()):
            assert section in headings, f"{path.relative_to(ROOT)}: no heading {section!r}"
            pointers += 1
    assert pointers >= 5


def test_every_markdown_file_the_code_names_exists() -> None:
    """A comment that sends the reader to a document the repository does not have (a
    design document left outside it, a renamed page) fails here."""
    for path in _code_files():
        for name in re.findall(r"[\w./-]*\w\.md\b", path.read_text()):
            assert (ROOT / name).exists(), f"{path.relative_to(ROOT)} names {name}"


def test_every_path_the_design_names_exists() -> None:
    roots = {entry.name for entry in ROOT.iterdir()}
    named = re.findall(r"`([^`\s]+)`", DESIGN.read_text())
    paths = [
        name
        for name in named
        if re.fullmatch(r"[\w.-]+(/[\w.-]+)*/?", name)
        and (name.split("/")[0] in roots if "/" in name else re.search(r"\.(py|sql|md)$", name))
    ]
    assert len(paths) > 20
    for name in paths:
        if "/" in name:
            assert (ROOT / name).exists(), f"docs/design.md names {name}: no such path"
        else:  # a module named within its folder's paragraph: it exists somewhere
            assert any(".venv" not in found.parts for found in ROOT.rglob(name)), (
                f"docs/design.md names {name}: no such file"
            )


def _layer(module: str) -> int | None:
    """The place in LAYERS of the package a module belongs to; None outside the relay."""
    for index in reversed(range(len(LAYERS))):
        if module == LAYERS[index] or module.startswith(LAYERS[index] + "."):
            return index
    return None


def test_imports_go_one_way() -> None:
    for layer, package in enumerate(LAYERS):
        folder = ROOT.joinpath(*package.split("."))
        for path in sorted(folder.rglob("*.py")):
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            if _layer(module) != layer:
                continue  # a subpackage with a layer of its own
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    names = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                else:
                    continue
                for name in names:
                    assert name.split(".")[0] not in ("tests", "bench", "imagecheck"), module
                    imported = _layer(name)
                    assert imported is None or imported <= layer, f"{module} imports {name}"

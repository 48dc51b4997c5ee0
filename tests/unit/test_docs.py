"""The docs stay beside the code: the generated configuration reference is current, every link
between the pages resolves, and every code comment citing the ComfyUI protocol notes names a
section that exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from proxy import config_reference
from proxy.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = sorted([ROOT / "README.md", *DOCS.glob("*.md")])
LINK = re.compile(r"\]\(([^)\s]+)\)")
CITATION = re.compile(r"docs/([\w-]+\.md)#([\w-]+)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def anchors(page: Path) -> set[str]:
    """GitHub's anchors of a Markdown page's headings."""
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    out = set()
    for heading in re.findall(r"^#+ (.+)$", text, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_configuration_reference_is_current() -> None:
    committed = (DOCS / "configuration.md").read_text(encoding="utf-8")
    assert committed == config_reference.render(), "docs/configuration.md is stale: run `make docs`"
    assert config_reference.main(["--check", "--output", str(DOCS / "configuration.md")]) == 0


def test_check_mode_reports_a_stale_page(tmp_path: Path) -> None:
    stale = tmp_path / "configuration.md"
    stale.write_text("# Configuration reference\n", encoding="utf-8")
    assert config_reference.main(["--check", "--output", str(stale)]) == 1
    assert config_reference.main(["--output", str(stale)]) == 0
    assert config_reference.main(["--check", "--output", str(stale)]) == 0


def test_every_key_of_the_model_is_in_the_reference() -> None:
    page = config_reference.render()
    for table in config_reference.tables():
        assert f"## `{table.header}`" in page
        for row in table.rows:
            assert row.description, f"{table.header} {row.key}"
    # Spot checks across sections and nesting levels, read from the model itself.
    server = Settings().server
    assert f"| `port` | integer | `{server.port}` |" in page
    assert "## `[auth.jwt]`" in page
    assert "## `[[upstream.instances]]`" in page
    assert "## `[roles.<name>]`" in page
    assert "## `[auth.oidc.providers.<name>]`" in page
    assert "## `[auth.forward_auth]`" in page
    assert "## `[scheduler]`" in page


def test_an_undocumented_key_fails_the_generator() -> None:
    class Undocumented(BaseModel):
        documented: int = 1
        """Has a description."""
        bare: int = 2

    fields = Undocumented.model_fields
    assert config_reference._description(Undocumented, "documented", fields["documented"])
    with pytest.raises(config_reference.UndocumentedKeyError, match="bare"):
        config_reference._description(Undocumented, "bare", fields["bare"])


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_between_pages_resolve(page: Path) -> None:
    text = FENCE.sub("", page.read_text(encoding="utf-8"))
    for target in LINK.findall(text):
        if re.match(r"^[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.name}: {target}: no such file"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name}: {target}: no such section"


def test_protocol_citations_name_existing_sections() -> None:
    cited = 0
    for folder in ("proxy", "tests", "bench"):
        for source in (ROOT / folder).rglob("*.py"):
            for page, anchor in CITATION.findall(source.read_text(encoding="utf-8")):
                cited += 1
                assert anchor in anchors(DOCS / page), f"{source}: docs/{page}#{anchor}"
    assert cited >= 18
    assert not [
        s
        for s in (ROOT / "proxy").rglob("*.py")
        if "protocol doc " in s.read_text(encoding="utf-8")
    ], "cite docs/comfyui-protocol.md#<section>, not a 'protocol doc' outside the repository"


LAYOUT_ENTRY = re.compile(r"^( *)([\w.]+(?:/|\.py)(?:, [\w.]+(?:/|\.py))*)(?:\s|$)")


def layout_names() -> set[str]:
    """The paths under ``proxy/`` that docs/architecture.md's layout names (``auth/``,
    ``limits/quota/``, ``app.py``), read from the tree's indentation (two spaces a level)."""
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    block = re.search(r"^## Layout\n.*?^```\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert block is not None, "docs/architecture.md: no ## Layout with a tree"
    stack: list[str] = []
    out = set()
    for line in block.group(1).splitlines():
        entry = LAYOUT_ENTRY.match(line)
        if entry is None:
            continue  # a description's continuation
        depth = len(entry.group(1)) // 2
        del stack[depth:]
        for name in entry.group(2).split(", "):
            if stack[:1] == ["proxy/"]:
                out.add("".join(stack[1:]) + name)
        if entry.group(2).endswith("/"):
            stack.append(entry.group(2))
    return out


def test_architecture_layout_matches_the_package_tree() -> None:
    proxy = ROOT / "proxy"
    packages = {
        d.relative_to(proxy).as_posix() + "/"
        for d in proxy.rglob("*")
        if d.is_dir() and (d / "__init__.py").is_file()
    }
    modules = {m.name for m in proxy.glob("*.py") if m.name != "__init__.py"}
    named = layout_names()
    named_packages = {n for n in named if n.endswith("/")}
    assert packages - named_packages == set(), "packages missing from docs/architecture.md"
    assert named_packages - packages == set(), "docs/architecture.md names no such package"
    assert modules - named == set(), "top-level modules missing from docs/architecture.md"
    stale = {n for n in named if n.endswith(".py") and not (proxy / n).is_file()}
    assert stale == set(), "docs/architecture.md names no such module"


SOURCE_PATH = re.compile(r"(?<![\w/])proxy/(?:\w+/)*\w+(?:\.\w+)?/?")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_source_paths_named_in_docs_exist(page: Path) -> None:
    named = set(SOURCE_PATH.findall(page.read_text(encoding="utf-8")))
    assert {n for n in named if not (ROOT / n).exists()} == set(), f"{page.name}: moved or gone"


def test_readme_links_every_docs_page() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.partition("## Documentation\n")[2]
    linked = set(re.findall(r"\]\(docs/([\w-]+\.md)\)", table))
    assert {p.name for p in DOCS.glob("*.md")} - linked == set(), "README's Documentation table"


def test_readme_is_a_first_screen() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert lines[3].startswith("make run ")
    assert lines[4].startswith("make test ")
    assert len(lines) <= 250

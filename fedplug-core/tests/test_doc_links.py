"""The README and docs/ link to pages and sections that exist, and docs/index.md maps every page."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.fast

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return {slug(match) for match in re.findall(r"^#+ (.+)$", text, flags=re.MULTILINE)}


def links(page: Path) -> list[str]:
    text = re.sub(r"```.*?```", "", page.read_text(encoding="utf-8"), flags=re.DOTALL)
    return [target for target in LINK.findall(text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_link_reaches_a_page_and_section_that_exist(page: Path) -> None:
    for target in links(page):
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"
        if anchor:
            assert linked.suffix == ".md", f"{page.relative_to(ROOT)}: {target} is an anchor in a non-markdown file"
            assert anchor in anchors(linked), (
                f"{page.relative_to(ROOT)} links to {target}; {linked.name} has no such section "
                f"(its anchors: {', '.join(sorted(anchors(linked)))})"
            )


def test_the_index_maps_every_page_and_the_readme_links_the_index() -> None:
    index = DOCS / "index.md"
    linked = {(DOCS / target.partition("#")[0]).resolve() for target in links(index)}
    for page in DOCS.glob("*.md"):
        if page != index:
            assert page.resolve() in linked, f"docs/index.md does not link {page.name}"
    assert "docs/index.md" in links(ROOT / "README.md")


def test_the_readme_is_a_landing_page() -> None:
    """About 150-200 lines; its test command is the one CI runs; the fast lane is there too."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 200, "the README grows again: move the details into docs/"
    assert "\nbash tests/run-all.sh\n" in text, "CI runs the README's test command: keep it"
    assert "-m fast fedplug-core/tests" in text
    assert "bash tests/run-all.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_the_link_check_finds_a_missing_section() -> None:
    assert slug("Strategies: strategy.<param>") == "strategies-strategyparam"
    assert slug("Where a run's time goes") == "where-a-runs-time-goes"
    assert "no-such-section" not in anchors(DOCS / "run-config.md")

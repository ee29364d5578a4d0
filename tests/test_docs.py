"""The repository stands alone: every ``docs/<file>.md#<anchor>`` cited by code, configs or Markdown exists, and
nothing cites a document outside the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [p for folder in ("gex", "baselines", "bench", "experiments", "configs", "tests", "docs", "results")
           for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".yaml", ".md")] + [ROOT / "README.md",
                                                                                        ROOT / "Makefile"]
CITATION = re.compile(r"docs/([\w/.-]+\.md)(?:#([\w-]+))?")


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.*?)\s*$", path.read_text(), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_docs_citation_resolves():
    broken = []
    for source in SOURCES:
        for file, anchor in CITATION.findall(source.read_text(errors="ignore")):
            target = ROOT / "docs" / file
            if not target.is_file() or (anchor and anchor not in _anchors(target)):
                broken.append(f"{source.relative_to(ROOT)}: docs/{file}#{anchor}")
    assert not broken, broken


def test_nothing_cites_a_document_outside_the_repository():
    outside = re.compile(r"\bSPEC [AB]\d|SPEC\.md|DESIGN\.md|STYLE\.md|\.\./shared")
    hits = [str(p.relative_to(ROOT)) for p in SOURCES if p != Path(__file__) and outside.search(p.read_text())]
    assert not hits, hits

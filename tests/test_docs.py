"""Every section the code cites (`docs/ARCHITECTURE.md §2.4`) exists in docs/ARCHITECTURE.md."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"
SOURCES = ("qwen35_mlx", "convert", "tests", "benchmarks")


def headings() -> set[str]:
    """Section numbers of the document's headings: "## 2. ..." -> "2", "### 2.4 ..." -> "2.4"."""
    text = ARCHITECTURE.read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.MULTILINE))


def citations() -> dict[str, set[str]]:
    """Section number -> files citing it (the code writes § only for this document)."""
    cited: dict[str, set[str]] = {}
    for folder in SOURCES:
        for file in (ROOT / folder).rglob("*"):
            if file.suffix not in (".py", ".metal", ".h") or "__pycache__" in file.parts:
                continue
            for number in re.findall(r"§(\d+(?:\.\d+)?)", file.read_text(encoding="utf-8")):
                cited.setdefault(number, set()).add(str(file.relative_to(ROOT)))
    return cited


def test_every_cited_section_exists():
    cited = citations()
    assert {"2.4", "3", "5", "6", "9"} <= set(cited)  # the scan found the comments
    missing = {number: sorted(files) for number, files in cited.items() if number not in headings()}
    assert missing == {}

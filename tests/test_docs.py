"""The documentation stays true to the repository: the configuration reference is a fresh render of the schemas,
the README stays a ten-minute read, every relative link resolves, and no text cites a notes file users lack."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from conftest import REPO

from cfaudit.config import SCHEMA
from cfaudit.docs_config import render

README_MAX_LINES = 250
# Built from parts so that this file does not contain the phrase it looks for.
PRIVATE_CITATION = ("facts " + "\u00a7").encode()
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def test_configuration_reference_is_current():
    page = REPO / "docs" / "configuration.md"
    assert page.exists() and page.read_text() == render(SCHEMA.parent), (
        "docs/configuration.md differs from the schemas: run `make docs` "
        "(or `cd workflow_scripts && python -m cfaudit.docs_config`) and commit the result")


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def repository_files() -> list[str]:
    """Tracked files plus untracked ones git does not ignore (what a commit of this tree would hold)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, check=True).stdout
    return sorted({name for name in out.decode().split("\0") if name})


def test_no_citation_of_a_private_notes_file():
    hits = [name for name in repository_files()
            if (REPO / name).is_file() and PRIVATE_CITATION in (REPO / name).read_bytes()]
    assert not hits, f"cite the primary source (paper, DOI, repository + file) instead of the notes file in {hits}"


def markdown_pages() -> list:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (http:, mailto:) or an anchor on the same page
        path = target.split("#", 1)[0]
        if not (page.parent / path).exists():
            broken.append(target)
    assert not broken, f"{page.name} links to missing files: {broken}"

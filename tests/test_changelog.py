"""The CHANGELOG is versioned as Keep a Changelog has it, and its newest release is the package's version."""

import re
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SECTIONS = {"Added", "Changed", "Deprecated", "Removed", "Fixed", "Security"}


def _changelog() -> str:
    return (PROJECT_ROOT / "CHANGELOG.md").read_text()


def test_every_release_is_a_version_with_a_date_and_keep_a_changelog_sections():
    releases = re.findall(r"^## (.+)$", _changelog(), flags=re.MULTILINE)
    assert releases[0] == "[Unreleased]"
    for release in releases[1:]:
        assert re.fullmatch(r"\[\d+\.\d+\.\d+\] - \d{4}-\d{2}(-\d{2})?", release), release
    text = _changelog().split("## [0.0.0]")[0]  # the first release predates the sections
    assert set(re.findall(r"^### (.+)$", text, flags=re.MULTILINE)) <= SECTIONS


def test_the_package_version_is_the_next_release_after_the_newest_in_the_changelog():
    version = re.search(r'^version = "(.+)"$', (PROJECT_ROOT / "pyproject.toml").read_text(), re.MULTILINE)[1]
    newest = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", _changelog(), flags=re.MULTILINE)[0]
    # unreleased work is a .dev version of a later release than the newest
    assert version.endswith(".dev0") and tuple(map(int, version[: -len(".dev0")].split("."))) > tuple(
        map(int, newest.split("."))
    )


def test_the_changelog_cites_no_tracker_outside_the_repository():
    assert not re.search(r"(?i)\bissue\s*#?\d+|/issues/|\btask\s+\d+", _changelog())

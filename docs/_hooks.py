"""MkDocs hooks: the benchmark records join the site, and links keep working on both sides.

The pages under ``docs/`` link to files of the repository with paths that are right on GitHub
(``../benchmarks/results/cpu.json``). The site has no repository around it, so this hook

* adds ``benchmarks/README.md`` and every file under ``benchmarks/results/`` to the site, at
  ``benchmarks/...`` (Markdown reports become pages outside the navigation, the rest is copied);
* rewrites each relative link of a page from its repository path to its site path: a target
  under ``docs/`` or ``benchmarks/`` becomes the same file on the site. A link to any other file
  of the repository (``examples/``, ``src/``...) is left alone, and the strict build fails on it:
  show such code with a snippet (``--8<--``) or name it in backticks.
"""

from __future__ import annotations

import posixpath
import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files, InclusionLevel

ROOT = Path(__file__).resolve().parent.parent
SHARED = ("benchmarks/README.md", "benchmarks/results")  # repository paths put on the site
LINK = re.compile(r"(\]\()([^)\s#]+)([^)]*\))")


def on_files(files: Files, config: Any) -> Files:
    """Add the benchmark records to the site, at their repository paths."""
    for shared in SHARED:
        path = ROOT / shared
        for src in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
            uri = src.relative_to(ROOT).as_posix()
            if uri.endswith(".partial.json"):
                continue
            file = File.generated(config, uri, abs_src_path=str(src))
            file.inclusion = InclusionLevel.NOT_IN_NAV
            files.append(file)
    return files


def _repo_path(src_uri: str) -> str:
    """Where a site file lives in the repository."""
    return src_uri if src_uri.startswith("benchmarks/") else "docs/" + src_uri


def _site_path(repo_path: str) -> str | None:
    """Where a repository file lives on the site, or None when the site does not have it."""
    if repo_path.startswith("docs/"):
        return repo_path[len("docs/") :]
    if repo_path.startswith(SHARED):
        return repo_path
    return None


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """Rewrite relative links from repository paths to site paths."""
    here = _repo_path(page.file.src_uri)

    def rewrite(match: re.Match[str]) -> str:
        target = match.group(2)
        if "://" in target or target.startswith(("/", "mailto:")):
            return match.group(0)
        repo_target = posixpath.normpath(posixpath.join(posixpath.dirname(here), target))
        site_target = _site_path(repo_target)
        site_here = _site_path(here)
        if site_target is None or site_here is None:
            return match.group(0)  # not on the site: the strict build reports it
        new = posixpath.relpath(site_target, posixpath.dirname(site_here) or ".")
        return match.group(1) + new + match.group(3)

    return LINK.sub(rewrite, markdown)

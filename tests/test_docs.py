"""The documentation cannot rot: the site builds strictly, and every snippet in it runs.

* Every ```` ```python ```` block of ``README.md`` and ``docs/**/*.md`` runs, a page's blocks in
  order in one namespace (so a page may build on its earlier blocks), in a fresh process per
  page. A block preceded by ``<!-- not run: <why> -->`` is skipped, with its reason.
* Every command in a shell block that runs a script of this repository
  (``python examples/dino_sere.py --preset tiny``, ``torchrun ... examples/ibot_sere.py ...``)
  names a script that exists, and that script's own argument parser accepts the arguments.
* ``mkdocs build --strict`` succeeds: no broken link, anchor or API reference, no page left out
  of the navigation.
* The README, the landing page on PyPI where ``docs/`` does not exist, links to the site with
  absolute links, each to a page that exists.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SITE = "https://sere-loss.readthedocs.io/en/latest/"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>```+)(?P<info>[^\n`]*)$")
NOT_RUN = re.compile(r"<!-- not run: (?P<why>[^>]+?) -->")


def _name(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run this interpreter with ``args``, in ``cwd``, with extra environment variables."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def blocks(path: Path) -> list[tuple[str, int, str, str | None]]:
    """The fenced blocks of a Markdown file: ``(info, first line, text, not-run reason)``."""
    lines = path.read_text().splitlines()
    found = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = len(m["indent"]), m["fence"], m["info"].strip()
        start = i + 1
        j = start
        while j < len(lines) and lines[j].strip() != fence:
            j += 1
        body = textwrap.dedent("\n".join(line[indent:] for line in lines[start:j]))
        before = next((lines[k] for k in range(i - 1, -1, -1) if lines[k].strip()), "")
        skip = NOT_RUN.search(before)
        found.append((info, start + 1, body, skip["why"] if skip else None))
        i = j + 1
    return found


def python_pages() -> list[Path]:
    return [p for p in PAGES if any(info.startswith("python") for info, *_ in blocks(p))]


@pytest.mark.parametrize("page", python_pages(), ids=_name)
def test_python_snippets_run(page: Path, tmp_path: Path) -> None:
    """A page's Python blocks, in order, in one namespace, in a fresh process."""
    script = ["import sys", f"sys.path.insert(0, {str(ROOT / 'examples')!r})", "ns = {}"]
    ran = 0
    for info, line, body, skip in blocks(page):
        if not info.startswith("python") or skip is not None:
            continue
        if body.lstrip().startswith("--8<--"):
            continue  # an excerpt of a file the tests run as a whole
        where = f"{_name(page)}:{line}"
        script.append(f"print('== {where}', flush=True)")
        script.append(f"exec(compile({body!r}, {where!r}, 'exec'), ns)")
        ran += 1
    if not ran:
        pytest.skip("every Python block of this page is an excerpt or marked not run")
    out = _run(["-c", "\n".join(script)], tmp_path, PYTHONPATH=str(ROOT / "src"), MPLBACKEND="Agg")
    assert out.returncode == 0, f"a snippet failed:\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}"


def test_not_run_blocks_say_why() -> None:
    """A skipped block carries its reason, and only Python blocks are marked."""
    for page in PAGES:
        for info, line, _, skip in blocks(page):
            if skip is not None:
                assert info.startswith("python"), f"{_name(page)}:{line}: marks a {info!r} block"
                assert len(skip.split()) >= 3, f"{_name(page)}:{line}: say why it is not run"


SCRIPT = re.compile(r"^(examples|benchmarks|docs)/[\w./-]+\.py$")


INLINE = re.compile(r"`((?:python3?|torchrun|\.venv/bin/python) [^`]+)`")


def shell_lines(page: Path) -> list[tuple[int, str]]:
    """The page's command lines: shell blocks' lines and inline ``python ...`` code spans."""
    found = []
    for info, line, body, _ in blocks(page):
        if info.split(" ")[0] in ("bash", "sh", "shell", "console"):
            text = re.sub(r"\\\n", " ", body)
            found += [(line + k, raw) for k, raw in enumerate(text.splitlines())]
    fenced = False
    for number, raw in enumerate(page.read_text().splitlines(), start=1):
        if FENCE.match(raw):
            fenced = not fenced
        elif not fenced:
            found += [(number, m[1]) for m in INLINE.finditer(raw)]
    return found


def commands() -> list[tuple[str, str, list[str]]]:
    """Each command of the docs that runs a script here: ``(where, script, args)``."""
    found = []
    for page in PAGES:
        for number, raw in shell_lines(page):
            for part in re.split(r"&&|\|\||;|\|", raw.removeprefix("$ ")):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                for k, word in enumerate(words):
                    if SCRIPT.match(word) or ("<" in word and word.endswith(".py")):
                        args = words[k + 1 :]
                        if "..." in args:
                            args = args[: args.index("...")]
                        found.append((f"{_name(page)}:{number}", word, args))
                        break
    return found


CHECK = """
import argparse, json, os, runpy, sys, traceback
class Parsed(BaseException):
    pass
original = argparse.ArgumentParser.parse_args
def parse_args(self, args=None, namespace=None):
    original(self, args, namespace)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_args
failures = []
for where, script, args in json.loads(sys.argv[1]):
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))  # as `python script.py` does
    try:
        runpy.run_path(script, run_name="__main__")
        failures.append(f"{where}: {script} ran without parsing arguments")
    except Parsed:
        pass
    except SystemExit as exc:
        failures.append(f"{where}: {script} {' '.join(args)}: argparse said exit {exc.code}")
    except BaseException:
        failures.append(f"{where}: {script}: {traceback.format_exc(limit=2)}")
print(json.dumps(failures))
"""


def test_shell_commands_parse() -> None:
    """Each documented command names a script that exists, and its parser takes the options."""
    found = commands()
    assert len(found) >= 10, "the docs should show how to run the examples"
    missing = [f"{w}: {s}" for w, s, _ in found if "<" not in s and not (ROOT / s).is_file()]
    assert not missing, f"commands name scripts that do not exist: {missing}"
    runnable = [(w, s, a) for w, s, a in found if "<" not in s]
    out = _run(["-c", CHECK, json.dumps(runnable)], ROOT, PYTHONPATH=str(ROOT / "src"))
    assert out.returncode == 0, out.stderr[-4000:]
    failures = json.loads(out.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(failures) + "\n" + out.stderr[-4000:]


def test_site_builds_strict(tmp_path: Path) -> None:
    """``mkdocs build --strict``: broken links, anchors and API references fail the build."""
    pytest.importorskip("mkdocs", reason="the docs extra: pip install -e '.[docs]'")
    build = ["-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)]
    out = _run(build, ROOT, NO_MKDOCS_2_WARNING="1")
    assert out.returncode == 0, out.stderr[-6000:]
    assert (tmp_path / "api" / "index.html").is_file()


def test_readme_links_are_absolute_and_reach_pages() -> None:
    """The README is PyPI's page too: links are absolute, site links reach existing pages."""
    text = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)  # inline links
    links += re.findall(r"^\[[^\]]+\]:\s*(\S+)", text, flags=re.MULTILINE)  # reference links
    used = set(re.findall(r"\]\[([^\]]+)\]", text))
    defined = set(re.findall(r"^\[([^\]]+)\]:", text, flags=re.MULTILINE))
    assert used <= defined, f"reference links without a target: {sorted(used - defined)}"
    relative = [t for t in links if "://" not in t and not t.startswith(("#", "mailto:"))]
    assert not relative, f"relative links in README.md break on PyPI: {relative}"
    site_links = [t.split("#")[0] for t in links if t.startswith(SITE)]
    assert len(site_links) >= 5, "the README should lead to the site's pages"
    for link in site_links:
        path = link[len(SITE) :].strip("/")
        page = DOCS / (path or "index")
        ok = (page.with_suffix(".md")).is_file() or (page / "index.md").is_file()
        assert ok, f"README links {link}, but docs/ has no page {path or 'index'}"


def test_site_url_is_the_readme_one() -> None:
    """One address for the site: mkdocs.yml's ``site_url`` and the README's links agree."""
    config = (ROOT / "mkdocs.yml").read_text()
    assert f"site_url: {SITE}" in config
    assert SITE in (ROOT / "pyproject.toml").read_text()

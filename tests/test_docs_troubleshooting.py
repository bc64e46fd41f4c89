"""The troubleshooting page names every error and warning a user can meet, and cannot rot.

``docs/troubleshooting.md`` lists each message with what it means and what to do. This test
reads the messages out of the source itself (the AST of ``src/sere_loss/*.py``,
``examples/*.py`` and ``examples/training/*.py``), so a message added, removed or reworded in
the code fails it until the page follows. What counts as a message a user can meet:

* ``raise X("...")`` with a string, an f-string or a ``+`` of those as its first argument;
* a call of a function whose name contains ``warn`` (``warnings.warn``, ``TokenTap._warn_once``)
  with such an argument;
* ``parser.error("...")`` (argparse's refusal, in the trainers);
* ``print("warning: ...")``, and every notice a trainer prints through ``Run.print`` (``self.print(
  "...")``: what ``--resume`` found and did).

Each message becomes a template: its literal chunks, whitespace collapsed, with a placeholder
for every ``{...}`` or other computed part. The page must contain the chunks in order, with at
most ``GAP`` characters where a placeholder was (``<name>``, ``<shape>``... on the page). A
raise whose message the test cannot read (a variable, a call) fails the test too, unless it is
on the allow-list.

The allow-list (``ALLOWED``) is explicit and small: each entry names its file and a fragment of
the one site it exempts, with the reason; an entry that matches no site, or several, fails the
test, so the list cannot keep exemptions for code that changed. Only checks that no call of
the public API or of the trainers' command lines can reach belong there. Internal checks that a
user could reach by editing a trainer are on the page instead, in its last section.

Also here: the page's Python snippets print the errors they provoke, and each ``Output`` block
after a snippet must be exactly what it printed (the snippets themselves run, and assert that
the error is raised, in ``tests/test_docs.py``).
"""

from __future__ import annotations

import ast
import contextlib
import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "troubleshooting.md"
SOURCES = (
    sorted((ROOT / "src" / "sere_loss").glob("*.py"))
    + sorted((ROOT / "examples").glob("*.py"))
    + sorted((ROOT / "examples" / "training").glob("*.py"))
)
# Characters a placeholder may stand for on the page: `<name>`, `'<data>'`, `(<B>, 4)`...
GAP = 120

# (file, a fragment of the message or of the call, why the page need not show it). Each entry
# must match exactly one site.
ALLOWED: dict[tuple[str, str], str] = {
    ("src/sere_loss/tap.py", "warnings.warn(message"): (
        "TokenTap._warn_once passes its caller's message on; the callers' messages (calls of "
        "_warn_once) are checked one by one"
    ),
    ("src/sere_loss/losses.py", "SERELoss has no term"): (
        "unreachable: the constructor refuses alpha = beta = 0, so a SERELoss always has a term"
    ),
    ("src/sere_loss/heads.py", "projections no longer have the same parameters"): (
        "unreachable: the teacher projection is a deep copy of the student's, made in __init__"
    ),
    ("examples/training/data.py", "out of range for"): (
        "Dataset.__getitem__'s IndexError, the sequence protocol: the samplers never ask for an "
        "index outside the dataset"
    ),
    ("examples/seg_data.py", "out of range for {self.length} scenes"): (
        "Dataset.__getitem__'s IndexError, the sequence protocol, as in examples/training/data.py"
    ),
    ("examples/seg_data.py", "out of range for {self.length} images"): (
        "the same IndexError, in the generated segmentation images"
    ),
}
MAX_ALLOWED = 8
# Progress lines a trainer prints through Run.print, which are not notices: (file, fragment of
# the call) -> what the line is. Each must match exactly one site, as the allow-list's entries.
PROGRESS: dict[tuple[str, str], str] = {
    ("examples/training/runs.py", "self.row.items()"): "the per-step row, log.csv's columns",
    ("examples/training/runs.py", "self.print('done:'"): "the closing summary of a finished run",
    ("examples/dino_sere.py", "steps/epoch"): "the start-up banner: preset, processes, steps",
    ("examples/ibot_sere.py", "steps/epoch"): "the start-up banner",
    ("examples/mocov3_sere.py", "steps/epoch"): "the start-up banner",
}


@dataclass(frozen=True)
class Site:
    """One place in the source that raises or warns with a message."""

    file: str
    line: int
    code: str  # the statement's source, for the allow-list and the failure message
    parts: tuple[str | None, ...] | None  # literal chunks, None for a placeholder; None: unread

    @property
    def template(self) -> str:
        """The message as the page would show it, ``<>`` for each placeholder."""
        if self.parts is None:
            return "(a message the test cannot read)"
        return "".join("<>" if p is None else p for p in self.parts)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", text)


def _module_constants(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level ``NAME = <expr>`` assignments (``_PLOT_EXTRA = '...'``)."""
    found: dict[str, ast.expr] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                found[target.id] = node.value
    return found


def _parts(node: ast.expr, constants: dict[str, ast.expr]) -> list[str | None] | None:
    """The literal chunks of a message expression, ``None`` for computed parts.

    ``None`` as the result: not a message the test can read (a variable, a call...).
    """
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        out: list[str | None] = []
        for value in node.values:
            if isinstance(value, ast.Constant) and isinstance(value.value, str):
                out.append(value.value)
            else:
                out.append(None)
        return out
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        left, right = _parts(node.left, constants), _parts(node.right, constants)
        if left is None and right is None:
            return None
        return (left if left is not None else [None]) + (right if right is not None else [None])
    if isinstance(node, ast.Name) and node.id in constants:
        return _parts(constants[node.id], constants)
    return None


def _text_length(node: ast.expr, constants: dict[str, ast.expr]) -> int:
    parts = _parts(node, constants)
    return -1 if parts is None else sum(len(p) for p in parts if p is not None)


def _merge(parts: list[str | None]) -> tuple[str | None, ...]:
    """Adjacent literals joined, whitespace collapsed, runs of placeholders made one."""
    merged: list[str | None] = []
    for part in parts:
        if part is None:
            if not merged or merged[-1] is not None:
                merged.append(None)
        elif merged and merged[-1] is not None:
            merged[-1] = merged[-1] + part  # type: ignore[operator]
        else:
            merged.append(part)
    return tuple(None if p is None else _normalise(p) for p in merged)


def _call_name(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Attribute):
        return func.attr
    if isinstance(func, ast.Name):
        return func.id
    return ""


@functools.lru_cache(maxsize=64)
def sites(name: str, text: str) -> list[Site]:
    """Every raise, warning, argparse error and printed warning with a message in ``text``."""
    tree = ast.parse(text)
    constants = _module_constants(tree)
    found = []
    for node in ast.walk(tree):
        message: ast.expr | None = None
        if isinstance(node, ast.Raise):
            call = node.exc
            if not isinstance(call, ast.Call) or not call.args:
                continue  # a re-raise, or an exception without a message (NotImplementedError)
            message = call.args[0]
        elif isinstance(node, ast.Call):
            called = _call_name(node)
            if "warn" in called.lower():
                # The message is the argument with the most text (_warn_once's first is a key).
                message = max(node.args, key=lambda a: _text_length(a, constants), default=None)
            elif called == "error" and isinstance(node.func, ast.Attribute) and node.args:
                message = node.args[0]  # argparse's parser.error
            elif called == "print" and isinstance(node.func, ast.Attribute) and node.args:
                message = node.args[0]  # a trainer's notice through Run.print (rank 0 only)
            elif called == "print" and node.args:
                parts = _parts(node.args[0], constants)
                if parts and isinstance(parts[0], str) and parts[0].startswith("warning"):
                    message = node.args[0]
        if message is None:
            continue
        parts = _parts(message, constants)
        code = ast.unparse(node)
        found.append(Site(name, node.lineno, code, None if parts is None else _merge(parts)))
    return sorted(found, key=lambda s: s.line)


def pattern(site: Site) -> re.Pattern[str]:
    """A regular expression that finds the message on the page."""
    parts = list(site.parts or ())
    while parts and parts[0] is None:
        parts.pop(0)
    while parts and parts[-1] is None:
        parts.pop()
    gap = f".{{0,{GAP}}}?"
    return re.compile("".join(gap if p is None else re.escape(p) for p in parts), re.DOTALL)


def allowed(site: Site) -> tuple[str, str] | None:
    """The allow-list entry that exempts ``site``, if any."""
    for key in (*ALLOWED, *PROGRESS):
        file, fragment = key
        if site.file == file and (fragment in _normalise(site.code) or fragment in site.template):
            return key
    return None


def check(page: str, sources: dict[str, str]) -> tuple[list[str], list[str]]:
    """``(problems, allow-list entries used)``: what the page misses or the test cannot read."""
    text = _normalise(page)
    problems, used = [], []
    for name, source in sources.items():
        for site in sites(name, source):
            key = allowed(site)
            if key is not None:
                used.append(key)
                continue
            where = f"{site.file}:{site.line}"
            if site.parts is None:
                problems.append(f"{where}: cannot read the message of `{site.code}`")
            elif not any(site.parts):
                problems.append(f"{where}: the message has no literal text: `{site.code}`")
            elif not pattern(site).search(text):
                problems.append(f"{where}: the page does not show {site.template!r}")
    return problems, used


def _sources() -> dict[str, str]:
    return {p.relative_to(ROOT).as_posix(): p.read_text() for p in SOURCES}


def test_every_message_is_on_the_page() -> None:
    problems, _ = check(PAGE.read_text(), _sources())
    assert not problems, (
        "docs/troubleshooting.md misses messages (add an entry: the message with <placeholders>, "
        "what it means, what to do):\n" + "\n".join(problems)
    )


def test_the_allow_list_is_small_and_each_entry_is_used_once() -> None:
    assert len(ALLOWED) <= MAX_ALLOWED, "exempt internal checks sparingly; list them on the page"
    _, used = check(PAGE.read_text(), _sources())
    for key in (*ALLOWED, *PROGRESS):
        count = used.count(key)
        assert count == 1, f"allow-list entry {key} matches {count} sites, not 1"


def test_the_collector_sees_every_kind_of_site() -> None:
    """The sources hold each kind of message the collector reads, and enough of them."""
    found = [site for name, text in _sources().items() for site in sites(name, text)]
    assert len(found) > 150, f"only {len(found)} messages found: is the collector broken?"
    codes = " ".join(site.code for site in found)
    for kind in ("raise ValueError(", "raise SystemExit(", "warnings.warn(", "self._warn_once(",
                 "p.error(", "print(f'warning:", "self.print(f'resumed",
                 "raise ImportError(_PLOT_EXTRA)"):  # fmt: skip
        assert kind in codes, f"no {kind!r} found"


# The check itself can fail: mutations of the page and of the source ---------------------------

NEW_RAISE = """

def _added(value):
    raise ValueError(f"a brand new refusal of {value!r}: do something else")
"""


def test_a_removed_entry_fails_the_check() -> None:
    page = PAGE.read_text()
    message = "alpha and beta are both 0: SERE would add nothing"
    assert message in page
    problems, _ = check(page.replace(message, "alpha and beta"), _sources())
    assert [p for p in problems if "alpha and beta are both 0" in p], problems


def test_a_reworded_source_message_fails_the_check() -> None:
    sources = _sources()
    losses = sources["src/sere_loss/losses.py"]
    old = "but the loss was built for"
    assert old in losses
    sources["src/sere_loss/losses.py"] = losses.replace(old, "whereas the loss expects")
    problems, _ = check(PAGE.read_text(), sources)
    assert [p for p in problems if "whereas the loss expects" in p], problems


def test_a_new_raise_fails_the_check() -> None:
    sources = _sources()
    sources["src/sere_loss/losses.py"] += NEW_RAISE
    problems, _ = check(PAGE.read_text(), sources)
    assert [p for p in problems if "a brand new refusal of" in p], problems


def test_an_unreadable_message_fails_the_check() -> None:
    sources = {"src/sere_loss/x.py": "def f(m):\n    text = m * 2\n    raise ValueError(text)\n"}
    problems, _ = check("", sources)
    assert problems == ["src/sere_loss/x.py:3: cannot read the message of `raise ValueError(text)`"]


def test_placeholders_and_order_matter() -> None:
    source = 'def f(n, k):\n    raise ValueError(f"{n} has {k} channels but the loss was built")\n'
    sources = {"a.py": source}
    assert check("`<name> has <C> channels but the loss was built`", sources)[0] == []
    assert check("`has <C> channels`", sources)[0] != []  # a chunk missing
    assert check("`but the loss was built <name> has <C> channels`", sources)[0] != []  # order


# The snippets' printed output is the Output block the page shows after them ------------------

OUTPUT = 'text title="Output"'
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)


def snippet_outputs(page: str) -> list[tuple[str, str | None]]:
    """Each Python block of the page and the ``Output`` block right after it, if any."""
    blocks = list(FENCE.finditer(page))
    out: list[tuple[str, str | None]] = []
    for k, block in enumerate(blocks):
        if not block["info"].strip().startswith("python"):
            continue
        after = blocks[k + 1] if k + 1 < len(blocks) else None
        shown = None
        if (
            after is not None
            and after["info"].strip() == OUTPUT
            and not page[block.end() : after.start()].strip()
        ):
            shown = after["body"]
        out.append((block["body"], shown))
    return out


def test_the_shown_output_is_what_the_snippets_print(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pairs = snippet_outputs(PAGE.read_text())
    assert len(pairs) >= 3, "the page should reproduce the most common errors"
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    namespace: dict[str, object] = {}
    for body, shown in pairs:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            exec(compile(body, str(PAGE), "exec"), namespace)
        if shown is not None:
            assert buffer.getvalue().rstrip() == shown.rstrip(), body

"""Check every page of the built site in a real browser at 1400 px, and screenshot it.

    python docs/check_pages.py                       # build the site, check it, write the report
    python docs/check_pages.py --site site --out DIR  # check a site built already

Each page of the site (every ``index.html`` that mkdocs wrote, the benchmark reports included)
is loaded by headless Chromium in a window 1400 px wide, from a local HTTP server on the
loopback address. The page's own JavaScript measures, after its formulas are typeset:

* every code block, table, API signature and display formula: it fails when its content is
  wider than its box (a line cut off or scrolled sideways) or when the box sticks out of the
  page's column;
* every image: it fails when it did not load, or is wider than the column;
* every formula: it fails when KaTeX could not typeset it (``.katex-error``), or when a formula
  was left as TeX.

A screenshot of each whole page goes to ``--out`` (``/tmp/sere-pages`` by default, not
committed), and the report to ``docs/check_pages.txt`` (committed): one line per page with
what was checked, then every failure. The exit status is 1 when anything failed.

It needs Debian's ``chromium`` (``apt-get install chromium``) and nothing else: the Chrome
DevTools protocol is spoken over a WebSocket written here with the standard library. A browser
is not in CI, so the tests do not run this script; run it after changing the site's look.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import http.server
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import urlopen

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "docs" / "check_pages.txt"
WIDTH, HEIGHT = 1400, 900
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
    f"--window-size={WIDTH},{HEIGHT}",
]

# Runs in the page; returns what was checked and what failed.
MEASURE = r"""
(() => {
  // The content column, before the table of contents (Material's tables reach into its margin).
  const column = document.querySelector(".md-content") || document.body;
  const right = column.getBoundingClientRect().right + 1;
  const failures = [];
  const counts = {};
  const snippet = (el) => (el.innerText || el.alt || el.src || "").trim()
    .split("\n")[0].slice(0, 90);
  const check = (kind, el, box) => {
    counts[kind] = (counts[kind] || 0) + 1;
    box = box || el;
    const inner = el.scrollWidth, outer = box.clientWidth;
    const rect = box.getBoundingClientRect();
    if (inner > outer + 1) {
      failures.push(`${kind} ${inner} px wide in a box of ${outer} px: ${snippet(el)}`);
    } else if (rect.right > right) {
      failures.push(`${kind} ends at ${Math.round(rect.right)} px, past the column's `
        + `${Math.round(right)} px: ${snippet(el)}`);
    }
  };
  const wrapped = [];
  document.querySelectorAll(".md-content pre > code").forEach((el) => {
    check("code block", el, el.parentElement);
    // Lines that wrap (docs/assets/extra.css lets them): not a failure, but listed.
    const style = el.style.whiteSpace;
    el.style.whiteSpace = "pre";
    if (el.scrollWidth > el.clientWidth + 1) wrapped.push(snippet(el));
    el.style.whiteSpace = style;
  });
  counts["code block with wrapped lines"] = wrapped.length;
  document.querySelectorAll(".md-content table").forEach((el) => {
    const wrap = el.closest(".md-typeset__scrollwrap") || el.parentElement;
    counts["table"] = (counts["table"] || 0) + 1;
    if (wrap.scrollWidth > wrap.clientWidth + 1 || wrap.getBoundingClientRect().right > right) {
      failures.push(`table ${wrap.scrollWidth} px wide in a box of ${wrap.clientWidth} px: `
        + snippet(el));
    }
  });
  document.querySelectorAll(".doc-signature").forEach((el) => check("signature", el));
  document.querySelectorAll(".katex-display").forEach((el) => check("display formula", el));
  document.querySelectorAll(".md-content img").forEach((el) => {
    counts["image"] = (counts["image"] || 0) + 1;
    if (!el.complete || el.naturalWidth === 0) {
      failures.push(`image did not load: ${el.getAttribute("src")}`);
    } else if (el.getBoundingClientRect().right > right) {
      failures.push(`image wider than the column: ${el.getAttribute("src")}`);
    }
  });
  counts["formula"] = document.querySelectorAll(".arithmatex").length;
  document.querySelectorAll(".katex-error").forEach((el) =>
    failures.push(`formula KaTeX could not typeset: ${el.title || snippet(el)}`));
  document.querySelectorAll(".arithmatex:not([data-typeset])").forEach((el) =>
    failures.push(`formula left as TeX: ${snippet(el)}`));
  return {counts, failures, wrapped, height: document.documentElement.scrollHeight};
})()
"""


class WebSocket:
    """The client side of RFC 6455, enough for the DevTools protocol: text frames, masked."""

    def __init__(self, url: str) -> None:
        parts = urlparse(url)
        self.sock = socket.create_connection((parts.hostname, parts.port), timeout=120)
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET {parts.path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)
        if b" 101 " not in head.split(b"\r\n")[0]:
            raise ConnectionError(f"no WebSocket at {url}: {head[:80]!r}")

    def _read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("the browser closed the connection")
            data += chunk
        return data

    def send(self, text: str) -> None:
        """Send one text frame, masked as a client must."""
        payload = text.encode()
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x81, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x81, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x81, 0x80 | 127, n)
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def receive(self) -> str:
        """The next message, its fragments joined; pings are skipped."""
        message = b""
        while True:
            first, second = self._read(2)
            n = second & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._read(2))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._read(8))
            payload = self._read(n)
            opcode = first & 0x0F
            if opcode == 0x9:  # ping: answer, then go on reading
                continue
            message += payload
            if first & 0x80:  # the last fragment
                return message.decode()


class Browser:
    """Headless Chromium driven through the DevTools protocol, one page at a time."""

    def __init__(self, executable: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="sere-chromium-")
        self.process = subprocess.Popen(
            [
                executable,
                *CHROMIUM_FLAGS,
                "--remote-debugging-port=0",
                f"--user-data-dir={self.profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = Path(self.profile) / "DevToolsActivePort"
        for _ in range(300):
            if port_file.is_file() and port_file.read_text().strip():
                break
            time.sleep(0.1)
        else:
            self.close()
            raise RuntimeError(f"{executable} did not open its DevTools port in 30 s")
        port = port_file.read_text().split()[0]
        with urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as reply:
            targets = json.load(reply)
        page = next(t for t in targets if t["type"] == "page")
        self.ws = WebSocket(page["webSocketDebuggerUrl"])
        self.next_id = 0
        self.call("Page.enable")
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=WIDTH,
            height=HEIGHT,
            deviceScaleFactor=1,
            mobile=False,
        )

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one command and return its result, skipping the events in between."""
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.receive())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def evaluate(self, expression: str) -> Any:
        """Run ``expression`` in the page; return its value (awaited if a promise)."""
        result = self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in result:
            raise RuntimeError(f"the page's script failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        """Load ``url`` and wait until it is loaded and its formulas are typeset."""
        self.call("Page.navigate", url=url)
        deadline = time.monotonic() + 30
        ready = (
            "document.readyState === 'complete' && "
            "!document.querySelector('.arithmatex:not([data-typeset])')"
        )
        while time.monotonic() < deadline:
            if self.evaluate(ready):
                break
            time.sleep(0.1)
        # Images and fonts: wait until every image has loaded or failed.
        self.evaluate(
            "Promise.all([document.fonts.ready, ...Array.from(document.images)"
            ".map(i => i.complete ? 0 : new Promise(r => { i.onload = i.onerror = r; }))])"
        )
        time.sleep(0.3)

    def screenshot(self, path: Path, height: int) -> None:
        """Write the page, ``height`` px of it, to ``path`` as a PNG."""
        shot = self.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1},
        )
        path.write_bytes(base64.b64decode(shot["data"]))

    def close(self) -> None:
        """Stop the browser and remove its profile."""
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)


@contextlib.contextmanager
def serve(site: Path) -> Iterator[str]:
    """Serve ``site`` on the loopback address; yield its base URL."""
    handler = functools.partial(QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Serve files without a log line per request."""

    def log_message(self, format: str, *args: Any) -> None:
        """Log nothing."""
        pass


def pages(site: Path) -> list[str]:
    """The site's pages, as paths relative to its root (``""`` for the home page)."""
    found = []
    for index in sorted(site.rglob("index.html")):
        rel = index.parent.relative_to(site).as_posix()
        if rel.startswith(("assets", "search")):
            continue
        found.append("" if rel == "." else rel + "/")
    return found


def build(site: Path) -> None:
    """``mkdocs build --strict`` into ``site``."""
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)]
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"mkdocs build failed:\n{done.stderr[-4000:]}")


def check(site: Path, out: Path, executable: str) -> list[str]:
    """Check every page of ``site``; return the report's lines."""
    out.mkdir(parents=True, exist_ok=True)
    lines, failed, wraps = [], [], []
    browser = Browser(executable)
    try:
        with serve(site) as base:
            for rel in pages(site):
                browser.open(base + rel)
                found = browser.evaluate(MEASURE)
                name = rel.rstrip("/") or "index"
                browser.screenshot(out / (name.replace("/", "__") + ".png"), found["height"])
                counts = ", ".join(f"{n} {k}" for k, n in sorted(found["counts"].items()) if n)
                verdict = f"{len(found['failures'])} FAILED" if found["failures"] else "ok"
                lines.append(f"{name}: {verdict} ({counts or 'nothing to measure'})")
                failed += [f"{name}: {f}" for f in found["failures"]]
                wraps += [f"{name}: {w}" for w in found["wrapped"]]
    finally:
        browser.close()
    header = [
        f"Every page of the site at {WIDTH} px in headless Chromium (docs/check_pages.py).",
        f"{len(lines)} pages, {len(failed)} failures.",
        "",
    ]
    listed = ["", "Failures:", *failed] if failed else []
    if wraps:
        listed += ["", "Code blocks with lines that wrap at this width (not failures):", *wraps]
    return header + lines + listed


def main(argv: list[str] | None = None) -> int:
    """Command line: ``--site``, ``--out``, ``--report``, ``--chromium``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, help="a built site (default: build one now)")
    parser.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "sere-pages")
    parser.add_argument("--report", type=Path, default=REPORT, help="where the report goes")
    parser.add_argument("--chromium", default="chromium", help="the browser's executable")
    args = parser.parse_args(argv)
    executable = shutil.which(args.chromium)
    if executable is None:
        raise SystemExit(f"{args.chromium} not found: apt-get install chromium")
    with tempfile.TemporaryDirectory() as scratch:
        site = args.site
        if site is None:
            site = Path(scratch) / "site"
            build(site)
        lines = check(site, args.out, executable)
    args.report.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"screenshots in {args.out}; report in {args.report}")
    return 1 if any("FAILED" in line for line in lines) else 0


if __name__ == "__main__":
    sys.exit(main())

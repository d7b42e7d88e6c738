"""Make the README's screenshots: the demo's terminal view and the dashboard page.

    python scripts/screenshots.py            # writes docs/img/demo-terminal.{svg,png}, docs/img/dashboard.png

Runs the demo in-process (the same `Demo` that `meshcore demo` runs), waits until u3 has been
ejected while failing (the most telling moment), then renders the live view with rich's SVG
export and loads the dashboard in headless chromium (`--screenshot`). The terminal PNG is the
SVG rendered by the same chromium. Needs Debian's `chromium` for the PNGs; the SVG is written
without it.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import shutil
import sys
import tempfile
from pathlib import Path

import anyio
import anyio.to_thread

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from meshcore._demo._scenario import FAIL_AT, RECOVER_AT, Demo, make_plan  # noqa: E402
from meshcore._demo._view import render  # noqa: E402

WIDTH = 118  # terminal columns of the rendered view


def svg_size(svg: Path) -> tuple[int, int]:
    import re

    match = re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg.read_text())
    return (math.ceil(float(match[1])), math.ceil(float(match[2]))) if match else (1200, 800)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    """Headless chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`:
    commands on fd 3, answers on fd 4, each a JSON message ending in a NUL byte), so the page
    can run in real time for a while before the screenshot (its rates need real time between
    two polls of /state). Synchronous: run it in a worker thread."""

    def __init__(self, path: str, profile: str) -> None:
        import os
        import subprocess

        cmd_r, self._cmd_w = os.pipe()
        self._res_r, res_w = os.pipe()

        def wire() -> None:  # in the child: fd 3 = commands, fd 4 = answers
            os.dup2(cmd_r, 3)
            os.dup2(res_w, 4)

        self.proc = subprocess.Popen(
            [path, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--hide-scrollbars", "--remote-debugging-pipe", "about:blank"],
            preexec_fn=wire, close_fds=False,  # noqa: PLW1509 - started before any thread stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(res_w)
        self._buffer = b""
        self._id = 0

    def call(self, method: str, session: str | None = None, **params: object) -> dict:
        import json
        import os

        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._cmd_w, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self._buffer:
                chunk = os.read(self._res_r, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            answer = json.loads(raw)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def screenshot(self, url: str, out: Path, width: int, height: int, wait: float) -> None:
        import base64
        import time

        target = self.call("Target.createTarget", url="about:blank")
        session = self.call("Target.attachToTarget", targetId=target["targetId"], flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", session, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)
        self.call("Page.enable", session)
        self.call("Page.navigate", session, url=url)
        time.sleep(wait)
        shot = self.call("Page.captureScreenshot", session, format="png")
        out.write_bytes(base64.b64decode(shot["data"]))
        self.call("Target.closeTarget", targetId=target["targetId"])

    def close(self) -> None:
        import os

        with contextlib.suppress(Exception):  # it may already be gone
            self.call("Browser.close")
        try:
            self.proc.wait(10)
        except Exception:  # noqa: BLE001
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        os.close(self._res_r)


async def main(out_dir: Path, duration: float) -> None:
    import io

    from rich.console import Console

    out_dir.mkdir(parents=True, exist_ok=True)
    path = chromium()
    with tempfile.TemporaryDirectory(prefix="meshcore-shots-") as profile:
        # Started before the demo's threads exist (it is spawned with a preexec_fn).
        browser = Browser(path, profile) if path else None
        try:
            demo = Demo(make_plan(), duration=duration, rate=50, admin="127.0.0.1:0")
            async with demo, anyio.create_task_group() as tg:
                tg.start_soon(demo.run)
                # the moment to capture: u3 failing and ejected, some traffic history behind it
                with anyio.fail_after(duration + 10):
                    while not (demo.ejections >= 1
                               and demo.elapsed >= (FAIL_AT + RECOVER_AT) / 2 * duration):
                        await anyio.sleep(0.05)
                demo.sample()
                console = Console(record=True, width=WIDTH, force_terminal=True,
                                  color_system="truecolor", file=io.StringIO())
                console.print(render(demo))
                svg = out_dir / "demo-terminal.svg"
                console.save_svg(str(svg), title="meshcore demo")
                print(f"wrote {svg}")
                if browser is not None:
                    dash = out_dir / "dashboard.png"
                    await anyio.to_thread.run_sync(browser.screenshot, demo.dashboard, dash, 1400, 700, 2.5)
                    print(f"wrote {dash}")
                    term = out_dir / "demo-terminal.png"
                    width, height = svg_size(svg)
                    # rich's SVG asks for Fira Code from a CDN; offline, chromium hides the text
                    # while it waits for that font, so render a copy that uses local fonts only.
                    local = Path(profile) / "terminal.svg"
                    local.write_text(re.sub(r"@font-face \{[^}]*\}", "", svg.read_text()))
                    await anyio.to_thread.run_sync(browser.screenshot, local.as_uri(), term,
                                                   width, height, 0.5)
                    print(f"wrote {term}")
                else:
                    print("chromium not found: PNGs not written (apt-get install chromium)")
                tg.cancel_scope.cancel()
        finally:
            if browser is not None:
                browser.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "img")
    parser.add_argument("--duration", type=float, default=20.0)
    ns = parser.parse_args()
    anyio.run(main, ns.out, ns.duration, backend="trio")

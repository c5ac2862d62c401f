"""Debian's Chromium, headless, driven over the DevTools protocol (a WebSocket): load a page,
collect its console errors and exceptions, evaluate JavaScript in it, take a screenshot.

::

    async with Chromium() as browser:
        page = await browser.load(Path("report.html"))
        n = await page.evaluate("document.querySelectorAll('svg').length")
        await page.screenshot(Path("shot.png"))
        assert not page.errors

Tools that download their own browser cannot reach one here; Debian's ``chromium`` package
(``scripts/setup.sh`` installs it) is driven directly. Started with a new empty profile and
without its background networking (this machine's network is closed: it would try, and
fail, at every start); stopped by its PID and waited for.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import re
import shutil
import signal
import tempfile
from pathlib import Path

import aiohttp

BINARY = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-extensions", "--disable-default-apps", "--mute-audio",
         "--window-size=1280,900", "--remote-debugging-port=0", "about:blank"]


class Page:
    """One tab, attached over its own DevTools WebSocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse):
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.events: dict[str, list[dict]] = {}
        self.waiters: dict[str, asyncio.Event] = {}
        #: console errors, uncaught exceptions and failed loads, as text
        self.errors: list[str] = []
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            data = json.loads(msg.data)
            if "id" in data:
                fut = self.pending.pop(data["id"], None)
                if fut is not None and not fut.done():
                    if "error" in data:
                        fut.set_exception(RuntimeError(f"DevTools: {data['error']}"))
                    else:
                        fut.set_result(data.get("result", {}))
                continue
            method, params = data.get("method", ""), data.get("params", {})
            self.events.setdefault(method, []).append(params)
            if method == "Runtime.exceptionThrown":
                self.errors.append(params["exceptionDetails"].get("text", "exception"))
            elif method == "Runtime.consoleAPICalled" and params.get("type") == "error":
                self.errors.append(" ".join(str(a.get("value", a.get("description")))
                                            for a in params.get("args", [])))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                self.errors.append(params["entry"].get("text", ""))
            if method in self.waiters:
                self.waiters[method].set()

    async def send(self, method: str, **params) -> dict:
        i = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        async with asyncio.timeout(30):
            return await fut

    async def event(self, method: str, timeout: float = 30) -> dict:
        """The first ``method`` event (already seen, or the next)."""
        event = self.waiters.setdefault(method, asyncio.Event())
        async with asyncio.timeout(timeout):
            while not self.events.get(method):
                event.clear()
                await event.wait()
        return self.events[method][0]

    async def evaluate(self, expression: str):
        """``expression``'s value (JSON-serializable), evaluated in the page."""
        r = await self.send("Runtime.evaluate", expression=expression, returnByValue=True,
                            awaitPromise=True)
        if "exceptionDetails" in r:
            raise RuntimeError(f"in the page: {r['exceptionDetails'].get('text')}: "
                               f"{r['result'].get('description')}")
        return r["result"].get("value")

    async def screenshot(self, path: Path) -> Path:
        """A PNG of the whole page (not only the window)."""
        r = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        path.write_bytes(base64.b64decode(r["data"]))
        return path

    async def close(self) -> None:
        self.reader.cancel()
        await asyncio.wait([self.reader])
        await self.ws.close()


class Chromium:
    """A headless Chromium process with a new profile: ``async with Chromium() as b``."""

    async def __aenter__(self) -> "Chromium":
        self.profile = tempfile.mkdtemp(prefix="migrator-chromium-")
        self.pages: list[Page] = []
        self.proc = await asyncio.create_subprocess_exec(
            BINARY, f"--user-data-dir={self.profile}", *FLAGS,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, start_new_session=True)
        try:
            async with asyncio.timeout(60):
                while True:
                    line = (await self.proc.stderr.readline()).decode(errors="replace")
                    if not line:
                        raise RuntimeError("chromium exited before it listened for DevTools")
                    m = re.search(r"DevTools listening on (ws://\S+)", line)
                    if m:
                        break
            self.http = f"http://{m.group(1).split('/')[2]}"
            # the rest of its stderr is drained, so that it never blocks on a full pipe
            self.drain = asyncio.ensure_future(self.proc.stderr.read())
            self.session = aiohttp.ClientSession()
        except BaseException:
            await self._stop()
            raise
        return self

    async def load(self, path: Path, timeout: float = 60) -> Page:
        """A new tab showing ``path`` (a file), after its load event."""
        async with self.session.put(f"{self.http}/json/new?about:blank") as r:
            target = await r.json()
        page = Page(await self.session.ws_connect(target["webSocketDebuggerUrl"],
                                                  max_msg_size=0))
        self.pages.append(page)                 # closed on leaving
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        page.events.clear()                   # about:blank's, if any: only this page's count
        page.errors.clear()
        await page.send("Page.navigate", url=path.resolve().as_uri())
        await page.event("Page.loadEventFired", timeout)
        return page

    async def _stop(self) -> None:
        if self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)     # its zygotes and renderers too
            except ProcessLookupError:
                pass
            await self.proc.wait()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def __aexit__(self, *exc) -> None:
        try:
            for page in self.pages:
                await page.close()
            if hasattr(self, "session"):
                await self.session.close()
            if hasattr(self, "drain"):
                self.drain.cancel()
                await asyncio.wait([self.drain])
        finally:
            await self._stop()

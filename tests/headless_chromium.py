"""A real headless Chromium, driven over the DevTools protocol, for tests that check pages as a user sees them.

Debian's chromium is installed by scripts/setup_browser.sh. The browser runs with a fresh profile and
everything that would reach the network turned off; the test talks to it on the loopback interface.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
QUIET_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               "--disable-default-apps", "--disable-extensions", "--mute-audio",
               "--disable-dev-shm-usage")  # containers often have a tiny /dev/shm
STARTUP_TIMEOUT_S = 60  # two shared cores: a cold start can take a while


def chromium_missing_reason() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not os.access(CHROMIUM, os.X_OK):
        return f"{CHROMIUM} is not installed and scripts/setup_browser.sh could not install it"
    try:
        import websocket  # noqa: F401  (websocket-client, from requirements-test.txt)
    except ImportError:
        return "the websocket-client package is missing (pip install -r requirements-test.txt)"
    return None


class BrowserError(RuntimeError):
    pass


class HeadlessChromium:
    """One browser with one page. ``send`` calls a DevTools method; events are kept in ``events``."""

    def __init__(self, profile_dir: Path, window_size: tuple[int, int] = (1280, 900)):
        import websocket

        profile_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = profile_dir.parent / "chromium.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [CHROMIUM, *QUIET_FLAGS, f"--user-data-dir={profile_dir}", "--remote-debugging-port=0",
                 "--remote-debugging-address=127.0.0.1", f"--window-size={window_size[0]},{window_size[1]}",
                 "about:blank"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        try:
            port = self._wait_for_port(profile_dir / "DevToolsActivePort")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as reply:
                pages = [t for t in json.load(reply) if t.get("type") == "page"]
            if not pages:
                raise BrowserError("chromium started without a page")
            self.socket = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=60,
                                                      suppress_origin=True)
        except BaseException:
            self._stop_process()
            raise
        self.events: list[dict] = []
        self._ids = itertools.count(1)

    def _wait_for_port(self, port_file: Path) -> int:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise BrowserError(f"chromium exited with {self.process.returncode}; see {self.log_path}")
            if port_file.exists():
                first_line = port_file.read_text().splitlines()[:1]
                if first_line and first_line[0].isdigit():
                    return int(first_line[0])
            time.sleep(0.05)
        raise BrowserError(f"chromium did not open its DevTools port in {STARTUP_TIMEOUT_S} s; see {self.log_path}")

    def send(self, method: str, **params) -> dict:
        message_id = next(self._ids)
        self.socket.send(json.dumps({"id": message_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == message_id:
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def wait_for_event(self, method: str) -> dict:
        for event in self.events:
            if event["method"] == method:
                return event
        while True:
            message = json.loads(self.socket.recv())
            if "method" in message:
                self.events.append(message)
                if message["method"] == method:
                    return message

    def open(self, url: str) -> None:
        """Load ``url`` and wait for its load event, recording console messages and requests from the start."""
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")
        self.events.clear()
        self.send("Page.navigate", url=url)
        self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page (promises are awaited)."""
        reply = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in reply:
            raise BrowserError(f"page script failed: {reply['exceptionDetails']}")
        return reply["result"].get("value")

    def press(self, key: str, code: str, key_code: int) -> None:
        """A real key press, as the keyboard would send it to the focused page."""
        for kind in ("keyDown", "keyUp"):
            self.send("Input.dispatchKeyEvent", type=kind, key=key, code=code, windowsVirtualKeyCode=key_code,
                      nativeVirtualKeyCode=key_code)

    def console_errors(self) -> list[str]:
        """Console errors, uncaught exceptions and failed loads seen since the page was opened."""
        errors = []
        for event in self.events:
            params = event.get("params", {})
            if event["method"] == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
            elif event["method"] == "Runtime.exceptionThrown":
                details = params.get("exceptionDetails", {})
                errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
            elif event["method"] == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
                errors.append(params["entry"].get("text", ""))
        return errors

    def requested_urls(self) -> list[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))
        return path

    def _stop_process(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def close(self) -> None:
        try:
            self.socket.close()
        finally:
            self._stop_process()

    def __enter__(self) -> HeadlessChromium:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

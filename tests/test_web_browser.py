"""The web view in a real headless browser (issue 23 §4): ``ironflow-celery web`` started as
a real process on a real PostgreSQL, each page loaded by Debian's ``chromium`` (installed
with apt-get when missing and running as root; skipped with the reason when it cannot be),
its rendered DOM checked and a screenshot taken; then chromium, driven over the DevTools
protocol, clicks retry and discard on the dead-letter page (its cookie, the form's CSRF
token, HTTP Basic) and the rows change in PostgreSQL.

Screenshots go to the test's temporary directory; with ``IRONFLOW_WEB_SCREENSHOTS=docs/web``
they replace the ones docs/web.md shows.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

from ironflow_celery import install
from ironflow_celery.engine.runtime import runtime_of
from ironflow_celery.web import hash_password
from tests.e2e import BIN, REPO, Processes, free_port, make_env
from tests.e2e_apps.ops_app import Delivered, OpsDemoWorkflow, Submit
from tests.waiting import wait_for_progress

pytestmark = pytest.mark.e2e

T = "ops_demo"
USER, PASSWORD = "operator", "browser-test"
MAX_ATTEMPTS = 3
SIZE = "1100,720"


def _install_chromium() -> str:
    """Debian's chromium: found, or installed with apt-get when running as root."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("chromium is not installed and apt-get cannot install it (not root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for argv in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"could not install chromium ({' '.join(argv)}): {done.stderr[-500:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed no chromium binary")
    return found


@pytest.fixture(scope="module")
def chromium() -> str:
    return _install_chromium()


def _browse(chromium: str, url: str, *args: str, tmp: Path) -> str:
    """Load `url` in a fresh headless chromium; its stdout (the DOM with --dump-dom)."""
    profile = tmp / f"profile-{uuid.uuid4().hex[:6]}"
    argv = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
        "--no-first-run", "--disable-extensions", "--disable-dev-shm-usage",
        f"--user-data-dir={profile}", f"--window-size={SIZE}", *args, url,
    ]  # fmt: skip
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


class Browser:
    """Headless chromium driven over the DevTools protocol on a pipe
    (``--remote-debugging-pipe``: JSON messages ending in NUL on fds 3 and 4), so no
    client library and no debugging port are needed."""

    def __init__(self, chromium: str, profile: Path) -> None:
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        argv = [
            chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--no-first-run", "--disable-extensions", "--disable-dev-shm-usage",
            f"--user-data-dir={profile}", f"--window-size={SIZE}", "--remote-debugging-pipe",
            "about:blank",
        ]  # fmt: skip
        profile.mkdir(parents=True, exist_ok=True)
        self.log = profile / "chromium.log"
        # bash (dash takes one-digit fds only) puts the pipe ends on the fds chromium
        # expects, then becomes chromium.
        self.proc = subprocess.Popen(
            ["bash", "-c", f'exec "$@" 3<&{to_chrome_r} 4>&{from_chrome_w}', "bash", *argv],
            pass_fds=(to_chrome_r, from_chrome_w),
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
            start_new_session=True,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict[str, Any]] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)[
            "sessionId"
        ]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)

    def _read(self) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._from_chrome], [], [], 120)
            assert ready, "chromium said nothing for 120 s"
            chunk = os.read(self._from_chrome, 1 << 16)
            assert chunk, "chromium closed its DevTools pipe:\n" + self.log.read_text()[-3000:]
            self._buffer += chunk
        message, _, self._buffer = self._buffer.partition(b"\0")
        return dict(json.loads(message))

    def call(self, method: str, *, session: bool = False, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        while True:
            reply = self._read()
            if reply.get("id") == self._next_id:
                assert "error" not in reply, (method, reply["error"])
                return dict(reply.get("result", {}))
            self.events.append(reply)

    def wait_for_load(self) -> None:
        """Until the page's load event (one already received counts)."""
        while True:
            for i, event in enumerate(self.events):
                if event.get("method") == "Page.loadEventFired":
                    del self.events[: i + 1]
                    return
            self.events.append(self._read())

    def open(self, url: str) -> None:
        self.events.clear()
        self.call("Page.navigate", session=True, url=url)
        self.wait_for_load()

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    def submit(self, expression: str) -> None:
        """Run `expression` (which submits a form) and wait for the page it leads to."""
        self.events.clear()
        self.js(expression)
        self.wait_for_load()

    def screenshot(self, path: Path) -> None:
        data = self.call("Page.captureScreenshot", session=True, format="png")["data"]
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        with contextlib.suppress(AssertionError, OSError):
            self.call("Browser.close")
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


def _dead_letter(db: sa.Engine, workflow_id: str) -> uuid.UUID:
    with db.begin() as conn:
        return conn.execute(
            sa.text(
                "UPDATE ironflow.outbox SET attempts = :n, dead_lettered_at = now(), "
                "last_error = 'PermanentEffectError: recipient unreachable' "
                "WHERE workflow_id = :wid RETURNING id"
            ),
            {"n": MAX_ATTEMPTS, "wid": workflow_id},
        ).scalar_one()


def row_state(db: sa.Engine, row_id: uuid.UUID) -> tuple[int, Any]:
    with db.connect() as conn:
        found = conn.execute(
            sa.text("SELECT attempts, dead_lettered_at FROM ironflow.outbox WHERE id = :id"),
            {"id": row_id},
        ).one()
    return int(found[0]), found[1]


def _row_id(db: sa.Engine, workflow_id: str) -> uuid.UUID:
    with db.connect() as conn:
        return conn.execute(
            sa.text("SELECT id FROM ironflow.outbox WHERE workflow_id = :wid"), {"wid": workflow_id}
        ).scalar_one()


def test_every_page_in_headless_chromium(
    chromium: str, database_url: str, db: sa.Engine, procs: Processes, tmp_path: Path
) -> None:
    started = time.monotonic()
    app = Celery(f"web-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(ironflow_max_attempts=MAX_ATTEMPTS, ironflow_relay_enabled=False)
    install(app, workflows=[OpsDemoWorkflow], database_url=database_url)
    runtime = runtime_of(app)
    for name in ("order-1001", "order-1002", "order-1003", "order-1004"):
        runtime.service.execute(Submit(id=name))
    runtime.service.execute(Delivered(id="order-1002"))
    dead = _dead_letter(db, "order-1003")
    _dead_letter(db, "order-1004")

    port = free_port()
    env = make_env(
        database_url,
        "memory://",
        "web",
        max_attempts=MAX_ATTEMPTS,
        web_actions="true",
        web_user=USER,
        web_password_hash=hash_password(PASSWORD, iterations=10_000),
    )
    server = procs.spawn(
        "web",
        [str(BIN / "ironflow-celery"), "-A", "tests.e2e_apps.ops_app", "web", "--port", str(port)],
        env,
    )

    def up() -> int:
        assert server.popen.poll() is None, server.output()[-3000:]
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5)
        except urllib.error.HTTPError as exc:
            return int(exc.code == 401)  # serving, and asking for the user
        except OSError:
            return 0
        return 0

    wait_for_progress(up, 1, "the web view to listen", stall=120, diagnose=server.output)
    # the browser signs in with the URL's credentials (HTTP Basic)
    base = f"http://{USER}:{PASSWORD}@127.0.0.1:{port}"
    shots = Path(os.environ.get("IRONFLOW_WEB_SCREENSHOTS") or tmp_path)
    if not shots.is_absolute():
        shots = REPO / shots
    shots.mkdir(parents=True, exist_ok=True)
    pages = {
        "overview": (f"{base}/", ["dead-lettered effects", T, 'id="dead-effects">2<']),
        "instances": (
            f"{base}/workflows/{T}",
            ["order-1001", "order-1002", "<b>4</b>active", "delivered", "submitted"],
        ),
        "instance": (
            f"{base}/workflows/{T}/order-1003",
            [
                'id="current-state">submitted<',
                'class="state current" data-state="submitted"',
                "PermanentEffectError: recipient unreachable",
                f"{MAX_ATTEMPTS} / {MAX_ATTEMPTS}",
                str(dead),
            ],
        ),
        "dead-letters": (
            f"{base}/dead-letters",
            [str(dead), "Deliver", 'name="csrf_token"', ">retry<", ">discard<", "actions on"],
        ),
    }
    for name, (url, expected) in pages.items():
        dom = _browse(chromium, url, "--dump-dom", tmp=tmp_path)
        flat = " ".join(dom.split()).replace("> <", "><")
        for text in expected:
            assert " ".join(text.split()) in flat, (name, text, dom[-3000:])
        png = shots / f"{name}.png"
        _browse(chromium, url, f"--screenshot={png}", tmp=tmp_path)
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    # Retry and discard by clicking, in the browser: its cookie and the form's CSRF token.
    browser = Browser(chromium, tmp_path / "devtools-profile")
    try:
        auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        browser.call("Network.enable", session=True)
        browser.call(
            "Network.setExtraHTTPHeaders", session=True, headers={"Authorization": f"Basic {auth}"}
        )
        plain = f"http://127.0.0.1:{port}"
        browser.open(f"{plain}/dead-letters")
        row_of = f"document.querySelector('tr[data-id=\"{dead}\"]')"
        browser.submit(f"{row_of}.querySelector('form[action$=\"/retry\"] button').click()")
        assert "will run again" in browser.js("document.getElementById('result').textContent")
        browser.screenshot(shots / "retried.png")
        assert row_state(db, dead) == (0, None)
        other = _row_id(db, "order-1004")
        browser.open(f"{plain}/dead-letters")
        browser.submit(
            f"(() => {{ const r = document.querySelector('tr[data-id=\"{other}\"]');"
            " r.querySelector('input[name=reason]').value = 'refunded by hand';"
            " r.querySelector('form[action$=\"/discard\"] button').click(); })()"
        )
        assert "discarded" in browser.js("document.getElementById('result').textContent")
        with db.connect() as conn:
            reason = conn.execute(
                sa.text("SELECT discard_reason FROM ironflow.outbox WHERE id = :id"),
                {"id": other},
            ).scalar_one()
        assert reason == "refunded by hand"
    finally:
        browser.close()

    # Without credentials: the sign-in challenge, no page (headless chromium would wait at
    # its password prompt, so this one is asked directly).
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/workflows/{T}", timeout=30)
    assert refused.value.code == 401 and "Basic" in refused.value.headers["WWW-Authenticate"]
    assert b"order-1001" not in refused.value.read()
    print(f"browser test took {time.monotonic() - started:.1f}s")

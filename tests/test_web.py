"""The web view (issue 23 §4), through Starlette's test client against a real PostgreSQL:
instances by type and state with counts, one instance's timeline and state-machine diagram,
dead letters with retry and discard only when enabled, authenticated and CSRF-checked, and
clear 4xx pages for bad input. Instances are made through the real service; dead letters
by SQL (`ops_helpers`), as the inspection tests do. The browser test is test_web_browser.py.
"""

from __future__ import annotations

import base64
import re
import uuid
import wsgiref.util
from types import SimpleNamespace
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from click.testing import CliRunner
from ops_helpers import MAX_ATTEMPTS, insert_row, row
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.testclient import TestClient

from ironflow_celery import install
from ironflow_celery.cli import main
from ironflow_celery.engine.runtime import runtime_of
from ironflow_celery.errors import ConfigurationError
from ironflow_celery.operations.web.auth import verify_password
from ironflow_celery.web import WebConfig, create_app, hash_password, wsgi_app
from tests.e2e_apps.ops_app import Delivered, OpsDemoWorkflow, Submit

# Starlette >= 1.0 prefers httpx2 for its test client; httpx still works.
pytestmark = pytest.mark.filterwarnings("ignore:Using `httpx`")

T = "ops_demo"
USER, PASSWORD = "operator", "correct horse"
HASH = hash_password(PASSWORD, iterations=1000)  # few rounds: the tests log in often
ACTIONS = WebConfig(actions=True, user=USER, password_hash=HASH)


def _auth(user: str = USER, password: str = PASSWORD) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


@pytest.fixture
def app(database_url: str) -> Celery:
    app = Celery(f"web-{uuid.uuid4().hex[:6]}", broker="memory://", set_as_current=False)
    app.conf.update(ironflow_max_attempts=MAX_ATTEMPTS, ironflow_relay_enabled=False)
    install(app, workflows=[OpsDemoWorkflow], database_url=database_url)
    return app


@pytest.fixture
def runtime(app: Celery) -> Any:
    return runtime_of(app)


def _client(app: Celery, config: WebConfig | None = None) -> TestClient:
    return TestClient(create_app(app, config=config or WebConfig()))


def _dead_letter_of(db: sa.Engine, runtime: Any, workflow_id: str) -> uuid.UUID:
    """Submit an instance and dead-letter its Deliver effect, as the worker would."""
    runtime.service.execute(Submit(id=workflow_id))
    with db.begin() as conn:
        return conn.execute(
            sa.text(
                "UPDATE ironflow.outbox SET attempts = :n, dead_lettered_at = now(), "
                "last_error = 'PermanentEffectError: unreachable' "
                "WHERE workflow_id = :wid RETURNING id"
            ),
            {"n": MAX_ATTEMPTS, "wid": workflow_id},
        ).scalar_one()


def test_instances_by_type_and_state_with_counts(app: Celery, runtime: Any) -> None:
    for i in range(3):
        runtime.service.execute(Submit(id=f"order-{i}"))
    runtime.service.execute(Delivered(id="order-1"))
    client = _client(app)

    overview = client.get("/")
    assert overview.status_code == 200
    cells = re.findall(r'<td class="num">(?:<a [^>]*>)?(\d+)', overview.text)
    assert cells[:3] == ["3", "0", "3"], overview.text  # active, completed, total
    assert f'href="/workflows/{T}"' in overview.text

    delivered = client.get(f"/workflows/{T}", params={"state": "delivered"})
    assert delivered.status_code == 200
    assert ">order-1</a>" in delivered.text and ">order-0</a>" not in delivered.text
    submitted = client.get(f"/workflows/{T}", params={"state": "submitted"})
    assert ">order-0</a>" in submitted.text and ">order-2</a>" in submitted.text
    assert ">order-1</a>" not in submitted.text
    every = client.get(f"/workflows/{T}")
    chips = dict(re.findall(r'data-state="(\w+)">\w+ <span class="count">(\d+)<', every.text))
    assert chips == {
        "active": "3",
        "completed": "0",
        "new": "0",
        "submitted": "2",
        "delivered": "1",
    }
    assert all(f">order-{i}</a>" in every.text for i in range(3))
    assert "<b>3</b>active" in every.text.replace("\n", "").replace("  ", "")


def test_instance_timeline_and_diagram_with_current_state(
    app: Celery, runtime: Any, db: sa.Engine
) -> None:
    dead = _dead_letter_of(db, runtime, "order-9")
    timer = insert_row(
        db,
        "timer",
        workflow_type=T,
        workflow_id="order-9",
        attempts=0,
        dead=False,
        fire_in_seconds=3600,
        payload={"type": "Delivered", "id": "order-9"},
    )
    page = _client(app).get(f"/workflows/{T}/order-9")
    assert page.status_code == 200
    text = page.text
    timeline = text[text.index('id="timeline"') :]
    # the event, then the effect with its attempts, state, error and row id, in time order
    assert timeline.index("Submitted") < timeline.index("Deliver")
    assert f"{MAX_ATTEMPTS} / {MAX_ATTEMPTS}" in timeline and "s-dead" in timeline
    assert "PermanentEffectError: unreachable" in timeline and str(dead) in timeline
    assert str(timer) in timeline and "fires " in timeline  # the timer, when it fires
    assert timeline.index("Deliver<") < timeline.index(str(timer))
    assert 'id="current-state">submitted<' in text
    svg = text[text.index("<svg") : text.index("</svg>")]
    assert re.search(r'class="state current" data-state="submitted"', svg)
    assert re.search(r'class="state terminal" data-state="delivered"', svg)
    assert "Delivered" in svg  # the transition's input labels the edge

    runtime.service.execute(Delivered(id="order-9"))
    after = _client(app).get(f"/workflows/{T}/order-9").text
    assert re.search(r'class="state current terminal" data-state="delivered"', after)


def test_dead_letters_are_read_only_unless_enabled(
    app: Celery, runtime: Any, db: sa.Engine
) -> None:
    dead = _dead_letter_of(db, runtime, "order-1")
    client = _client(app)
    page = client.get("/dead-letters")
    assert page.status_code == 200 and str(dead) in page.text and ">Deliver<" in page.text
    assert "<form" not in page.text and "Read-only" in page.text
    refused = client.post(f"/dead-letters/effect/{dead}/retry", data={"csrf_token": "x"})
    assert refused.status_code == 403 and "actions are off" in refused.text
    assert row(db, dead).dead_lettered_at is not None  # untouched


def test_actions_need_authentication_and_a_csrf_token(
    app: Celery, runtime: Any, db: sa.Engine
) -> None:
    first = _dead_letter_of(db, runtime, "order-1")
    second = _dead_letter_of(db, runtime, "order-2")
    client = _client(app, ACTIONS)

    anonymous = client.get("/dead-letters")
    assert anonymous.status_code == 401 and "Basic" in anonymous.headers["www-authenticate"]
    assert client.get("/dead-letters", headers=_auth(password="wrong")).status_code == 401
    assert client.post(f"/dead-letters/effect/{first}/retry").status_code == 401

    page = client.get("/dead-letters", headers=_auth())
    assert page.status_code == 200 and "<form" in page.text
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    assert token is not None and client.cookies.get("ironflow_csrf")

    # No token, a wrong one, or the right one without the browser's cookie: refused.
    for data in ({}, {"csrf_token": "0" * 64}):
        bad = client.post(f"/dead-letters/effect/{first}/retry", data=data, headers=_auth())
        assert bad.status_code == 403 and "CSRF" in bad.text, bad.text
    stranger = TestClient(create_app(app, config=ACTIONS))
    no_cookie = stranger.post(
        f"/dead-letters/effect/{first}/retry", data={"csrf_token": token[1]}, headers=_auth()
    )
    assert no_cookie.status_code == 403
    assert row(db, first).dead_lettered_at is not None  # nothing happened yet

    retried = client.post(
        f"/dead-letters/effect/{first}/retry", data={"csrf_token": token[1]}, headers=_auth()
    )
    assert retried.status_code == 200, retried.text
    assert row(db, first).dead_lettered_at is None and row(db, first).attempts == 0

    form = {"csrf_token": token[1], "reason": "customer refunded by hand"}
    no_reason = client.post(
        f"/dead-letters/effect/{second}/discard",
        data={"csrf_token": token[1]},
        headers=_auth(),
    )
    assert no_reason.status_code == 400 and "reason is required" in no_reason.text
    discarded = client.post(f"/dead-letters/effect/{second}/discard", data=form, headers=_auth())
    assert discarded.status_code == 200, discarded.text
    assert row(db, second).discard_reason == "customer refunded by hand"
    again = client.post(f"/dead-letters/effect/{second}/discard", data=form, headers=_auth())
    assert again.status_code == 409 and "already_discarded" in again.text


def test_bad_input_gets_clear_4xx_pages(app: Celery, runtime: Any, db: sa.Engine) -> None:
    _dead_letter_of(db, runtime, "order-1")  # so that the page has forms and a token
    client = _client(app, ACTIONS)
    h = _auth()
    page = client.get("/dead-letters", headers=h)
    token = re.search(r'name="csrf_token" value="([0-9a-f]+)"', page.text)
    csrf = {"csrf_token": token[1] if token else ""}
    cases = [
        ("get", "/workflows/no_such_type", 404, "no_such_type"),
        ("get", f"/workflows/{T}/nobody", 404, "no instance"),
        ("get", f"/workflows/{T}?state=lost", 400, "unknown state"),
        ("get", f"/workflows/{T}?offset=-1", 400, "offset"),
        ("get", f"/workflows/{T}/bad%00id", 400, "NUL"),
        ("get", "/dead-letters?kind=letter", 400, "kind"),
        ("get", "/dead-letters?after=not-a-cursor", 400, "cursor"),
        ("get", "/nowhere", 404, "Not Found"),
        ("post", "/dead-letters/effect/not-a-uuid/retry", 400, "not-a-uuid"),
        ("post", f"/dead-letters/effect/{uuid.uuid4()}/retry", 409, "not_found"),
        ("post", f"/dead-letters/letter/{uuid.uuid4()}/retry", 400, "kind"),
        ("post", f"/dead-letters/effect/{uuid.uuid4()}/explode", 404, "retry or discard"),
    ]
    for method, url, status, words in cases:
        if method == "get":
            response = client.get(url, headers=h)
        else:
            response = client.post(url, data=csrf, headers=h)
        assert response.status_code == status, (url, response.status_code, response.text)
        assert words.lower() in response.text.lower(), (url, response.text)
        assert "Traceback" not in response.text

    hostile = "<script>alert(1)</script>"
    shown = client.get(f"/workflows/{T}/{hostile}", headers=h)
    assert shown.status_code == 404 and "<script>" not in shown.text
    assert "&lt;script&gt;" in shown.text
    assert "default-src 'none'" in shown.headers["content-security-policy"]
    # a hostile id that exists is shown escaped too
    runtime.service.execute(Submit(id=hostile))
    listed = client.get(f"/workflows/{T}", headers=h)
    assert "<script>" not in listed.text and "&lt;script&gt;alert(1)" in listed.text
    assert client.get(f"/workflows/{T}/%3Cscript%3Ealert(1)%3C%2Fscript%3E").status_code == 401
    ok = client.get(f"/workflows/{T}/%3Cscript%3Ealert(1)%3C%2Fscript%3E", headers=h)
    assert ok.status_code == 200 and "<script>" not in ok.text


def test_actions_are_never_offered_without_authentication(app: Celery) -> None:
    with pytest.raises(ConfigurationError, match="needs ironflow_web_user"):
        create_app(app, config=WebConfig(actions=True))
    with pytest.raises(ConfigurationError, match="both"):
        create_app(app, config=WebConfig(user=USER))
    with pytest.raises(ConfigurationError, match="hash-password"):
        create_app(app, config=WebConfig(user=USER, password_hash="plain-text"))
    app.conf.update(ironflow_web_actions=True)
    with pytest.raises(ConfigurationError, match="needs ironflow_web_user"):
        create_app(app)  # from the settings, as `ironflow-celery web` builds it
    app.conf.update(ironflow_web_user=USER, ironflow_web_password_hash=HASH)
    assert TestClient(create_app(app)).get("/").status_code == 401


def test_mounted_in_an_asgi_app_and_a_wsgi_app(app: Celery, runtime: Any) -> None:
    runtime.service.execute(Submit(id="order-1"))
    parent = Starlette(routes=[Mount("/ops/ironflow", create_app(app, config=WebConfig()))])
    page = TestClient(parent).get(f"/ops/ironflow/workflows/{T}")
    assert page.status_code == 200
    assert f'href="/ops/ironflow/workflows/{T}/order-1"' in page.text

    environ: dict[str, Any] = {"PATH_INFO": f"/workflows/{T}/order-1", "SCRIPT_NAME": "/ironflow"}
    wsgiref.util.setup_testing_defaults(environ)
    seen: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        seen["status"] = status
        return lambda _: None

    body = b"".join(wsgi_app(app, config=WebConfig())(environ, start_response))
    assert seen["status"].startswith("200"), body[:500]
    assert b'href="/ironflow/workflows/ops_demo"' in body and b"order-1" in body


def test_cli_hashes_a_password_for_the_setting(app: Celery) -> None:
    result = CliRunner().invoke(
        main, ["web", "--hash-password"], input="s3cret\n", obj=SimpleNamespace(app=app)
    )
    assert result.exit_code == 0, result.output
    stored = result.output.strip().splitlines()[-1]
    assert stored.startswith("pbkdf2_sha256$") and verify_password("s3cret", stored)
    assert not verify_password("other", stored)


def test_cli_refuses_to_serve_actions_without_a_user(app: Celery) -> None:
    app.conf.update(ironflow_web_actions=True)
    result = CliRunner().invoke(main, ["web", "--port", "0"], obj=SimpleNamespace(app=app))
    assert result.exit_code == 3, result.output
    assert "never offered without authentication" in result.output

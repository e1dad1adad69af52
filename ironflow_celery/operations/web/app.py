"""The web view as a Starlette (ASGI) application: `create_app`, and `wsgi_app` for WSGI hosts.

Every page reads through the functions the CLI uses (`ironflow_celery.operations.inspection`
and the dead-letter queries), so the page and ``ironflow-celery workflows show`` cannot
disagree. The only writes are a dead letter's retry and discard, which are off unless
``ironflow_web_actions`` is set, need HTTP Basic authentication and a CSRF token.
Endpoints that touch the database are plain functions, which Starlette runs in its thread
pool, so a slow query never blocks the event loop.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, quote, urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from ironflow_celery.engine.runtime import runtime_of
from ironflow_celery.errors import (
    ConfigurationError,
    InvalidArgument,
    IronflowError,
    StorageError,
    UnknownWorkflowType,
)
from ironflow_celery.model.settings import read_settings
from ironflow_celery.model.views import StateMachineView, describe
from ironflow_celery.operations import inspection as ins
from ironflow_celery.operations.web import auth
from ironflow_celery.operations.web.diagram import state_machine_svg
from ironflow_celery.service import dead_letters as dl

__all__ = ["WebConfig", "create_app", "wsgi_app"]

CSRF_COOKIE = "ironflow_csrf"
STATE_SAMPLE = 200
"""Most recent instances replayed to count a type's instances per state-machine state."""
REASON_LENGTH = 500
"""Characters a discard reason may have (it is kept on the row for audit)."""

# No script, no third-party origin: the pages are plain HTML with inline CSS and SVG.
_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; "
    "img-src 'self' data:; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


@dataclass(frozen=True, slots=True)
class WebConfig:
    """Who may see the pages and whether dead letters can be acted on."""

    actions: bool = False
    user: str | None = None
    password_hash: str | None = None

    @classmethod
    def from_conf(cls, conf: Any) -> WebConfig:
        """From the ``ironflow_web_*`` settings of a Celery app's conf (or environment)."""
        settings = read_settings(conf)
        return cls(
            actions=bool(settings["web_actions"]),
            user=settings["web_user"] or None,
            password_hash=settings["web_password_hash"] or None,
        )

    def check(self) -> None:
        """Refuse a configuration that would expose actions or lock everyone out."""
        if (self.user is None) != (self.password_hash is None):
            raise ConfigurationError(
                "set both ironflow_web_user and ironflow_web_password_hash, or neither"
            )
        if self.password_hash is not None:
            auth.check_hash(self.password_hash)
        if self.actions and self.user is None:
            raise ConfigurationError(
                "ironflow_web_actions needs ironflow_web_user and ironflow_web_password_hash: "
                "retry and discard are never offered without authentication"
            )


def _ago(value: datetime | None) -> str:
    if value is None:
        return "-"
    seconds = max(0.0, (datetime.now(UTC) - value).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


_templates = Environment(
    loader=PackageLoader("ironflow_celery.operations.web", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)
_templates.filters["q"] = lambda value: quote(str(value), safe="")
_templates.filters["ago"] = _ago
_templates.filters["when"] = _when


def _timeline(detail: ins.InstanceDetail) -> list[dict[str, Any]]:
    """Events, effects and timers of one instance in the order they happened."""
    entries: list[dict[str, Any]] = [
        {
            "at": e.created_at,
            "what": "event",
            "name": e.type,
            "state": f"#{e.sequence}",
            "detail": e.summary,
            "row": None,
        }
        for e in detail.events
    ]
    for r in (*detail.effects, *detail.timers):
        entries.append(
            {
                "at": r.created_at,
                "what": r.kind,
                "name": r.effect_type or "-",
                "state": r.state,
                "detail": r.last_error or "",
                "row": r,
            }
        )
    entries.sort(key=lambda entry: entry["at"])
    return entries


class _View:
    """The pages of one app: its runtime, settings and templates."""

    def __init__(self, celery_app: Any, config: WebConfig) -> None:
        self.celery_app = celery_app
        self.config = config
        # Digests of Authorization headers already verified: PBKDF2 costs ~0.5 s by design,
        # once per browser rather than once per page.
        self._verified: dict[str, None] = {}

    @property
    def runtime(self) -> Any:
        runtime = runtime_of(self.celery_app)
        runtime.load_workflows()
        return runtime

    # -- request plumbing -------------------------------------------------------------------

    def user(self, request: Request) -> str | None:
        """The signed-in user; raises 401 when the view needs one and it is missing/wrong."""
        if self.config.user is None or self.config.password_hash is None:
            return None
        header = request.headers.get("authorization") or ""
        digest = hashlib.sha256(header.encode("utf-8", "surrogateescape")).hexdigest()
        creds = auth.basic_credentials(header)
        if creds is not None and creds[0] == self.config.user and digest in self._verified:
            return creds[0]
        if (
            creds is None
            or creds[0] != self.config.user
            or not auth.verify_password(creds[1], self.config.password_hash)
        ):
            raise HTTPException(
                401,
                "sign in with the web view's user name and password",
                headers={"WWW-Authenticate": 'Basic realm="ironflow", charset="UTF-8"'},
            )
        if len(self._verified) >= 256:
            self._verified.clear()
        self._verified[digest] = None
        return creds[0]

    def render(
        self,
        request: Request,
        template: str,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        base = request.scope.get("root_path", "").rstrip("/")
        nonce = request.cookies.get(CSRF_COOKIE) or None
        fresh = None
        token = None
        user = context.pop("signed_in", None)
        if self.config.actions and user is not None and self.config.password_hash:
            if nonce is None:
                nonce = fresh = auth.new_nonce()
            token = auth.csrf_token(self.config.password_hash, nonce, user)
        html = _templates.get_template(template).render(
            base=base,
            actions=self.config.actions and token is not None,
            csrf_token=token,
            user=user,
            **context,
        )
        response = HTMLResponse(html, status_code=status, headers=_HEADERS)
        if fresh is not None:
            response.set_cookie(
                CSRF_COOKIE, fresh, path=base or "/", httponly=True, samesite="strict"
            )
        return response

    # -- pages ------------------------------------------------------------------------------

    def overview(self, request: Request) -> Response:
        user = self.user(request)
        runtime = self.runtime
        types = []
        for registration in runtime.registry:
            wf = registration.workflow
            counts = ins.instance_counts(runtime, wf.type)
            try:
                describe(wf)
                machine = True
            except IronflowError:
                machine = False
            types.append({"type": wf.type, "counts": counts, "machine": machine})
        limits = runtime.attempt_limits
        dead = {
            kind: dl.count_dead_letters(runtime.store, kind=kind, max_attempts=limits)
            for kind in dl.KINDS
        }
        return self.render(request, "overview.html", types=types, dead=dead, signed_in=user)

    def instances(self, request: Request) -> Response:
        user = self.user(request)
        runtime = self.runtime
        workflow_type = request.path_params["workflow_type"]
        state = request.query_params.get("state") or None
        offset = _offset(request.query_params.get("offset"))
        page = ins.list_instances(runtime, workflow_type, state=state, offset=offset)
        counts = ins.instance_counts(runtime, workflow_type)
        wf = runtime.registry.get(workflow_type).workflow
        states: list[str] = []
        if isinstance(wf, type) and issubclass(wf, StateMachineView):
            try:
                states = [s.name for s in describe(wf).states]
            except IronflowError:
                states = []
        by_state: dict[str, int] = {}
        sampled = 0
        if states:  # how many of the most recent instances stand in each state
            recent = ins.list_instances(runtime, workflow_type, limit=STATE_SAMPLE)
            sampled = len(recent.items)
            for item in recent.items:
                if item.status is not None:
                    by_state[item.status] = by_state.get(item.status, 0) + 1
        return self.render(
            request,
            "instances.html",
            workflow_type=workflow_type,
            page=page,
            counts=counts,
            state=state,
            filters=[*ins.INSTANCE_STATES, *states],
            by_state={"active": counts.active, "completed": counts.completed, **by_state},
            sampled=sampled,
            sample_limit=STATE_SAMPLE,
            total=counts.active + counts.completed,
            offset=offset,
            signed_in=user,
        )

    def instance(self, request: Request) -> Response:
        user = self.user(request)
        runtime = self.runtime
        workflow_type = request.path_params["workflow_type"]
        workflow_id = request.path_params["workflow_id"]
        detail = ins.show_workflow(runtime, workflow_type, workflow_id)
        if detail is None:
            raise HTTPException(
                404, f"no instance {workflow_id!r} of workflow type {workflow_type!r}"
            )
        svg = None
        try:
            definition = describe(runtime.registry.get(workflow_type).workflow)
        except IronflowError:
            definition = None
        if definition is not None:
            current = detail.position.status if detail.position is not None else None
            svg = state_machine_svg(definition, current)
        return self.render(
            request,
            "instance.html",
            detail=detail,
            timeline=_timeline(detail),
            svg=svg,
            signed_in=user,
        )

    def dead_letters(self, request: Request) -> Response:
        user = self.user(request)
        runtime = self.runtime
        params = request.query_params
        kind = dl.parse_kind(params.get("kind") or "effect")
        query = dl.DeadLetterQuery.of(
            params.get("type") or None,
            params.get("id") or None,
            limit=50,
            after=params.get("after") or None,
        )
        letters = dl.fetch_dead_letters(
            runtime.store, query, kind=kind, max_attempts=runtime.attempt_limits
        )
        filters = {k: params[k] for k in ("kind", "type", "id") if params.get(k)}
        cursor = dl.next_cursor(letters, query)
        return self.render(
            request,
            "dead_letters.html",
            kind=kind,
            letters=letters,
            limits=runtime.attempt_limits,
            next_query=urlencode({**filters, "after": cursor}) if cursor else None,
            filters=filters,
            signed_in=user,
        )

    async def act(self, request: Request) -> Response:
        """POST retry or discard of one dead letter."""
        if not self.config.actions:
            raise HTTPException(
                403, "actions are off: set ironflow_web_actions (with a user) to enable them"
            )
        action = request.path_params["action"]
        if action not in ("retry", "discard"):
            raise HTTPException(404, f"no action {action!r}: retry or discard")
        user = await run_in_threadpool(self.user, request)  # PBKDF2 is slow on purpose
        assert user is not None and self.config.password_hash is not None  # WebConfig.check
        body = await request.body()
        try:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True, max_num_fields=10)
        except (UnicodeDecodeError, ValueError):
            raise HTTPException(400, "the form is not valid UTF-8 url-encoded data") from None
        token = (form.get("csrf_token") or [""])[0]
        nonce = request.cookies.get(CSRF_COOKIE)
        if not auth.valid_csrf(self.config.password_hash, nonce, user, token):
            raise HTTPException(
                403, "missing or wrong CSRF token: reload the dead-letter page and try again"
            )
        kind = dl.parse_kind(request.path_params["kind"])
        row_id = dl.parse_row_id(request.path_params["row_id"])
        runtime = self.runtime
        limits = runtime.attempt_limits
        if action == "retry":
            result = await run_in_threadpool(
                dl.try_retry_dead_letter, runtime.store, row_id, kind=kind, max_attempts=limits
            )
        else:
            reason = ((form.get("reason") or [""])[0]).strip()
            if not reason:
                raise HTTPException(400, "a reason is required to discard (kept for audit)")
            if len(reason) > REASON_LENGTH:
                raise HTTPException(400, f"the reason is longer than {REASON_LENGTH} characters")
            result = await run_in_threadpool(
                dl.try_discard_dead_letter,
                runtime.store,
                row_id,
                reason,
                kind=kind,
                max_attempts=limits,
            )
        return self.render(
            request,
            "result.html",
            status=200 if result.ok else 409,
            result=result,
            action=action,
            signed_in=user,
        )

    # -- errors -----------------------------------------------------------------------------

    def error(self, request: Request, status: int, message: str, **headers: str) -> Response:
        try:
            user = None if status == 401 else self.user(request)
        except HTTPException:
            user = None
        response = self.render(
            request, "error.html", status=status, message=message, code=status, signed_in=user
        )
        response.headers.update(headers)
        return response

    async def on_http(self, request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        return self.error(request, exc.status_code, exc.detail, **(exc.headers or {}))

    async def on_ironflow(self, request: Request, exc: Exception) -> Response:
        if isinstance(exc, UnknownWorkflowType):
            return self.error(request, 404, str(exc))
        if isinstance(exc, InvalidArgument):
            return self.error(request, 400, str(exc))
        if isinstance(exc, (StorageError, ConfigurationError)):
            return self.error(request, 503, str(exc))
        return self.error(request, 500, f"{type(exc).__name__}: {exc}")


def _offset(value: str | None) -> int:
    if not value:
        return 0
    if not value.isdigit():
        raise HTTPException(400, f"offset must be a whole number, got {value!r}")
    return int(value)


def create_app(
    celery_app: Any,
    *,
    config: WebConfig | None = None,
) -> Starlette:
    """The web view of the ironflow runtime installed on `celery_app` (``install(app)``):
    an ASGI app to serve with uvicorn or mount in a Starlette/FastAPI app
    (``Mount("/ironflow", create_app(app))``). `config` defaults to the ``ironflow_web_*``
    settings; a configuration that would offer actions without authentication is refused
    (`ConfigurationError`)."""
    runtime_of(celery_app)  # NotInstalled now, not on the first request
    config = config or WebConfig.from_conf(celery_app.conf)
    config.check()
    view = _View(celery_app, config)
    routes = [
        Route("/", view.overview, name="overview"),
        Route("/workflows/{workflow_type}", view.instances, name="instances"),
        Route("/workflows/{workflow_type}/{workflow_id:path}", view.instance, name="instance"),
        Route("/dead-letters", view.dead_letters, name="dead_letters"),
        Route(
            "/dead-letters/{kind}/{row_id}/{action:str}",
            view.act,
            methods=["POST"],
            name="act",
        ),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: view.on_http, IronflowError: view.on_ironflow},
    )
    return app


def wsgi_app(celery_app: Any, *, config: WebConfig | None = None) -> Any:
    """`create_app` for a WSGI host (Flask, Django, gunicorn's sync workers), through the
    ``a2wsgi`` adapter the ``web`` extra installs."""
    from a2wsgi import ASGIMiddleware

    return ASGIMiddleware(create_app(celery_app, config=config))  # type: ignore[arg-type]

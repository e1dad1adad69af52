"""The read-only web view (``ironflow-celery web``, the ``web`` extra): instances by type and
state, one instance's timeline and state-machine diagram, dead letters with retry and
discard when enabled. `app.create_app` builds it (Starlette, needs the extra); `auth` and
`diagram` use the standard library only. See docs/web.md."""

__all__: list[str] = []

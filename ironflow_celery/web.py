"""The web view, the public module (needs the ``web`` extra: ``pip install
'ironflow-celery[web]'``): `create_app` for ASGI hosts, `wsgi_app` for WSGI ones,
`hash_password` for ``ironflow_web_password_hash``. See docs/web.md."""

from ironflow_celery.operations.web.app import WebConfig, create_app, wsgi_app
from ironflow_celery.operations.web.auth import hash_password

__all__ = ["WebConfig", "create_app", "hash_password", "wsgi_app"]

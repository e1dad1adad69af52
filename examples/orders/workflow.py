"""The order saga this runner drives: it lives in the package, ``ironflow_celery.examples.orders``.

It ships with the package so the docs' examples run from a plain install; this module
re-exports it for the repository's runner and tests. Point ``IRONFLOW_WORKFLOWS`` at
``ironflow_celery.examples.orders`` (a module name registers the workflows it defines, not
those it imports).
"""

from ironflow_celery.examples.orders import *  # noqa: F403
from ironflow_celery.examples.orders import __all__ as __all__

"""Celery signals ironflow sends, for alerting and bookkeeping in the application.

``dead_lettered`` is sent once per effect or timer the ack path dead-letters, after the
dead letter is committed, from the process that ran the task::

    from ironflow_celery.signals import dead_lettered

    @dead_lettered.connect
    def page_on_call(sender, kind, row_id, workflow, effect_type, error, **kwargs):
        ...

`sender` is the Workflow class (``dead_lettered.connect(fn, sender=OrderWorkflow)``
listens to one type). Keyword arguments: ``kind`` ("effect" or "timer"), ``row_id``
(UUID), ``workflow`` (`WorkflowRef`), ``effect_type`` (the payload's tag: the effect's,
or the timer input's), ``attempts``, ``error`` (the stored last error) and ``exception``
(the handler's exception, or None when the attempts were used up by lost runs). A
receiver that raises is logged by Celery and does not undo the dead letter.
"""

from __future__ import annotations

from celery.utils.dispatch import Signal

__all__ = ["dead_lettered"]

dead_lettered = Signal(name="ironflow_dead_lettered")
"""Sent once per dead-lettered effect or timer (see the module doc)."""

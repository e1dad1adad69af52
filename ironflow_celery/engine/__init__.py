"""Layer 4, the engine: relays claim due rows and publish them, tasks run handlers and
acknowledge results into the outbox, `WorkflowRuntime` holds it together."""

__all__: list[str] = []

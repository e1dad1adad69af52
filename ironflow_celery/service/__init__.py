"""Layer 3, the service: `WorkflowService` runs an input through decide/evolve and commits
its events, effects and timers in one transaction (ironflow's WorkflowService)."""

__all__: list[str] = []

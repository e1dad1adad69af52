"""Layer 3, the service: `WorkflowService` runs an input through decide/evolve and commits
its events, effects and timers in one transaction (ironflow's WorkflowService); the
dead-letter rules over the store's queries; OpenTelemetry spans and trace carriers."""

__all__: list[str] = []

"""Layer 1, the model: workflows, messages and policies as plain values, no I/O.

Everything above may import it; it imports nothing of the package but `errors`.
"""

__all__: list[str] = []

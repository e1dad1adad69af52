"""Layer 2, storage: the PostgreSQL schema, every SQL statement (`sql`), the claimable row
kinds, and `PostgresStore`, the one door to the database."""

__all__: list[str] = []

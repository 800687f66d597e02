"""Storage behind small interfaces: the kudos ledger (SQL through SQLAlchemy)."""

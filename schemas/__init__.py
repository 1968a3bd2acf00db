"""JSON Schema and Arrow schema of the cache format (data; prose in docs/cache-format.md)."""

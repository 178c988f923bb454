"""After a search: the best configurations (best), final runs of them over seeds (final), the paper's
Tables 1-2 as paired seeded runs (reproduce, reproduce_run) and their tables (tables)."""

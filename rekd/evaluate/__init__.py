"""After a search: the best configurations (best), final runs of them over seeds (final), the paper's
Tables 1-2 and the sparse-student table as paired seeded runs (reproduce: its checked plan reproduce_plan,
its Ray tasks reproduce_run) and their tables (tables, structure_table); whether a baseline has converged
(convergence) and two tables compared row by row (compare)."""

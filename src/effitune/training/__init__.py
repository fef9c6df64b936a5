"""effitune.training: the two-stage recipe (phases, frozen-prefix caching, the Lightning module, the run)."""

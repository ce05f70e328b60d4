"""Mixed-precision search: per-layer sensitivity and the integer program that allocates bit widths."""

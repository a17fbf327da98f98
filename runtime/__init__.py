"""Process-level plumbing, no model logic: distributed init/teardown, rank-0 printing, metrics and
progress lines, seeding with RNG-state capture/restore, run directories."""

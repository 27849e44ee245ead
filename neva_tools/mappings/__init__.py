"""Weight mappings as data: one table per model family, each entry carrying its tensor-parallel split kind."""

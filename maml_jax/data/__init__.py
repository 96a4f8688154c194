"""Task samplers: each returns fixed-shape task batches ``[tasks, examples, *features]``."""

"""Teachers: the architecture registry, checkpoints, and teacher training."""

"""Training: the step (GTF-DEER + optax), checkpoints (Orbax) and the loop."""

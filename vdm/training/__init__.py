"""Training: the Accelerate loop, checkpoints, EMA, schedules, TensorBoard."""

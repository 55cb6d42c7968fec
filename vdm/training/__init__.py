"""Training: the loop and its parts (data or fully sharded parallelism, the state that checkpoints as one
dict, one step, the NaN guard, checkpoints, media, EMA, schedules, TensorBoard)."""

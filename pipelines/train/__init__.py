"""The train step: the worker plan, the Ray Train driver, the model and loop, checkpoints, EMA, DeepSpeed,
data and export."""

"""The train step: the worker plan, the Ray Train driver, the DeepSpeed engine and loop, EMA, data and export."""

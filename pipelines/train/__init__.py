"""The train step: the worker plan, the Ray Train driver, the engine (model + DeepSpeed), the loop and its
callbacks, checkpoints, EMA, DeepSpeed config, data and export."""

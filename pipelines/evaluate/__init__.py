"""The evaluate step: the metrics on val, ``evaluator train`` and the noise fit."""

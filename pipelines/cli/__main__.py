"""``python -m pipelines.cli``: the ``pyoco`` console script (Ray job entrypoints run it this way)."""

from pipelines.cli import main

main()

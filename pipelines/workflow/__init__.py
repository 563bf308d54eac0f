"""The workflow: the steps with their cache keys, the state file, the runner and ``pyoco submit``."""

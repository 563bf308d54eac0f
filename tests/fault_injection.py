"""A training callback for the fault-tolerance tests: one rank dies mid-run, as a crashed node would.

    run_train(cfg, callbacks=[FaultInjection(at_step=5)])

It travels to the workers in the worker plan (pickled; the workers import it from this module), and is no
setting of ``TrainConfig``: a user's config cannot make a run crash itself."""

from __future__ import annotations

import os

from pipelines.train.callbacks import Callback

FAULT_MARKER = "pyoco_fault_injected_at_step_{step}"  # in the run's folder under train.storage_path


class FaultInjection(Callback):
    """Rank 1 (rank 0 when alone) exits with ``os._exit(1)`` before optimizer step ``at_step``, once per run:
    it first writes :data:`FAULT_MARKER` next to the run's checkpoints, and a restarted attempt that finds it
    trains on."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def marker(self, storage_path: str, run_name: str) -> str:
        from pyoco import storage

        return storage.join(storage_path, run_name, FAULT_MARKER.format(step=self.at_step))

    def on_step_start(self, trainer) -> None:
        if trainer.step + 1 != self.at_step or trainer.rank != (1 if trainer.world > 1 else 0):
            return
        from pyoco import storage

        marker = self.marker(trainer.t.storage_path, trainer.t.run_name)
        if storage.exists(marker):
            return
        # Die only once Ray has committed the checkpoints reported so far, so the test knows which one the
        # restart must use. (A real crash can outrun the controller; Ray then resumes from the previous one.)
        import ray.train

        ray.train.get_all_reported_checkpoints(
            consistency_mode=ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=120
        )
        storage.write_bytes(marker, f"rank {trainer.rank} exited at step {self.at_step}\n".encode())
        print(f"pyoco: fault injection: rank {trainer.rank} exits before step {self.at_step}", flush=True)
        os._exit(1)

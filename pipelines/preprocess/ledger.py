"""The reject ledger: reject stages and rows, the writer of ``rejects/``, and the reject-fraction check."""

from __future__ import annotations

import io
from collections import Counter

from pipelines.preprocess.schemas import reject_schema
from pyoco.config import PreprocessConfig

# Stage names in rejects/.
STAGE_READ, STAGE_CAPTION, STAGE_DEDUPE, STAGE_DECODE = "read", "caption", "dedupe", "decode"
STAGE_LABELS = "labels"
# Clip quality (pyoco.shots): a video all of whose clips are dropped is rejected at this stage with the
# reason of most of them; dropped clips of an accepted video are counted in the manifest's clips_dropped.
STAGE_MOTION = "motion"
MOTION_REASONS = ("static", "jitter")


class _RejectWriter:
    """Collects reject rows and writes them to ``rejects/part-NNNNN.parquet`` in bounded chunks."""

    def __init__(self, rejects_uri: str, options, rows_per_file: int = 100_000):
        self.uri = rejects_uri
        self.options = options
        self.rows_per_file = rows_per_file
        self.rows: list[dict] = []
        self.files: list[str] = []
        self.by_reason: Counter = Counter()

    def add(self, source: str, key: str, stage: str, reason: str, detail: str) -> None:
        self.rows.append(
            {"source": source, "key": key, "stage": stage, "reason": reason, "detail": detail or ""}
        )
        self.by_reason[reason] += 1
        if len(self.rows) >= self.rows_per_file:
            self.flush()

    def flush(self, *, final: bool = False) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pyoco import storage

        if not self.rows and not (final and not self.files):
            return
        rows = sorted(self.rows, key=lambda r: (r["source"], r["key"]))
        table = pa.Table.from_pylist(rows, schema=reject_schema())
        name = f"part-{len(self.files):05d}.parquet"
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join(self.uri, name), buf.getvalue(), options=self.options)
        self.files.append(name)
        self.rows = []


def _check_reject_fraction(cfg: PreprocessConfig, inputs: int, rejected: dict[str, int]) -> str | None:
    """A one-line problem when more than ``max_reject_fraction`` of the inputs were rejected."""
    total = sum(rejected.values())
    if inputs == 0 or total / inputs <= cfg.max_reject_fraction:
        return None
    top = ", ".join(f"{r} {n}" for r, n in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0]))[:3])
    return (
        f"{total} of {inputs} inputs rejected ({total / inputs:.0%} > preprocess.max_reject_fraction "
        f"{cfg.max_reject_fraction:g}); top reasons: {top}"
    )

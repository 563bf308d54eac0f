"""The workflow's state file, ``{output}/workflow/state.json`` (local or s3://), written atomically."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pipelines.common import PyocoError


# --------------------------------------------------------------------------------------------------- state
def _fs(uri: str):
    import fsspec

    fs, _, (path,) = fsspec.get_fs_token_paths(uri)
    return fs, path


def join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *[p.strip("/") for p in parts]])


@dataclass
class WorkflowState:
    uri: str
    steps: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, output: str) -> WorkflowState:
        uri = join(output, "workflow", "state.json")
        fs, path = _fs(uri)
        if not fs.exists(path):
            return cls(uri)
        try:
            with fs.open(path, "r") as f:
                data = json.load(f)
        except json.JSONDecodeError as err:
            raise PyocoError(f"{uri}: corrupt workflow state ({err.msg}); delete it to start over") from None
        return cls(uri, data.get("steps", {}))

    def save(self) -> None:
        """Serialise first, then replace the file in one step (:func:`pyoco.storage.write_bytes`: a rename
        locally, one PUT on S3), so a crash or an error mid-save leaves the previous state intact."""
        from pyoco import storage

        data = json.dumps({"steps": self.steps}, indent=2, sort_keys=True, default=str).encode()
        storage.write_bytes(self.uri, data)

    def outputs(self, step: str) -> dict[str, Any]:
        return dict(self.steps.get(step, {}).get("outputs", {}))

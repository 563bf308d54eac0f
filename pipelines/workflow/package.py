"""The job's ``working_dir`` for ``pyoco submit``: the project's files (what git tracks or would track, or
the installed packages) minus tests, caches, outputs and credential-like files, in a deterministic zip."""

from __future__ import annotations

import fnmatch
import os
import subprocess
import zipfile
from dataclasses import dataclass
from pathlib import Path

from pipelines.common import PyocoError

# Never shipped in the working_dir, whatever git says (gitignore-style: a leading "/" anchors the pattern
# at the project root, a trailing "/" matches a directory).
PACKAGE_EXCLUDES = (
    ".git/",
    ".venv/",
    "venv/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".mypy_cache/",
    "*.egg-info/",
    "/.pyoco-local/",
    "/.pyoco_cache/",
    "/build/",
    "/dist/",
    "/demo/",
    "/mlruns/",
    "/mlartifacts/",
    "/bench/out/",
    "/tests/",
    "/mlflow.db",
    "*.pyc",
    ".env",
    ".env.*",
    "*.pem",
    "*.key",
    "auth_token",
    "credentials",
    ".netrc",
)
MAX_PACKAGE_BYTES = 100 * 1024 * 1024  # the Ray dashboard refuses bigger uploads
STAGED_CONFIG_DIR = "_pyoco_submit"
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)


# --------------------------------------------------------------------------------------------- package
def project_root() -> Path | None:
    """The source checkout pyoco runs from (pyproject.toml next to pipelines/), or None if installed."""
    root = Path(__file__).resolve().parents[2]
    if (root / "pyproject.toml").is_file() and (root / "pyoco").is_dir():
        return root
    return None


def _excluded(rel: str) -> bool:
    """Whether the project-relative posix path ``rel`` matches PACKAGE_EXCLUDES."""
    parts = rel.split("/")
    for pattern in PACKAGE_EXCLUDES:
        anchored = pattern.startswith("/")
        is_dir = pattern.endswith("/")
        pat = pattern.strip("/").split("/")
        candidates = parts[:-1] if is_dir else parts
        starts = [0] if anchored else range(len(candidates) - len(pat) + 1)
        for i in starts:
            window = candidates[i : i + len(pat)]
            if len(window) == len(pat) and all(
                fnmatch.fnmatchcase(c, p) for c, p in zip(window, pat, strict=True)
            ):
                if is_dir or i + len(pat) == len(parts):
                    return True
    return False


def project_files(root: Path) -> list[str]:
    """Relative posix paths to ship: git's view (tracked + untracked, not ignored), else a filtered walk."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            capture_output=True,
            check=True,
            timeout=30,
        ).stdout
        names = {n for n in out.decode().split("\0") if n}
    except (OSError, subprocess.SubprocessError):
        names = set()
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root).as_posix()
            rel_dir = "" if rel_dir == "." else rel_dir + "/"
            dirnames[:] = [d for d in dirnames if not _excluded(f"{rel_dir}{d}/x")]
            names.update(f"{rel_dir}{f}" for f in filenames)
    return sorted(n for n in names if not _excluded(n) and (root / n).is_file())


def _package_dirs() -> list[tuple[Path, str]]:
    """(folder, name in zip) of the installed packages, for a pyoco that is not a source checkout."""
    import pipelines
    import pyoco

    return [(Path(pyoco.__file__).parent, "pyoco"), (Path(pipelines.__file__).parent, "pipelines")]


@dataclass
class Package:
    path: Path  # the zip (in a temporary folder the caller removes)
    config_in_job: str  # the config's path relative to the job's working dir
    files: int
    size_bytes: int


def build_package(config_path: Path, workdir: Path) -> Package:
    """Write the deterministic working_dir zip into ``workdir`` (see the module docstring)."""
    config_path = config_path.resolve()
    entries: dict[str, Path] = {}
    root = project_root()
    if root is not None:
        for rel in project_files(root):
            entries[rel] = root / rel
    else:
        for folder, name in _package_dirs():
            for path in folder.rglob("*"):
                rel = f"{name}/{path.relative_to(folder).as_posix()}"
                if path.is_file() and not _excluded(rel):
                    entries[rel] = path
    config_in_job = next((rel for rel, p in entries.items() if p.resolve() == config_path), None)
    if config_in_job is None:
        config_in_job = f"{STAGED_CONFIG_DIR}/{config_path.name}"
        entries[config_in_job] = config_path

    total = sum(p.stat().st_size for p in entries.values())
    if total > MAX_PACKAGE_BYTES:
        biggest = sorted(entries, key=lambda r: entries[r].stat().st_size, reverse=True)[:3]
        raise PyocoError(
            f"the project package would be {total / 2**20:.0f} MiB (Ray accepts {MAX_PACKAGE_BYTES / 2**20:.0f});"
            f" largest files: {', '.join(biggest)}; keep data out of the project folder (or git-ignore it)"
        )
    zip_path = workdir / "pyoco-job.zip"
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel in sorted(entries):
            info = zipfile.ZipInfo(rel, date_time=_ZIP_DATE)
            info.external_attr = (entries[rel].stat().st_mode & 0o777) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entries[rel].read_bytes())
    return Package(zip_path, config_in_job, len(entries), total)

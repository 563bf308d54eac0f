"""Resumable runs: work units, their identity, completion markers, and the clean-up of the staging area.

A *unit* is the grain of work and of resumption: one WebDataset shard, or a run of index rows of a captioned
folder / UCF-101 tree (in ``(source, key)`` order) cut where the content says (:func:`folder_units`: about
``UNIT_VIDEOS`` rows, at most ``UNIT_MAX_VIDEOS``), so adding or removing a video touches one or two units.
The index has one block per unit, and the decode stage runs one task per unit
(:func:`pipelines.preprocess.stages.decode_batch`).

Identity (:class:`UnitPlan`): sha256 of the content key (:func:`content_key`: config, devices, VAE), the
code identity (:func:`code_identity`: the installed pyoco version and a digest of the modules that shape a
unit's output, so a code change that alters the clips invalidates the markers of older code), the unit's
name, and an order-free digest of its index rows: every field (caption, labels, byte range, reject reason...), the
input's *stamp* (size and ETag or mtime of the shard, or of each video: :func:`input_stamp`), and whether
the row loses to a duplicate caption elsewhere (caption de-duplication is global, so a unit's output also
depends on the other units' captions).

Marker: ``OUT/.staging/units/<sha(unit)[:20]>-<identity>.parquet``, the unit's summary rows (its clips'
ids, splits and files; its decode and motion rejects, i.e. its ledger rows). The driver writes it once
every video of the unit has come back from the write stage (:class:`UnitTracker`), so after the unit's clip
files. A rerun lists ``units/`` once: a unit whose marker carries its current identity is not decoded
again (its summary is read back instead, :func:`read_markers`); a marker of the same unit with another
identity is deleted before the unit is redone. Clip files of units that never finished (a killed run) are
named by no marker and are deleted before the commit (:func:`prune_clips`).
"""

from __future__ import annotations

import ast
import hashlib
import importlib.util
import io
import json
from collections import Counter, defaultdict
from pathlib import Path

from pipelines.preprocess.schemas import summary_schema

UNITS_DIR = "units"
UNIT_VIDEOS = 64  # mean index rows per unit of a folder / UCF-101 input (1 row in UNIT_VIDEOS starts one)
UNIT_MAX_VIDEOS = 4 * UNIT_VIDEOS  # cap: a run this long with no cut row is cut anyway
IDENTITY_FIELDS = (
    "source", "key", "video_uri", "offset", "size", "caption", "labels", "reason", "stage", "detail", "stamp",
)  # fmt: skip
# The modules that turn a unit's index rows into its clip rows and files: decode + clip + resize, shot cuts,
# motion scores, caption states, latents, the row layout and the clip format. (What builds the index rows,
# captions and labels included, needs no entry: the rows themselves are in the identity.)
CONTENT_MODULES = (
    "pyoco.video", "pyoco.shots", "pyoco.text", "pyoco.vae", "pyoco.clips",
    "pipelines.preprocess.stages", "pipelines.preprocess.latents", "pipelines.preprocess.schemas",
)  # fmt: skip


def source_digest(source: str) -> str:
    """sha256 of a module's syntax tree without its docstrings: comments, formatting and docstrings do not
    count, every statement does."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and body
            and isinstance(body[0], ast.Expr)
            and isinstance(body[0].value, ast.Constant)
            and isinstance(body[0].value.value, str)
        ):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def code_identity(modules: tuple[str, ...] = CONTENT_MODULES) -> str:
    """``"<installed pyoco version>+<12 hex>"``: the version and a digest of ``modules``' source
    (:func:`source_digest`), read from the files the driver would import. Part of every unit's identity
    (the workers run the same checkout as the driver)."""
    from pipelines.preprocess.manifest import pyoco_version

    h = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            raise RuntimeError(f"preprocess code identity: no source file for module {name}")
        h.update(f"{name}\0{source_digest(Path(spec.origin).read_text())}\0".encode())
    return f"{pyoco_version()}+{h.hexdigest()[:12]}"


def input_stamp(uri: str, options) -> str | None:
    """``"size:ETag-or-mtime"`` of one stored object (None when it is gone): what tells a changed input
    from the one a marker saw."""
    from pyoco import storage

    fs, path = storage.filesystem(uri, options=options)
    try:
        info = storage.retry_transient(lambda: fs.info(path), what=f"stat {uri}")
    except Exception as err:  # noqa: BLE001 - gone or forbidden: the read records it; no stamp to key on
        if storage.is_transient(err) or isinstance(err, MemoryError):
            raise
        return None
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or info.get("LastModified")
    return f"{info.get('size')}:{stamp}"


def starts_unit(row: dict) -> bool:
    """A row whose ``(source, key)`` hash is 0 mod ``UNIT_VIDEOS`` starts a folder unit: a property of the
    row alone, so a video added or removed elsewhere moves no boundary (content-defined chunking)."""
    h = hashlib.sha256(f"{row['source']}\0{row['key']}".encode()).digest()
    return int.from_bytes(h[:8], "big") % UNIT_VIDEOS == 0


def folder_units(rows: list[dict]) -> list[list[dict]]:
    """A folder's / UCF-101 tree's index rows in ``(source, key)`` order, cut before every row that
    :func:`starts_unit` (about ``UNIT_VIDEOS`` rows per unit, geometrically distributed) and after
    ``UNIT_MAX_VIDEOS`` rows with no such cut. Each row's ``unit`` is set (``<first source>#<first key>``).

    Adding a video changes the unit it lands in, and splits it in two when the new video starts a unit;
    every other unit keeps its rows, name and identity. Only inside a run of over ``UNIT_MAX_VIDEOS``
    rows without a cut (odds about 2 % per such run) do the cap's cuts shift, up to the run's end."""
    rows = sorted(rows, key=lambda r: (r["source"], r["key"]))
    units: list[list[dict]] = []
    for r in rows:
        if not units or starts_unit(r) or len(units[-1]) >= UNIT_MAX_VIDEOS:
            units.append([])
        units[-1].append(r)
    for chunk in units:
        name = f"{chunk[0]['source']}#{chunk[0]['key']}"
        for r in chunk:
            r["unit"] = name
    return units


def stamp_batch(batch, *, options):
    """Ray Data UDF (folder / UCF-101 index): set ``stamp`` of each row that names a video."""
    import pyarrow as pa

    uris = batch.column("video_uri").to_pylist()
    stamps = [input_stamp(u, options) if u else None for u in uris]
    idx = batch.schema.get_field_index("stamp")
    return batch.set_column(idx, batch.schema.field(idx), pa.array(stamps, pa.string()))


def name_hash(unit: str) -> str:
    return hashlib.sha256(unit.encode()).hexdigest()[:20]


def marker_uri(units_uri: str, unit: str, identity: str) -> str:
    from pyoco import storage

    return storage.join(units_uri, f"{name_hash(unit)}-{identity}.parquet")


def content_key(config: dict, devices: dict[str, str], vae_identity: str | None) -> str:
    """What, besides its rows and the code, shapes every unit's output: the content-affecting config, the
    devices the embedding / latents actors run on (float results differ), and the VAE's weights identity
    (a VAE replaced at the same path must not reuse latents of the old one)."""
    from pyoco.config import config_hash

    return config_hash({"config": config, "devices": devices, "vae_identity": vae_identity})


class UnitPlan:
    """Driver side, one pass over the index: each unit's identity and number of videos to decode."""

    def __init__(self, content_hash: str, code: str):
        self.content_hash = content_hash
        self.code = code  # code_identity()
        self.digest: Counter = Counter()  # unit -> order-free sum of row hashes (mod 2**128)
        self.to_decode: Counter = Counter()  # unit -> videos that go to decode

    def add(self, row: dict, duplicate: bool) -> None:
        body = json.dumps([row.get(f) for f in IDENTITY_FIELDS] + [duplicate], default=str)
        h = int(hashlib.sha256(body.encode()).hexdigest()[:32], 16)
        unit = row["unit"] or ""
        self.digest[unit] = (self.digest[unit] + h) % (1 << 128)
        if row["reason"] is None and not duplicate:
            self.to_decode[unit] += 1
        else:
            self.to_decode[unit] += 0

    def identities(self) -> dict[str, str]:
        """``{unit: identity}`` for every unit with videos to decode."""
        return {
            u: hashlib.sha256(
                f"{self.content_hash}\0{self.code}\0{u}\0{self.digest[u]:032x}".encode()
            ).hexdigest()[:24]
            for u, n in self.to_decode.items()
            if n > 0
        }


def place_units(units: list[str], resource: str | None) -> dict[str, str]:
    """``{unit: node id}``: units dealt round-robin over the alive nodes that decode (those with
    ``resource`` when any has it, else with CPUs), each node weighted by its CPUs, so a cluster splits a
    handful of shards evenly (SPREAD alone, asked by each decode UDF in turn, can put them all on one node).
    Empty on one node. The decode task asks for its node softly: a node gone or full takes any other."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    labelled = [n for n in alive if resource and n["Resources"].get(resource, 0) > 0]
    nodes = labelled or [n for n in alive if n["Resources"].get("CPU", 0) > 0]
    if len(nodes) < 2:
        return {}
    weight = {n["NodeID"]: max(1, int(n["Resources"].get("CPU", 1))) for n in nodes}
    slots = [nid for r in range(max(weight.values())) for nid in sorted(weight) if weight[nid] > r]
    return {u: slots[i % len(slots)] for i, u in enumerate(units)}


def resume_plan(units_uri: str, identities: dict[str, str], options) -> list[str]:
    """List the markers once; delete those of other identities (or of units no longer in the input);
    return the URIs of the markers that match (their units are done)."""
    from pyoco import storage

    want = {name_hash(u): ident for u, ident in identities.items()}
    try:
        found = storage.list_files(units_uri, options=options)
    except FileNotFoundError:
        return []
    done = []
    for uri in found:
        stem = uri.rsplit("/", 1)[-1].removesuffix(".parquet")
        name, _, ident = stem.partition("-")
        if uri.endswith(".parquet") and want.get(name) == ident:
            done.append(uri)
        else:
            storage.remove(uri, options=options)
    return sorted(done)


def read_markers(batch, *, options):
    """Ray Data UDF: marker URIs (column ``marker``) → their summary rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pyoco import storage

    tables = [
        pq.read_table(io.BytesIO(storage.read_bytes(u, options=options))).cast(summary_schema())
        for u in batch.column("marker").to_pylist()
    ]
    return pa.concat_tables(tables) if tables else pa.Table.from_pylist([], schema=summary_schema())


class UnitTracker:
    """Driver side: collects the summary rows of the units being decoded and writes a unit's marker as soon
    as all of it is back: every video to decode (a reject row, or its clip rows: ``video_clips`` of them)."""

    def __init__(self, units_uri: str, identities: dict[str, str], to_decode: dict[str, int], options):
        self.units_uri = units_uri
        self.identities = identities
        self.left = dict(to_decode)  # unit -> videos not back yet
        self.rows: dict[str, list[dict]] = defaultdict(list)
        self.rows_due: Counter = Counter()  # unit -> rows announced by the videos back so far
        self.options = options
        self.written = 0

    def add(self, row: dict) -> None:
        unit = row["unit"]
        self.rows[unit].append(row)
        if row["reason"] is not None or row["clip_index"] == 0:
            self.left[unit] -= 1
            self.rows_due[unit] += 1 if row["reason"] is not None else row["video_clips"]
        if self.left[unit] == 0 and len(self.rows[unit]) == self.rows_due[unit]:
            self._write(unit)

    def _write(self, unit: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pyoco import storage

        rows = sorted(self.rows.pop(unit), key=lambda r: (r["source"], r["key"], r["clip_index"] or 0))
        buf = io.BytesIO()
        pq.write_table(pa.Table.from_pylist(rows, schema=summary_schema()), buf)
        storage.write_bytes(
            marker_uri(self.units_uri, unit, self.identities[unit]), buf.getvalue(), options=self.options
        )
        del self.left[unit], self.rows_due[unit]
        self.written += 1


def prune_clips(clips_uri: str, keep: set[str], options) -> int:
    """Delete the staged clip files no unit's summary names (files of units a killed run never finished);
    return how many."""
    from pyoco import storage

    fs, root = storage.filesystem(clips_uri, options=options)
    if not fs.exists(root):
        return 0
    root = root.rstrip("/") + "/"
    stale = [p for p in fs.find(root) if p.startswith(root) and p[len(root) :] not in keep]
    for p in stale:
        storage.retry_transient(lambda p=p: fs.rm(p), what=f"remove {p}")
    return len(stale)

"""``pyoco preprocess``: raw videos (WebDataset shards, a captioned folder, or UCF-101 class folders, local or
s3://) → training clips in parquet, with a ledger of every rejected input and a manifest.

Over 400 lines: about a sixth is this docstring (the pipeline's stages and invariants); the stages,
ledger, manifest and latents live in their own modules, and ``run_preprocess`` wires them.

Pipeline (Ray Data, streaming; every stage runs in Ray tasks/actors, never on the driver)::

    index (1 task per shard: tar headers + captions + the shard's stamp, no video bytes; a folder's rows
      are listed on the driver and stamped in tasks, ~64 per unit) → caption rules (pyoco.captions)
      → materialise the small index (one block per unit) → duplicate captions resolved on the driver
        (first (source, key) wins, over all units), unit identities, units already done skipped
      → decode + clip + resize/crop (one streaming task per unit, pyoco.video; reads by byte range)
      → caption embedding (MiniLM, actor pool of ``embed_actors``, autoscaled for ``auto``) → write
        parquet (tasks); embed, latents and write take whole blocks (one unit, or a ~128 MiB piece of a
        big one: ``target_max_block_size``), so no batch mixes units; a file holds one unit's clips, at
        most rows_per_file, in clip-id order
      → a small per-row summary streams back to the driver, which writes each unit's marker as soon as
        the unit is written, then rejects/ and manifest.json.

Resumable (:mod:`pipelines.preprocess.units`): a unit (a shard, or a content-defined run of ~64 rows of a
folder) whose marker in ``OUT/.staging/units/`` carries its identity (input stamp, content-affecting config
and code, dedupe outcome) is not decoded again; its summary rows are read back from the marker.

Placement (:mod:`pipelines.preprocess.placement`): units are dealt round-robin over the decoding nodes
(:func:`units.place_units`). Every CPU task and actor requests ``cfg.resource`` (default ``preprocess``, a
tiny fraction of one unit, so it acts as a node label) when some node offers it, else plain CPU scheduling.
Decode tasks take ``num_cpus_per_task`` CPUs, index and write tasks at most a quarter CPU, embedding actors
``embed_num_cpus`` (default 0: MiniLM on short captions costs a few % of decoding, and a whole CPU per actor
would starve decode on small nodes). With GPUs in the cluster (and ``accelerator: auto``) the embedding and
latents actors are GPU actors instead; decode never asks for a GPU.

Memory: Ray Data's streaming executor backpressures between stages, so the data in flight is bounded
by the object store, whatever the dataset size. What grows with the dataset is the index (a few hundred
bytes per video, in the object store, spillable), the driver's duplicate table (one 32-char hash per
distinct caption) and the reject ledger. Frames are stored as ``large_binary`` (64-bit offsets), so big
rows never hit Arrow's 2 GiB ``binary`` offset limit, and a file holds at most ``rows_per_file`` rows and
about 256 MiB.

Output (ARCHITECTURE.md)::

    OUT/clips/train/part-<hash>.parquet  one row per clip of a training video (schema: pyoco.clips)
    OUT/clips/val/part-<hash>.parquet    one row per clip of a held-out video
    OUT/rejects/part-00000.parquet       one row per rejected input: source, key, stage, reason, detail
    OUT/manifest.json                    counts (per split too), rejects by reason, config, data and
                                         eval-data hashes, pyoco version, decode nodes

A run writes ``clips/``, ``rejects/`` and its unit markers under ``OUT/.staging/`` and swaps ``clips/`` and
``rejects/`` in for the previous run's only once every unit is done and the run has succeeded (accounting
holds, reject fraction within ``max_reject_fraction``), writing ``manifest.json`` last (:func:`_publish`);
staged clip files that no finished unit names (a killed run's) are deleted first. A failed or killed run
leaves ``OUT/`` as it was and its own outputs in ``OUT/.staging/`` (with ``manifest.incomplete.json`` when it
failed), from which a rerun resumes.

The clip columns, and how a video is assigned to train or val (``preprocess.val_fraction``, a threshold on
a hash of the video's key: stable when videos are added), are documented in :mod:`pyoco.clips`. We store
the token-level ``(L, D)`` caption states and the mask rather than a pooled ``(D,)`` vector because that is
exactly the cross-attention input training needs (so training never runs the text encoder).

Labels (the ``labels`` column, JSON object text): a WebDataset sample's ``.json`` member (the object as-is,
e.g. the synth ground truth), ``{"class": TEXT}`` from a ``.cls`` member (merged into the ``.json`` object
when a sample has both), ``{"class": NAME}`` for a UCF-101 class folder; null otherwise.

Reject reasons (``rejects/`` ``stage`` / ``reason``):

- ``read``: ``not_a_tar`` (a shard tarfile can't open, or an empty one), ``truncated_tar`` (a member cut off
  by the end of the shard, or an unreadable tail), ``unsafe_path`` (``../``, absolute, link or device
  members: never extracted, never used as a path), ``missing_video`` (a key with no video member, or a
  captions-file line naming a missing file), ``duplicate_entry`` (a file listed twice), ``read_error``
  (a file that disappeared between listing and reading);
- ``labels``: ``bad_labels`` (a ``.json`` member that is not a JSON object or is over 64 KiB, a ``.cls``
  member that is empty or over 1 KiB: a sample whose labels would be silently lost);
- ``caption``: the ``caption_*`` codes of :mod:`pyoco.captions`; ``dedupe``: ``duplicate_caption``;
- ``read`` (storage): ``access_denied`` and ``storage_error``, a *permanent* storage error on one object
  (forbidden, invalid range, ...), recorded at once, never retried;
- ``decode``: :data:`pyoco.video.DECODE_REASONS` (``empty_file``, ``decode_error``, ``no_video_stream``,
  ``too_short``), and ``decode_crash``: the video killed its decode worker process (segfault, OOM kill)
  when decoded alone (:func:`decode_batch`).

A transient storage error that outlasts the retries (see :mod:`pyoco.storage`) fails the job with an
error, and so does ``MemoryError``; neither is ever recorded as a property of the data. More than
``max_reject_fraction`` (default 0.5) of the inputs rejected fails the step, naming the top reasons.

Accounting: every input (a sample of a shard, a video of a folder, a damaged shard or tail of a shard)
is exactly one row of the index. The step fails, without writing a manifest, unless
``inputs == accepted_videos + sum(rejected.values())``.

Config: ``--config`` takes the workflow YAML (its ``preprocess:`` section is used) or a YAML file whose
top level is just the preprocess fields (``input:``, ``output:``, ...).
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable

from pipelines.common import PyocoError, console
from pipelines.context import apply_worker_pool_env
from pipelines.preprocess.discover import StepSettings, discover_inputs
from pipelines.preprocess.latents import latent_plan, latent_stage
from pipelines.preprocess.ledger import STAGE_DEDUPE, _check_reject_fraction, _RejectWriter
from pipelines.preprocess.manifest import STAGING, _prepare_output, _publish, pyoco_version
from pipelines.preprocess.placement import devices, embed_args, embed_pool, task_args
from pipelines.preprocess.schemas import index_schema
from pipelines.preprocess.stages import (
    CRASH_TEST_ENV,
    CaptionEmbedder,
    decode_batch,
    drop_rejected,
    write_batch,
)
from pipelines.preprocess.tar_index import index_batch
from pipelines.preprocess.units import (
    UnitPlan,
    UnitTracker,
    code_identity,
    content_key,
    folder_units,
    marker_uri,
    place_units,
    prune_clips,
    read_markers,
    resume_plan,
    stamp_batch,
)
from pyoco import clips as clipfmt
from pyoco.config import ConfigError, PreprocessConfig, config_hash
from pyoco.pretrained import resolve_text

MAX_FILE_BYTES = 256 * 2**20  # target upper bound of one clips parquet file


# Config fields that change how the step runs or where it writes, never what the clips contain.
EXECUTION_ONLY_FIELDS = {
    "output",
    "rows_per_file",
    "embed_actors",
    "embed_batch_size",
    "embed_num_cpus",
    "decode_threads",
    "videos_per_task",
    "resource",
    "num_cpus_per_task",
    "s3_endpoint_url",
    "max_reject_fraction",
    "latent_actors",
    "latent_batch_size",
    "latent_num_gpus",
    "latent_num_cpus",
    "accelerator",  # the devices it resolves to are in the unit identity (placement.devices)
}


# ------------------------------------------------------------------------------------------------ the step


def _init_ray(ray_address: str | None, resource: str | None) -> bool:
    """Connect to (or start) Ray; True when this call started it (so it should shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_address or os.environ.get("RAY_ADDRESS") or None
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        apply_worker_pool_env()
        cpus = os.cpu_count() or 1
        ray.init(
            num_cpus=cpus,
            resources={resource: cpus} if resource else None,
            include_dashboard=False,
            log_to_driver=False,
            configure_logging=False,
        )
    return True


def rows_per_file(cfg: PreprocessConfig, text_dim: int, latents=None) -> int:
    """``cfg.rows_per_file``, lowered so that one file stays under ~256 MiB (frames, D-wide token states,
    and float16 latents when ``latents``, a `LatentPlan`, is given)."""
    frames = cfg.num_frames * cfg.size * cfg.size * 3 if cfg.keep_frames or latents is None else 0
    latent_bytes = 2 * math.prod(latents.shape) if latents is not None else 0
    row_bytes = frames + latent_bytes + cfg.text_max_length * (text_dim * 4 + 1) + 512
    return max(1, min(cfg.rows_per_file, MAX_FILE_BYTES // row_bytes))


def run_preprocess(
    cfg: PreprocessConfig,
    *,
    ray_address: str | None = None,
    progress: bool = True,
    workflow_hash: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Run the step; returns the manifest (also written to ``OUT/manifest.json``).

    Raises PyocoError when the accounting invariant fails (nothing is reported as success then).
    ``on_progress(videos_done, videos_to_decode)`` is called on the driver as decoded videos come back.
    """
    import ray
    import ray.data

    from pyoco import storage

    started = time.monotonic()
    options = storage.StorageOptions.from_env(cfg.s3_endpoint_url)
    # What Ray tasks get: endpoint and region only. Credentials would live in the task specs and in the
    # serialized map functions (object store, which spills to disk); the workers read the AWS_* variables
    # (or their instance role) from their own environment instead.
    task_options = dataclasses.replace(options, key=None, secret=None, token=None)
    settings = StepSettings.from_config(cfg)
    settings.caption_filter()  # validate rules before starting anything
    # The VAE and text encoder loads (driver and actors) get the endpoint only, like the tasks.
    model_options = storage.loader_options(options)
    _, text_dim, _ = resolve_text(cfg.text_encoder, cfg.text_max_length, storage_options=model_options)
    latents = (
        latent_plan(cfg, model_options) if cfg.latents else None
    )  # before Ray: a wrong VAE costs nothing
    plan = discover_inputs(cfg.input, cfg.format, settings, options)
    clips_uri, rejects_uri, units_uri = _prepare_output(cfg, options)
    content_config = cfg.model_dump(mode="json", exclude=EXECUTION_ONLY_FIELDS)
    code = code_identity()
    own_ray = _init_ray(ray_address, cfg.resource)
    try:
        ctx = ray.data.DataContext.get_current()
        saved_ctx = (ctx.enable_progress_bars, ctx.execution_options.preserve_order)
        ctx.enable_progress_bars = progress
        ctx.execution_options.preserve_order = False
        cluster = ray.cluster_resources()
        decode_args = task_args(cfg, cfg.num_cpus_per_task, cluster)
        light_args = task_args(cfg, min(0.25, cfg.num_cpus_per_task), cluster)
        # The actors' devices change their float output: part of every unit's identity.
        device = devices(cfg, cluster)

        # Stage 1: index (per shard, in tasks) or ready rows (folder/ucf101, listed on the driver, stamped
        # in tasks). Either way one block per unit (units.py): the decode stage runs a task per unit.
        if plan.kind == "webdataset":
            shards = ray.data.from_items(
                [{"shard": s} for s in plan.shards], override_num_blocks=len(plan.shards)
            )
            index = shards.map_batches(
                index_batch,
                batch_size=1,
                batch_format="pyarrow",
                fn_kwargs={"settings": settings, "options": task_options},
                **light_args,
            )
        else:
            import pyarrow as pa

            tables = [pa.Table.from_pylist(u, schema=index_schema()) for u in folder_units(plan.rows)]
            plan.rows = []
            index = ray.data.from_arrow(tables).map_batches(
                stamp_batch, batch_size=None, batch_format="pyarrow", fn_kwargs={"options": task_options}
            )
        index = index.materialize()

        # Driver pass over the small index: count inputs, ledger the rejects, resolve duplicates (first
        # (source, key) wins, over all units), and each unit's identity and videos to decode.
        rejects = _RejectWriter(rejects_uri, options)
        inputs = 0
        first_of: dict[str, tuple[str, str]] = {}  # dedupe key -> smallest (source, key)
        for b in index.iter_batches(batch_format="pyarrow", batch_size=4096):
            for r in b.select(["source", "key", "dedupe_key", "reason"]).to_pylist():
                if r["reason"] is None and r["dedupe_key"] is not None:
                    ident = (r["source"], r["key"])
                    cur = first_of.get(r["dedupe_key"])
                    if cur is None or ident < cur:
                        first_of[r["dedupe_key"]] = ident
        duplicates: set[str] = set()
        vae_identity = latents.identity if latents is not None else None
        units = UnitPlan(content_key(content_config, device, vae_identity), code)
        for b in index.iter_batches(batch_format="pyarrow", batch_size=4096):
            for r in b.to_pylist():
                inputs += 1
                dup = False
                if r["reason"] is not None:
                    rejects.add(r["source"], r["key"], r["stage"], r["reason"], r["detail"])
                elif r["dedupe_key"] is not None:
                    first = first_of[r["dedupe_key"]]
                    if (r["source"], r["key"]) != first:
                        dup = True
                        duplicates.add(f"{r['source']}\0{r['key']}")
                        rejects.add(
                            r["source"],
                            r["key"],
                            STAGE_DEDUPE,
                            "duplicate_caption",
                            f"same caption as {first[1]} in {first[0]}",
                        )
                units.add(r, dup)
        first_of.clear()
        to_decode = inputs - sum(rejects.by_reason.values())
        identities = units.identities()
        resumed = resume_plan(units_uri, identities, options)  # markers of units already done
        resumed_set = set(resumed)
        done_units = {u for u in identities if marker_uri(units_uri, u, identities[u]) in resumed_set}
        tracker = UnitTracker(
            units_uri,
            identities,
            {u: units.to_decode[u] for u in identities if u not in done_units},
            options,
        )

        # Stages 2-4, streaming: decode (a task per unit) → embed (actor pool) → write parquet (tasks) →
        # summary rows, after those of the units already done (read back from their markers).
        accepted_videos = clips_written = 0
        nodes: Counter = Counter()
        clip_files: set[str] = set()
        clips_digest = 0  # order-independent digest of every clip id written
        per_split = {sp: {"clips": 0, "videos": 0, "digest": 0} for sp in clipfmt.SPLITS}
        decode_seen = 0
        clips_dropped: Counter = Counter()  # clips of accepted videos dropped by reason (static, jitter)
        decode_started = time.monotonic()
        decode_work = 0.0  # seconds the decode tasks spent on this run's videos (not the resumed units')
        if to_decode > 0:
            per_file = rows_per_file(cfg, text_dim, latents)
            placement = place_units([u for u in sorted(identities) if u not in done_units], cfg.resource)
            # Once in the object store, not pickled into every task's arguments.
            shared_ref = ray.put((duplicates, done_units, placement))
            ds = (
                index.map_batches(
                    drop_rejected,
                    batch_size=None,
                    batch_format="pyarrow",
                    fn_kwargs={"shared_ref": shared_ref},
                    **light_args,
                )
                .map_batches(
                    decode_batch,
                    batch_size=None,  # one block, one unit
                    batch_format="pyarrow",
                    fn_kwargs={
                        "settings": settings,
                        "options": task_options,
                        "task_args": {**decode_args, "scheduling_strategy": "SPREAD"},
                        "crash_on_key": os.environ.get(CRASH_TEST_ENV) or None,
                        "chunk": cfg.videos_per_task,
                        "shared_ref": shared_ref,
                    },
                    **light_args,
                )
                .map_batches(
                    CaptionEmbedder,
                    batch_size=None,  # whole blocks: units never mix (it encodes embed_batch_size at a time)
                    batch_format="pyarrow",
                    compute=ray.data.ActorPoolStrategy(**embed_pool(cfg, cluster)),
                    fn_constructor_kwargs={
                        "text_encoder": cfg.text_encoder,
                        "text_len": cfg.text_max_length,
                        "threads": max(1, math.floor(cfg.embed_num_cpus)),
                        "storage_options": model_options,
                        "device": device["embed"],
                        "batch_size": cfg.embed_batch_size,
                    },
                    **embed_args(cfg, cluster),
                )
            )
            if latents is not None:
                ds = latent_stage(ds, cfg, latents, cluster, model_options)
            ds = ds.map_batches(
                write_batch,
                batch_size=None,  # one block of one unit: its marker can follow as soon as it is written
                batch_format="pyarrow",
                fn_kwargs={
                    "clips_uri": clips_uri,
                    "text_len": cfg.text_max_length,
                    "val_fraction": cfg.val_fraction,
                    "options": task_options,
                    "rows_per_file": per_file,
                    "latents": latents,
                },
                **light_args,  # parquet + zstd of a few MB: a quarter CPU, so decode keeps its slots
            )
            sources = [(False, _iter_summaries(ds))] if len(done_units) < len(identities) else []
            if resumed:
                old = ray.data.from_items([{"marker": u} for u in resumed]).map_batches(
                    read_markers, batch_size=64, batch_format="pyarrow", fn_kwargs={"options": task_options}
                )
                sources.insert(0, (True, _iter_summaries(old)))
            for was_done, batches in sources:
                for b in batches:
                    before = decode_seen
                    for r in b.to_pylist():
                        if not was_done:
                            tracker.add(r)
                            decode_work += r["decode_s"] or 0.0
                        if r["reason"] is not None:
                            decode_seen += 1
                            rejects.add(r["source"], r["key"], r["stage"], r["reason"], r["detail"])
                            continue
                        clips_written += 1
                        if r["dropped"]:
                            clips_dropped.update(json.loads(r["dropped"]))
                        clip_files.add(r["file"])
                        clips_digest = (clips_digest + int(r["clip_id"], 16)) % (1 << 128)
                        side = per_split[r["split"]]
                        side["clips"] += 1
                        side["digest"] = (side["digest"] + int(r["clip_id"], 16)) % (1 << 128)
                        if r["clip_index"] == 0:
                            decode_seen += 1
                            accepted_videos += 1
                            side["videos"] += 1
                            nodes[r["node_id"]] += 1
                    if on_progress is not None and decode_seen != before:
                        on_progress(decode_seen, to_decode)
            if os.environ.get("PYOCO_DATA_STATS"):  # per-operator timings, for tuning
                console.print(ds.stats())
        decode_s = time.monotonic() - decode_started
        rejects.flush(final=True)
    except (PyocoError, ConfigError, FileNotFoundError):
        raise
    except Exception as err:  # Ray task errors: one line for the CLI, the cause chained for PYOCO_DEBUG
        first = " ".join(str(err).split())[:400]
        raise PyocoError(f"preprocess failed: {type(err).__name__}: {first}", exit_code=1) from err
    finally:
        if "saved_ctx" in locals():
            ctx.enable_progress_bars, ctx.execution_options.preserve_order = saved_ctx
        if own_ray:
            ray.shutdown()

    rejected = dict(sorted(rejects.by_reason.items()))
    warnings = []
    if cfg.val_fraction > 0 and accepted_videos and per_split["val"]["videos"] == 0:
        warnings.append(
            f"val split is empty: none of the {accepted_videos} accepted videos hashed below val_fraction "
            f"{cfg.val_fraction} (the split is a per-video hash threshold, so tiny datasets can get no val "
            "video; add videos or raise preprocess.val_fraction)"
        )
        console.print(f"[yellow]warning:[/] {warnings[-1]}")
    manifest = {
        "pyoco_version": pyoco_version(),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "input": cfg.input,
        "output": cfg.output,
        "format": plan.kind,
        "config_hash": config_hash(cfg.model_dump(mode="json")),
        "workflow_config_hash": workflow_hash,
        "config": cfg.model_dump(mode="json"),
        "inputs": inputs,
        "accepted_videos": accepted_videos,
        "clips_written": clips_written,
        "train_videos": per_split["train"]["videos"],
        "val_videos": per_split["val"]["videos"],
        "train_clips": per_split["train"]["clips"],
        "val_clips": per_split["val"]["clips"],
        "val_fraction": cfg.val_fraction,
        "split_rule": "val iff sha256(key)[:8] / 2**64 < val_fraction (pyoco.clips.split_of)",
        "rejected": rejected,
        "clips_dropped": dict(sorted(clips_dropped.items())),
        "invariant": "inputs == accepted_videos + sum(rejected.values())",
        # Same inputs + config -> same data_hash, whatever the cluster (file names depend on the units' content only).
        "data_hash": config_hash(
            {
                "config": content_config,
                "inputs": inputs,
                "rejected": rejected,
                "clips": clips_digest,
            }
        ),
        # What evaluate measures on: the val clip ids and the config that shapes their content. Metrics with
        # different eval_data_hash were computed on different clips and are not comparable.
        "eval_data_hash": config_hash(
            {
                "config": {k: v for k, v in content_config.items() if k not in ("input", "val_fraction")},
                "val_clips": per_split["val"]["clips"],
                "val_digest": per_split["val"]["digest"],
            }
        ),
        "warnings": warnings,
        "clip_files": sorted(clip_files),
        "reject_files": rejects.files,
        "ignored_files": plan.ignored,
        "decode_nodes": dict(sorted(nodes.items())),
        "clip_shape": [cfg.num_frames, cfg.size, cfg.size, 3],
        "caption_embedding": {
            "encoder": cfg.text_encoder,
            "shape": [cfg.text_max_length, text_dim],
            "dtype": "float32",
            "level": "token",
        },
        **({"latents": latents.manifest()} if latents is not None else {}),
        "code_identity": code,  # pyoco version + digest of the modules that shape the clips (units.py)
        "devices": device,  # where the embedding / latents actors ran (placement.py)
        "units": len(identities),
        "units_resumed": len(done_units),
        "decode_s": round(decode_s, 2),  # decode → write, after indexing (what a resumed run saves)
        "decode_task_s": round(decode_work, 2),  # summed over this run's videos
        "videos_decoded": sum(units.to_decode[u] for u in identities if u not in done_units),  # this run's
        "elapsed_s": round(time.monotonic() - started, 2),
    }
    problems = []
    if inputs != accepted_videos + sum(rejected.values()):
        problems.append(f"inputs {inputs} != accepted {accepted_videos} + rejected {sum(rejected.values())}")
    if decode_seen != to_decode:
        problems.append(f"{to_decode} videos went to decode but {decode_seen} came back")
    failure = "preprocess accounting failed: " + "; ".join(problems) if problems else None
    if failure is None:
        too_many = _check_reject_fraction(cfg, inputs, rejected)
        failure = f"preprocess failed: {too_many}" if too_many else None
    if failure is not None:
        # The previous outputs stay as they were; this run's are kept in OUT/.staging/ for inspection.
        staging = storage.join(cfg.output, STAGING)
        storage.write_bytes(
            storage.join(staging, "manifest.incomplete.json"),
            json.dumps(manifest, indent=2).encode(),
            options=options,
        )
        raise PyocoError(f"{failure} (this run's outputs are in {staging}; {cfg.output} is unchanged)", 1)
    prune_clips(clips_uri, clip_files, options)  # files of units a killed run left unfinished
    _publish(cfg.output, manifest, options)
    return manifest


def _iter_summaries(ds):
    return ds.iter_batches(batch_format="pyarrow", batch_size=None)

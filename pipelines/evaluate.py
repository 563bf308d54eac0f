"""``pyoco evaluate``: a deterministic validation loss, sample metrics and (optionally) FVD for one model.

    run_evaluate("out/model", "out/data", EvaluateConfig(num_clips=16)) -> results dict (JSON-able)

Validation loss. The evaluation clips are the ``num_clips`` smallest ``clip_id`` values of the data folder
(clip ids are content hashes, so this is a fixed pseudo-random subset that does not depend on file order).
Every clip gets its own noise stream ``clip_generators(seed, [id(clip)])`` and one draw eps from the prior,
reused at every timestep of the grid (common random numbers: the per-timestep numbers differ only by t).
For each t in the grid, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps and the loss is the unweighted MSE
between the model output and the target of the schedule's prediction type (eps or v), averaged over
clips. ``val_loss`` is the mean over the grid. Same checkpoint + same data + same config = same number
(to float32 round-off on the same machine; batches have a fixed composition).

Sample metrics. Videos generated from the fixed prompt list (video i uses the stream
``clip_generators(seed, [i])``), at the real clips' size and length:

- temporal consistency: mean absolute frame-to-frame change in [0, 1] (``pyoco.metrics``), for the
  generated and the real clips, and the gap between the two;
- FVD: the Fréchet distance between features of real and generated clips from a user-supplied
  TorchScript extractor (``--fvd-extractor``, e.g. the I3D export used by StyleGAN-V). Without one FVD
  is reported as skipped, never as a number.

Layouts: parquet ``frames`` are uint8 (T, H, W, 3) bytes -> model input float (B, 3, T, H, W) in [-1, 1];
``caption_embedding`` (L*D floats, or (D,) pooled = L 1) -> (B, L, D) float32 with ``caption_mask`` (B, L).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer

from pipelines.common import PyocoError, cli_errors, console
from pyoco.config import EvaluateConfig, ModelConfig, NoiseConfig


# ---------------------------------------------------------------------------------------------- the data
@dataclass
class EvalClips:
    clip_ids: list[str]
    captions: list[str]
    frames: Any  # uint8 (N, T, H, W, 3) numpy
    cond: Any  # float32 (N, L, D) numpy
    mask: Any  # bool (N, L) numpy


def clip_stream_id(clip_id: str) -> int:
    """A stable integer per clip id for ``clip_generators`` (hex ids are used directly)."""
    try:
        return int(clip_id[:15], 16)
    except ValueError:
        return int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:7], "little")


def _embedding_rows(column, embed_dim: int, source: str):
    """(N, L, D) float32 from a fixed-size or variable list column of L*D (or D, pooled) floats."""
    import numpy as np

    rows = column.to_pylist()
    out = []
    for i, row in enumerate(rows):
        if row is None:
            raise PyocoError(f"{source}: caption_embedding is empty in row {i}")
        arr = np.asarray(row, dtype=np.float32)
        if arr.size % embed_dim:
            raise PyocoError(
                f"{source}: caption_embedding has {arr.size} values, not a multiple of the model's "
                f"cross-attention width {embed_dim}"
            )
        out.append(arr.reshape(-1, embed_dim))
    lengths = {a.shape[0] for a in out}
    if len(lengths) != 1:
        raise PyocoError(f"{source}: caption_embedding lengths differ between rows ({sorted(lengths)})")
    return np.stack(out)


def load_eval_clips(data: str, num_clips: int, *, embed_dim: int) -> EvalClips:
    """The first ``num_clips`` clips by clip_id of the held-out split, ``data``/clips/val/*.parquet (local or
    s3://): evaluate never reads the training clips."""
    import numpy as np
    import pyarrow.parquet as pq

    from pyoco import clips as clipfmt
    from pyoco.storage import filesystem

    clips_uri = clipfmt.split_uri(data, "val")
    fs, _ = filesystem(clips_uri)
    try:
        files = [filesystem(u)[1] for u in clipfmt.clip_files(data, "val")]
    except clipfmt.DataError as err:
        raise PyocoError(str(err)) from None
    required = {"clip_id", "frames", "num_frames", "height", "width", "caption_embedding"}
    ids: list[tuple[str, int]] = []
    for i, f in enumerate(files):
        with fs.open(f, "rb") as fh:
            pf = pq.ParquetFile(fh)
            missing = required - set(pf.schema_arrow.names)
            if missing:
                raise PyocoError(f"{f}: missing columns {sorted(missing)}")
            ids += [(cid, i) for cid in pf.read(columns=["clip_id"]).column(0).to_pylist()]
    chosen = sorted(ids)[:num_clips]
    by_file: dict[int, set[str]] = {}
    for cid, i in chosen:
        by_file.setdefault(i, set()).add(cid)
    rows: dict[str, dict] = {}
    embeds: dict[str, Any] = {}
    masks: dict[str, Any] = {}
    for i, wanted in sorted(by_file.items()):
        with fs.open(files[i], "rb") as fh:
            table = pq.read_table(fh)
        keep = [j for j, cid in enumerate(table.column("clip_id").to_pylist()) if cid in wanted]
        table = table.take(keep)
        emb = _embedding_rows(table.column("caption_embedding"), embed_dim, files[i])
        if "caption_mask" in table.column_names:
            mask = np.asarray(table.column("caption_mask").to_pylist(), dtype=bool).reshape(len(table), -1)
        else:
            mask = np.ones(emb.shape[:2], dtype=bool)
        if mask.shape != emb.shape[:2]:
            raise PyocoError(f"{files[i]}: caption_mask shape {mask.shape} != embedding {emb.shape[:2]}")
        for j, row in enumerate(
            table.select(
                ["clip_id", "frames", "num_frames", "height", "width", "caption"]
                if "caption" in table.column_names
                else ["clip_id", "frames", "num_frames", "height", "width"]
            ).to_pylist()
        ):
            rows[row["clip_id"]] = row
            embeds[row["clip_id"]], masks[row["clip_id"]] = emb[j], mask[j]
    order = [cid for cid, _ in chosen]
    shapes = {(rows[c]["num_frames"], rows[c]["height"], rows[c]["width"]) for c in order}
    if len(shapes) != 1:
        raise PyocoError(f"{clips_uri}: clips differ in (frames, height, width): {sorted(shapes)}")
    t, h, w = shapes.pop()
    frames = np.stack([np.frombuffer(rows[c]["frames"], dtype=np.uint8).reshape(t, h, w, 3) for c in order])
    return EvalClips(
        clip_ids=order,
        captions=[rows[c].get("caption") or "" for c in order],
        frames=frames,
        cond=np.stack([embeds[c] for c in order]),
        mask=np.stack([masks[c] for c in order]),
    )


# ---------------------------------------------------------------------------------------------- the loss
def validation_loss(
    package,
    clips: EvalClips,
    prior,
    *,
    timesteps: list[int],
    seed: int,
    batch_size: int = 4,
) -> dict[int, float]:
    """{t: mean over clips of the unweighted prediction MSE at timestep t} (see the module docstring)."""
    import torch

    from pyoco.diffusion import DiffusionLoss
    from pyoco.noise import clip_generators

    loss_fn = DiffusionLoss(package.scheduler_config or None)
    bad = [t for t in timesteps if not 0 <= int(t) < loss_fn.num_train_timesteps]
    if bad:
        raise PyocoError(f"evaluate.timesteps {bad} outside [0, {loss_fn.num_train_timesteps})")
    model = package.denoiser.eval()
    sums = {int(t): 0.0 for t in timesteps}
    n = len(clips.clip_ids)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            # uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]
            x0 = torch.from_numpy(clips.frames[sl]).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
            if package.vae is not None:
                from pyoco.model import encode_video

                x0 = encode_video(package.vae, x0)
            cond = torch.from_numpy(clips.cond[sl]).float()
            mask = torch.from_numpy(clips.mask[sl])
            gens = clip_generators(seed, [clip_stream_id(c) for c in clips.clip_ids[sl]])
            eps = prior.sample(x0.shape, generator=gens, dtype=x0.dtype)
            for t in sums:
                tt = torch.full((x0.shape[0],), t, dtype=torch.long)
                x_t, target = loss_fn.noisy(x0, eps, tt)
                pred = model(x_t, tt, cond, mask)
                per_clip = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3, 4))
                sums[t] += float(per_clip.double().sum())
    return {t: s / n for t, s in sums.items()}


# ---------------------------------------------------------------------------------------------- the step
def run_evaluate(
    checkpoint: str,
    data: str,
    cfg: EvaluateConfig,
    *,
    model_cfg: ModelConfig | None = None,
    noise: NoiseConfig | None = None,
    mlflow_run_id: str | None = None,
    log_to_mlflow: bool = True,
    tracking_uri: str | None = None,
    experiment: str = "pyoco",
    batch_size: int = 4,
) -> dict[str, Any]:
    """Evaluate the model package ``checkpoint`` on preprocess output ``data``; returns the results dict.

    ``noise`` overrides the package's prior (None: the prior the model was trained with). Results go to
    ``cfg.output`` (JSON) when set, and to MLflow: into ``mlflow_run_id`` (e.g. the training run) as
    metrics ``eval.*`` and the artifact ``evaluate/results.json``, or into a new run named ``evaluate``
    when no run id is given (``log_to_mlflow=False`` skips MLflow).
    """
    import numpy as np
    import torch

    from pyoco import metrics as M
    from pyoco.noise import make_prior
    from pyoco.package import load_package
    from pyoco.sampling import generate

    t0 = time.perf_counter()
    if cfg.fvd_extractor is not None and len(cfg.prompts) < 2:
        raise PyocoError("FVD needs at least 2 generated videos: give evaluate.prompts 2 or more prompts")
    extractor = M.load_feature_extractor(cfg.fvd_extractor) if cfg.fvd_extractor else None
    package = load_package(checkpoint, cache_dir=model_cfg.cache_dir if model_cfg else None)
    prior = make_prior(noise.kind, noise.alpha) if noise is not None else package.prior()
    embed_dim = int(package.denoiser.config.cross_attention_dim)
    clips = load_eval_clips(data, cfg.num_clips, embed_dim=embed_dim)
    n, num_frames, height, width = clips.frames.shape[:4]
    if package.denoiser.max_num_frames is not None and num_frames > package.denoiser.max_num_frames:
        raise PyocoError(
            f"{data}: clips have {num_frames} frames; the model takes at most "
            f"{package.denoiser.max_num_frames}"
        )

    torch.manual_seed(0)  # nothing below should draw from the global RNG; pin it anyway
    per_t = validation_loss(
        package, clips, prior, timesteps=list(cfg.timesteps), seed=cfg.seed, batch_size=batch_size
    )
    val_loss = float(np.mean(list(per_t.values())))
    loss_seconds = time.perf_counter() - t0

    generated = generate(
        package.denoiser,
        package.text_encoder(),
        list(cfg.prompts),
        prior=prior,
        num_frames=num_frames,
        height=height,
        width=width,
        steps=cfg.sample_steps,
        guidance=cfg.guidance,
        seed=cfg.seed,
        scheduler_config=package.scheduler_config,
        vae=package.vae,
    ).numpy()
    tc_gen = M.temporal_consistency(generated)
    tc_real = M.temporal_consistency(clips.frames)
    if extractor is not None:
        try:
            fvd_value = M.frechet_video_distance(extractor, clips.frames, generated)
        except (RuntimeError, ValueError) as err:  # TorchScript errors are RuntimeErrors, many lines long
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise PyocoError(
                f"{cfg.fvd_extractor}: FVD extractor failed on videos (N, 3, T={num_frames}, H={height}, "
                f"W={width}): {first[:300]}"
            ) from None
        fvd = {
            "status": "computed",
            "value": fvd_value,
            "extractor": str(cfg.fvd_extractor),
            "num_real": int(n),
            "num_generated": int(len(generated)),
        }
    else:
        fvd = {"status": "skipped", "reason": "no FVD feature extractor given (--fvd-extractor PATH)"}

    flat = {
        "val_loss": val_loss,
        **{f"val_loss_t{t:04d}": v for t, v in per_t.items()},
        "temporal_consistency": tc_gen,
        "temporal_consistency_real": tc_real,
        "temporal_consistency_gap": abs(tc_gen - tc_real),
    }
    if fvd["status"] == "computed":
        flat["fvd"] = fvd["value"]
    from pipelines.tracking import pyoco_version, redact_uri
    from pyoco.clips import eval_data_hash

    results: dict[str, Any] = {
        "checkpoint": redact_uri(str(checkpoint)),
        "data": redact_uri(str(data)),
        # which clips these numbers are about: the registry refuses to compare different ones
        "eval_data_hash": eval_data_hash(data),
        "evaluate_config": cfg.model_dump(mode="json", exclude={"output"}),
        "num_clips": int(n),
        "clip_shape": [int(num_frames), int(height), int(width), 3],
        "seed": cfg.seed,
        "noise": prior.describe(),
        "prediction_type": package.scheduler_config.get("prediction_type", "epsilon")
        if package.scheduler_config
        else "epsilon",
        "timesteps": [int(t) for t in per_t],
        "val_loss": val_loss,
        "val_loss_per_timestep": {str(t): v for t, v in per_t.items()},
        "sample": {
            "prompts": list(cfg.prompts),
            "steps": cfg.sample_steps,
            "guidance": cfg.guidance,
            "temporal_consistency_generated": tc_gen,
            "temporal_consistency_real": tc_real,
            "temporal_consistency_gap": abs(tc_gen - tc_real),
        },
        "fvd": fvd,
        "metrics": flat,
        "pyoco_version": pyoco_version(),
        "seconds": {"loss": round(loss_seconds, 3), "total": round(time.perf_counter() - t0, 3)},
    }
    if log_to_mlflow:
        results["mlflow_run_id"] = _log_to_mlflow(results, mlflow_run_id, tracking_uri, experiment)
    if cfg.output:
        _write_json(cfg.output, results)
    return results


def _write_json(uri: str, results: dict) -> None:
    from pyoco.storage import filesystem

    fs, path = filesystem(uri)
    if "://" not in uri or uri.startswith("file://"):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    with fs.open(path, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)


def _log_to_mlflow(results: dict, run_id: str | None, tracking_uri: str | None, experiment: str) -> str:
    import mlflow

    from pipelines import tracking

    uri = tracking.resolve_tracking_uri(tracking_uri or mlflow.get_tracking_uri())
    created = run_id is None
    if created:
        run_id = tracking.start_run(
            uri, experiment, run_name="evaluate", tags={tracking.TAG_KIND: "evaluate"}
        )
    tracking.log_metrics(uri, run_id, {f"eval.{k}": v for k, v in results["metrics"].items()}, step=0)
    tracking.set_tags(
        uri,
        run_id,
        {
            "pyoco.eval.fvd": results["fvd"]["status"],
            "pyoco.eval_data_hash": str(results.get("eval_data_hash") or "unknown"),
        },
    )
    tracking.log_text(uri, run_id, json.dumps(results, indent=2, sort_keys=True), "evaluate/results.json")
    if created:
        tracking.end_run(uri, run_id)
    return run_id


# ------------------------------------------------------------------------------------------------- CLI
@cli_errors
def evaluate_cmd(
    checkpoint: str = typer.Option(..., "--checkpoint", help="Model package folder (local or s3://)."),
    data: str = typer.Option(..., "--data", help="Preprocess output folder (with clips/*.parquet)."),
    num_clips: int | None = typer.Option(None, "--num-clips", min=1, help="Clips for the validation loss."),
    seed: int | None = typer.Option(None, "--seed", help="Noise seed (fixed per clip)."),
    config: Path | None = typer.Option(None, "--config", help="pyoco config; its evaluate: section is used."),
    fvd_extractor: Path | None = typer.Option(
        None, "--fvd-extractor", help="TorchScript video feature extractor (e.g. I3D) for FVD."
    ),
    out: Path | None = typer.Option(None, "--out", help="Write the results JSON here."),
    mlflow_run: str | None = typer.Option(
        None, "--mlflow-run", help="Log into this MLflow run (default: a new run)."
    ),
    no_mlflow: bool = typer.Option(False, "--no-mlflow", help="Do not log to MLflow."),
) -> None:
    """Validation loss on a fixed timestep grid, sample metrics and (with an extractor) FVD."""
    from pyoco.config import load_config

    overrides = {
        "evaluate.num_clips": num_clips,
        "evaluate.seed": seed,
        "evaluate.fvd_extractor": str(fvd_extractor) if fvd_extractor else None,
        "evaluate.output": str(out) if out else None,
    }
    cfg = load_config(config, overrides)
    with console.status(f"evaluating {checkpoint}"):
        results = run_evaluate(
            checkpoint,
            data,
            cfg.evaluate,
            model_cfg=cfg.model,
            noise=None,
            mlflow_run_id=mlflow_run,
            log_to_mlflow=not no_mlflow,
            tracking_uri=cfg.mlflow.tracking_uri,
            experiment=cfg.mlflow.experiment,
        )
    per_t = ", ".join(f"t={t}: {v:.5f}" for t, v in results["val_loss_per_timestep"].items())
    console.print(f"val_loss {results['val_loss']:.6f} ({per_t})")
    s = results["sample"]
    console.print(
        f"temporal consistency: generated {s['temporal_consistency_generated']:.4f}, "
        f"real {s['temporal_consistency_real']:.4f}"
    )
    fvd = results["fvd"]
    console.print(
        f"FVD: {fvd['value']:.4f}" if fvd["status"] == "computed" else f"FVD: skipped ({fvd['reason']})"
    )
    print(json.dumps(results["metrics"], sort_keys=True))


def register(app: typer.Typer) -> None:
    app.command("evaluate")(evaluate_cmd)

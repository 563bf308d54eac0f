"""The metrics of ``pyoco evaluate`` (see :mod:`pipelines.evaluate.step`): the val clips, ``val_loss`` under the
model's own prior, videos generated for the val prompts, and the sample metrics (FVD, prompt accuracy, class
score, motion gap) with their confidence intervals."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from pipelines.common import PyocoError

METRIC_DESCRIPTIONS = {
    "val_loss": "diffusion loss on val clips under the model's own prior (not comparable across priors)",
    "fvd": "Fréchet distance of evaluator features, val clips vs generated videos (lower is better)",
    "motion_gap": "W1 distance of per-clip mean |frame difference|, generated vs val (lower is better)",
    "prompt_accuracy_<label>": "share of generated videos the evaluator labels as their prompt (higher is better)",
    "inception_score_<label>": "exp(E KL(p(y|x) || p(y))) of the evaluator on generated videos (higher is better)",
    "motion_mean_generated": "mean |frame difference| of generated videos: descriptive, not a quality score",
}


# ---------------------------------------------------------------------------------------------- the data
@dataclass
class EvalClips:
    clip_ids: list[str]
    captions: list[str]
    frames: Any  # uint8 (N, T, H, W, 3) numpy; None for latents-only clips until `decode_real_clips`
    cond: Any  # float32 (N, L, D) numpy
    mask: Any  # bool (N, L) numpy
    labels: list[dict] = field(default_factory=list)  # parsed labels per clip ({} when none)
    pooled: bool = False  # L = 1 pooled caption vectors (no caption_mask column)
    latents: Any = None  # float32 torch (N, C, T, h, w) when preprocess stored latents, else None
    latents_vae: str | None = None  # vae_identity of the VAE that made them

    def subset(self, n: int) -> EvalClips:
        return EvalClips(
            self.clip_ids[:n],
            self.captions[:n],
            self.frames[:n] if self.frames is not None else None,
            self.cond[:n],
            self.mask[:n],
            self.labels[:n],
            self.pooled,
            self.latents[:n] if self.latents is not None else None,
            self.latents_vae,
        )


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
    if len(lengths) > 1:
        raise PyocoError(f"{source}: caption_embedding lengths differ between rows ({sorted(lengths)})")
    return np.stack(out) if out else np.zeros((0, 1, embed_dim), np.float32)


def load_eval_clips(data: str, num_clips: int | None, *, embed_dim: int) -> EvalClips:
    """The first ``num_clips`` (None: all) clips by clip_id of the held-out split ``data``/clips/val
    (local or s3://): evaluate never reads the training clips."""
    import numpy as np

    from pyoco import clips as C

    source = C.split_uri(data, "val")
    try:
        table = C.read_clips(data, "val", limit=num_clips).sort_by("clip_id")
        labels = C.labels_of(table)
    except C.DataError as err:
        raise PyocoError(str(err)) from None
    missing = {"clip_id", "frames", "num_frames", "height", "width", C.EMBEDDING} - set(table.column_names)
    if missing:
        raise PyocoError(f"{source}: missing columns {sorted(missing)}")
    if len(table) == 0:
        raise PyocoError(f"{source}: no clips")
    emb = _embedding_rows(table.column(C.EMBEDDING), embed_dim, source)
    pooled = C.MASK not in table.column_names
    if pooled:
        mask = np.ones(emb.shape[:2], dtype=bool)
    else:
        mask = np.asarray(table.column(C.MASK).to_pylist(), dtype=bool).reshape(len(table), -1)
    if mask.shape != emb.shape[:2]:
        raise PyocoError(f"{source}: caption_mask shape {mask.shape} != embedding {emb.shape[:2]}")
    cols = ["clip_id", "frames", "num_frames", "height", "width"]
    rows = table.select(cols + (["caption"] if "caption" in table.column_names else [])).to_pylist()
    shapes = {(r["num_frames"], r["height"], r["width"]) for r in rows}
    if len(shapes) != 1:
        raise PyocoError(f"{source}: clips differ in (frames, height, width): {sorted(shapes)}")
    try:
        latents_info = C.latents_info(table.schema)
        latents = C.latents_tensor(table) if latents_info is not None else None
    except C.DataError as err:
        raise PyocoError(f"{source}: {err}") from None
    # preprocess.keep_frames: false nulls every row's frames (latents only): decode_real_clips fills them
    has_frames = table.column("frames").null_count == 0
    if not has_frames and latents is None:
        raise PyocoError(f"{source}: {C.NO_FRAMES}, but there is no latents column either")
    return EvalClips(
        clip_ids=[r["clip_id"] for r in rows],
        captions=[r.get("caption") or "" for r in rows],
        frames=np.stack([C.frames_array(r) for r in rows]) if has_frames else None,
        cond=emb,
        mask=mask,
        labels=labels,
        pooled=pooled and emb.shape[1] == 1,
        latents=latents,
        latents_vae=latents_info[1] if latents_info is not None else None,
    )


def decode_real_clips(package, clips: EvalClips, source: str, *, batch_size: int = 4) -> EvalClips:
    """``clips`` with real pixel frames: as stored, or, for latents-only clips (``preprocess.keep_frames:
    false``), the stored latents decoded by the package's VAE, which must be the VAE that made them. FVD
    and the motion gap then compare generated videos with val clips that went through that same VAE."""
    import dataclasses

    import numpy as np

    from pyoco import clips as C
    from pyoco.vae import decode_frames

    if clips.frames is not None:
        return clips
    model_vae = getattr(package.info, "vae_identity", None) if package.vae is not None else None
    if model_vae is None or clips.latents_vae != model_vae:
        theirs = (clips.latents_vae or "unknown")[:19]
        ours = model_vae[:19] if model_vae else "none (a pixel-space model)"
        raise PyocoError(
            f"{source}: {C.NO_FRAMES}; they were made by VAE {theirs} but the model's VAE is {ours}, so "
            "evaluate cannot decode real clips: re-run preprocess with keep_frames: true or this model's VAE"
        )
    n = len(clips.clip_ids)
    frames = [
        decode_frames(package.vae, clips.latents[i : i + batch_size]).cpu().numpy()
        for i in range(0, n, batch_size)
    ]
    return dataclasses.replace(clips, frames=np.concatenate(frames))


# ---------------------------------------------------------------------------------------------- the loss
def validation_loss(
    package,
    clips: EvalClips,
    prior,
    *,
    timesteps: list[int],
    seed: int,
    batch_size: int = 4,
    device: str = "cpu",
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
    # The clips' own latents when the package's VAE made them (as train saw them); else encode the frames.
    stored = clips.latents is not None and clips.latents_vae == getattr(package.info, "vae_identity", None)
    sums = {int(t): 0.0 for t in timesteps}
    n = len(clips.clip_ids)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            sl = slice(start, min(start + batch_size, n))
            if stored:
                x0 = torch.as_tensor(clips.latents[sl]).to(device)
            else:  # uint8 (B, T, H, W, 3) -> float (B, 3, T, H, W) in [-1, 1]
                x0 = torch.from_numpy(clips.frames[sl]).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)
                x0 = x0.to(device)
                if package.vae is not None:
                    from pyoco.model import encode_video

                    x0 = encode_video(package.vae, x0)
            cond = torch.from_numpy(clips.cond[sl]).float().to(device)
            mask = torch.from_numpy(clips.mask[sl]).to(device)
            gens = clip_generators(seed, [clip_stream_id(c) for c in clips.clip_ids[sl]])
            eps = prior.sample(x0.shape, generator=gens, dtype=x0.dtype).to(device)  # drawn on the CPU
            for t in sums:
                tt = torch.full((x0.shape[0],), t, dtype=torch.long, device=device)
                x_t, target = loss_fn.noisy(x0, eps, tt)
                pred = model(x_t, tt, cond, mask)
                per_clip = (pred.float() - target.float()).pow(2).mean(dim=(1, 2, 3, 4))
                sums[t] += float(per_clip.double().sum())
    return {t: s / n for t, s in sums.items()}


# ------------------------------------------------------------------------------------------- sampling
def _null_embedding(package, clips: EvalClips):
    """The unconditional caption states for guidance, in the clips' layout (as training computes them)."""
    import numpy as np

    from pyoco.text import load_text_encoder

    length, dim = clips.cond.shape[1], clips.cond.shape[2]
    spec = dict(package.info.text_encoder)
    enc = load_text_encoder(spec) if clips.pooled else load_text_encoder(spec, max_length=length)
    if enc.dim != dim:
        raise PyocoError(
            f"the model's text encoder gives {enc.dim}-d states but the val clips' caption_embedding is {dim}-d"
        )
    if clips.pooled:
        null = enc.pooled([""])[:, None, :]
        return np.asarray(null, np.float32), np.ones((1, 1), dtype=bool)
    null, null_mask = enc.null_embedding(1)
    return null.numpy().astype(np.float32), null_mask.numpy().astype(bool)


def generate_for_prompts(
    package,
    clips: EvalClips,
    prior,
    *,
    num_videos: int,
    steps: int,
    guidance: float,
    seed: int,
    eta: float = 0.0,
    batch_size: int = 16,
    progress=None,
    device: str = "cpu",
):
    """uint8 (num_videos, T, H, W, 3): video i prompted with val clip ``i mod n``'s caption states and
    drawn from the stream ``clip_generators(seed, [i])`` (see the module docstring)."""
    import numpy as np
    import torch

    from pyoco.noise import clip_generators
    from pyoco.sampling import sample_video

    n, num_frames, height, width = clips.frames.shape[:4]
    null = _null_embedding(package, clips) if guidance != 1.0 else (None, None)
    model = package.denoiser.eval()
    channels = int(getattr(model, "config", {}).get("in_channels", 3)) if package.vae is None else 3
    out = []
    for start in range(0, num_videos, batch_size):
        idx = list(range(start, min(start + batch_size, num_videos)))
        src = [i % n for i in idx]
        videos = sample_video(
            model,
            torch.from_numpy(clips.cond[src]).float().to(device),
            torch.from_numpy(clips.mask[src]).to(device),
            prior=prior,
            null_cond=None if null[0] is None else torch.from_numpy(null[0]),
            null_mask=None if null[1] is None else torch.from_numpy(null[1]),
            num_frames=num_frames,
            height=height,
            width=width,
            channels=channels,
            steps=steps,
            guidance=guidance,
            eta=eta,
            generator=clip_generators(seed, idx),
            scheduler_config=package.scheduler_config,
            vae=package.vae,
        )
        out.append(videos.cpu().numpy())
        if progress is not None:
            progress(idx[-1] + 1, num_videos)
    return np.concatenate(out)


# ------------------------------------------------------------------------------------------- metrics
def sample_metrics(
    real,
    generated,
    prompt_of,
    real_labels: list[dict],
    evaluator=None,
    *,
    num_bootstrap: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """The sample metrics of the module docstring for uint8 real val clips (N, T, H, W, 3) and generated
    videos (M, ...), video j prompted with val clip ``prompt_of[j]``. Returns
    {"metrics": flat numbers, "fvd": ..., "prompt_accuracy": ..., "inception_score": ..., "motion": ...}."""
    import numpy as np

    from pyoco import metrics as M

    halves = (np.arange(len(real)) % 2 == 0, np.arange(len(real)) % 2 == 1)
    motion_real = M.frame_differences(real).numpy()
    motion_gen = M.frame_differences(generated).numpy()
    gap = M.wasserstein_1d(motion_gen, motion_real)
    gap_lo, gap_hi = M.bootstrap_ci(
        M.wasserstein_1d, (motion_gen, motion_real), num_bootstrap=num_bootstrap, seed=seed
    )
    motion = {
        "motion_gap": gap,
        "motion_gap_ci_low": gap_lo,
        "motion_gap_ci_high": gap_hi,
        "motion_gap_real_halves": M.wasserstein_1d(motion_real[halves[0]], motion_real[halves[1]])
        if len(real) >= 2
        else None,
        "motion_mean_generated": float(motion_gen.mean()),
        "motion_mean_real": float(motion_real.mean()),
    }
    flat: dict[str, float] = {k: v for k, v in motion.items() if v is not None}
    out: dict[str, Any] = {"motion": motion}
    if evaluator is None:
        reason = "no evaluator given (--evaluator PATH)"
        out["fvd"] = {"status": "skipped", "reason": reason}
        out["prompt_accuracy"] = {"status": "skipped", "reason": reason}
        out["inception_score"] = {"status": "skipped", "reason": reason}
        out["metrics"] = flat
        return out

    feats_real, probs_real = evaluator.run(real)
    feats_gen, probs_gen = evaluator.run(generated)
    fvd = M.fvd_from_features(feats_real, feats_gen, num_bootstrap=num_bootstrap, seed=seed)
    fvd_halves = (
        M.frechet_distance_features(feats_real[halves[0]], feats_real[halves[1]]) if len(real) >= 4 else None
    )
    out["fvd"] = {
        "status": "computed",
        "value": fvd["fvd"],
        "ci_low": fvd["fvd_ci_low"],
        "ci_high": fvd["fvd_ci_high"],
        "num_generated": fvd["num_videos"],
        "num_real": int(len(real)),
        "real_halves": fvd_halves,
        "evaluator": evaluator.path,
        "evaluator_train_data_hash": evaluator.meta.get("train_data_hash"),
    }
    flat.update(
        fvd=fvd["fvd"],
        fvd_ci_low=fvd["fvd_ci_low"],
        fvd_ci_high=fvd["fvd_ci_high"],
        fvd_num_videos=len(feats_gen),
    )
    if fvd_halves is not None:
        flat["fvd_real_halves"] = fvd_halves
    accuracy: dict[str, Any] = {}
    scores: dict[str, Any] = {}
    for name, classes in evaluator.labels.items():
        index = {c: k for k, c in enumerate(classes)}
        target = np.array([index.get(str(real_labels[p].get(name)), -1) for p in prompt_of])
        keep = target >= 0
        pred = probs_gen[name].argmax(axis=1)
        hits, counted = int((pred[keep] == target[keep]).sum()), int(keep.sum())
        real_target = np.array([index.get(str(lab.get(name)), -1) for lab in real_labels])
        real_keep = real_target >= 0
        real_hits = int((probs_real[name].argmax(axis=1)[real_keep] == real_target[real_keep]).sum())
        if counted:
            lo, hi = M.wilson_interval(hits, counted)
            acc = hits / counted
            flat.update(
                {
                    f"prompt_accuracy_{name}": acc,
                    f"prompt_accuracy_{name}_ci_low": lo,
                    f"prompt_accuracy_{name}_ci_high": hi,
                }
            )
            accuracy[name] = {"value": acc, "ci_low": lo, "ci_high": hi, "videos": counted}
        else:
            accuracy[name] = {"value": None, "videos": 0, "reason": f"no val prompt has a known {name!r}"}
        accuracy[name].update(
            chance=1.0 / len(classes),
            evaluator_accuracy_on_real=real_hits / int(real_keep.sum()) if real_keep.any() else None,
        )
        score = M.class_score(probs_gen[name])
        s_lo, s_hi = M.bootstrap_ci(M.class_score, (probs_gen[name],), num_bootstrap=num_bootstrap, seed=seed)
        flat.update(
            {
                f"inception_score_{name}": score,
                f"inception_score_{name}_ci_low": s_lo,
                f"inception_score_{name}_ci_high": s_hi,
            }
        )
        scores[name] = {
            "value": score,
            "ci_low": s_lo,
            "ci_high": s_hi,
            "real": M.class_score(probs_real[name]),
            "max": len(classes),
        }
    out["prompt_accuracy"] = accuracy
    out["inception_score"] = scores
    out["metrics"] = flat
    return out

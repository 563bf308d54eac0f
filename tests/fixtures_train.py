"""Clip shards for the training tests, written directly in the clip format (pyoco.clips; no preprocess run).

Frames: a coloured square that moves one pixel per frame, its colour and direction set by the clip index;
caption embeddings: fixed random (L, 384) states per (colour, direction) class, with a mask, so the tiny model
can overfit them quickly.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pyoco import clips as clipfmt

EMBED_DIM = 384
COLOURS = [(230, 40, 40), (40, 200, 60), (40, 80, 230), (220, 220, 40)]


def clip_frames(index: int, num_frames: int, size: int) -> np.ndarray:
    """uint8 (T, H, W, 3): a square of side size//2 moving right (even index) or down (odd)."""
    frames = np.full((num_frames, size, size, 3), 16, dtype=np.uint8)
    side = max(2, size // 2)
    colour = COLOURS[index % len(COLOURS)]
    for t in range(num_frames):
        off = t % (size - side + 1)
        y, x = (0, off) if index % 2 == 0 else (off, 0)
        frames[t, y : y + side, x : x + side] = colour
    return frames


def write_clips(
    out: Path,
    *,
    num_clips: int = 8,
    num_frames: int = 4,
    size: int = 8,
    text_len: int = 4,
    shards: int = 2,
    seed: int = 0,
    frames_format: str = "binary",  # binary (preprocess) | list (nested fixed-size lists)
    embedding: str = "flat",  # flat (L*D, preprocess's layout) | nested (L, D) | pooled (D,); + mask
    manifest: bool = True,
) -> Path:
    """Write ``out/clips/train/part-*.parquet`` (+ ``out/manifest.json``); returns that training folder.

    ``frames_format="binary"`` with ``embedding="flat"`` is exactly :func:`pyoco.clips.clip_schema`
    (labels included); the other layouts are what other producers may write and train must still read.
    """
    rng = np.random.default_rng(seed)
    classes = rng.standard_normal((len(COLOURS) * 2, text_len, EMBED_DIM)).astype(np.float32)
    clips = Path(out) / "clips" / "train"
    clips.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(num_clips):
        frames = clip_frames(i, num_frames, size)
        mask = np.zeros(text_len, dtype=bool)
        mask[: 2 + i % max(1, text_len - 1)] = True
        row = {
            "clip_id": f"clip{i:04d}",
            "source": "fixture",
            "key": f"video{i:04d}",
            "clip_index": 0,
            "start_frame": 0,
            "num_frames": num_frames,
            "fps": 8.0,
            "height": size,
            "width": size,
            "caption": f"shape {i % len(COLOURS)} moves {'right' if i % 2 == 0 else 'down'}",
            "labels": json.dumps({"color": i % len(COLOURS), "direction": "right" if i % 2 == 0 else "down"}),
            "node_id": "fixture",
        }
        emb = classes[(i % len(COLOURS)) * 2 + i % 2]
        if embedding in ("flat", "nested"):
            row["caption_embedding"] = (emb.reshape(-1) if embedding == "flat" else emb).tolist()
            row["caption_mask"] = mask.tolist()
        else:
            row["caption_embedding"] = emb[0].tolist()
        row["frames"] = frames.tobytes() if frames_format == "binary" else frames.tolist()
        rows.append(row)

    fields = [
        ("clip_id", pa.string()),
        ("source", pa.string()),
        ("key", pa.string()),
        ("start_frame", pa.int32()),
        ("num_frames", pa.int32()),
        ("fps", pa.float32()),
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("caption", pa.string()),
    ]
    if frames_format == "binary":
        fields.append(("frames", pa.large_binary()))
    else:
        px = pa.list_(pa.uint8(), 3)
        fields.append(("frames", pa.list_(pa.list_(pa.list_(px, size), size), num_frames)))
    if embedding == "flat":
        fields.append(
            pa.field(
                "caption_embedding",
                pa.list_(pa.float32(), text_len * EMBED_DIM),
                metadata={"shape": json.dumps([text_len, EMBED_DIM])},
            )
        )
        fields.append(("caption_mask", pa.list_(pa.bool_(), text_len)))
    elif embedding == "nested":
        fields.append(("caption_embedding", pa.list_(pa.list_(pa.float32(), EMBED_DIM), text_len)))
        fields.append(("caption_mask", pa.list_(pa.bool_(), text_len)))
    else:
        fields.append(("caption_embedding", pa.list_(pa.float32(), EMBED_DIM)))
    schema = pa.schema(fields)
    if frames_format == "binary" and embedding == "flat":
        schema = clipfmt.clip_schema(text_len, EMBED_DIM)
    per = -(-num_clips // shards)
    for s in range(shards):
        part = rows[s * per : (s + 1) * per]
        if part:
            pq.write_table(pa.Table.from_pylist(part, schema=schema), clips / f"part-{s:05d}.parquet")
    if manifest:
        (Path(out) / "manifest.json").write_text(
            json.dumps(
                {"inputs": num_clips, "accepted_videos": num_clips, "clips_written": num_clips, "seed": seed}
            )
        )
    return clips


def tiny_config(tmp: Path, clips: Path, **train) -> dict:
    """A workflow config dict for a tiny 2-worker CPU run over ``clips`` (override train fields by kwargs)."""
    t = {
        "data": str(clips),
        "output": str(tmp / "model"),
        "storage_path": str(tmp / "ray"),
        "num_workers": 2,
        "resources_per_worker": {"CPU": 0.5},
        "zero_stage": 2,
        "batch_size_per_worker": 2,
        "lr": 1e-3,
        "lr_schedule": "constant",
        "max_steps": 4,
        "checkpoint_every": 2,
        "num_to_keep": 2,
        "ema_decay": 0.9,
        "caption_dropout": 0.1,
        "shuffle_buffer": 4,
        "sample_prompts": ["a red square moves right"],
        "sample_seeds": [0],
        "sample_steps": 2,
        "system_metrics_interval_s": 1.0,
    }
    t.update(train)
    return {
        "name": "t",
        "output": str(tmp / "out"),
        "model": {
            "tiny": {"sample_size": 8, "block_out_channels": [16, 32], "attention_head_dim": 2},
            "text_max_length": 4,
            "train_layers": "all",
            "motion_max_seq_length": 8,
        },
        "noise": {"kind": "progressive", "alpha": 1.0},
        "train": t,
        "mlflow": {"experiment": "pyoco-tests"},
    }


def _net():
    """A tiny module with both ZeRO-3 parameter kinds at persistence threshold 50: partitioned (the Linear
    weights) and persistent (LayerNorm's 40-element weight and bias)."""
    import torch

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(6, 40)
            self.norm = torch.nn.LayerNorm(40)
            self.b = torch.nn.Linear(40, 3)

        def forward(self, x):
            return self.b(torch.relu(self.norm(self.a(x))))

    return Net()


def spawn_gloo(worker, *args, nprocs: int, attempts: int = 3) -> None:
    """``torch.multiprocessing.spawn(worker, (world, port, *args))`` on a free 127.0.0.1 port. The port is
    free when picked but is bound only later by rank 0's TCPStore; if something takes it in between
    (EADDRINUSE, seen once in a full make test), the group is spawned again on a fresh port."""
    import torch

    for attempt in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            torch.multiprocessing.spawn(worker, args=(nprocs, port, *args), nprocs=nprocs, join=True)
            return
        except torch.multiprocessing.ProcessRaisedException as err:
            if "EADDRINUSE" not in str(err) or attempt == attempts - 1:
                raise


def _gloo_init(rank: int, world: int, port: int) -> None:
    """Join a spawned child to a gloo group of ``world`` ranks on 127.0.0.1:``port`` (one thread)."""
    import torch

    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)


def ema_zero3_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of tests/test_train_unit.py's ZeRO-3 EMA check (spawned; kept here so children import little)."""
    import torch

    from pipelines.train.ema import ShardedEMA, consolidate, load_ema_state, save_ema_state

    _gloo_init(rank, world, port)
    from pipelines.train.deepspeed import setup_deepspeed

    deepspeed = setup_deepspeed(use_gpu=False)
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    cfg = {
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 50},
        "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "torch_adam": True}},
        "steps_per_print": 10**9,
    }
    model = _net()
    engine = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)[0]
    params = list(engine.module.named_parameters())
    gathered = deepspeed.zero.GatheredParameters

    def full():
        with gathered([p for _, p in params]):
            return {n: p.detach().clone() for n, p in params}

    ema = ShardedEMA(params, 0.8, rank=rank)
    ref = full()
    g = torch.Generator().manual_seed(100 + rank)
    for n_upd in range(4):
        loss = engine(torch.randn(4, 6, generator=g)).pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update()
        d = min(0.8, (1 + n_upd) / (10 + n_upd))
        now = full()
        ref = {n: d * ref[n] + (1 - d) * now[n] for n in ref}
    save_ema_state(ema.state_dict(), Path(out) / f"ema_rank{rank}.safetensors")
    x = torch.linspace(-1, 1, 24).reshape(4, 6)
    with torch.no_grad():
        y_before = engine.module(x)
        with ema.swap():
            y_ema = engine.module(x)
        y_after = engine.module(x)
    torch.distributed.barrier()
    if rank == 0:
        shards = [load_ema_state(Path(out) / f"ema_rank{r}.safetensors") for r in range(world)]
        merged = consolidate(shards)
        reference = _net()
        reference.load_state_dict(ref)
        with torch.no_grad():
            y_ref = reference(x)
        result = {
            "persistent": sum(bool(getattr(p, "ds_persist", False)) for _, p in params),
            "partitioned": sum(not getattr(p, "ds_persist", False) for _, p in params),
            "shard_numel": [int(s["shadow"]["a.weight"].numel()) for s in shards],
            "ema_max_err": max(float((merged[n] - ref[n]).abs().max()) for n in ref),
            "swap_max_err": float((y_ema - y_ref).abs().max()),
            "restore_max_err": float((y_after - y_before).abs().max()),
            "ema_differs_from_weights": float((y_ema - y_before).abs().max()),
        }
        (Path(out) / "result.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def motion_lr_worker(rank: int, world: int, port: int, out: str, zero_stage: int) -> None:
    """One rank of tests/test_train_unit.py's motion-LR check: one DeepSpeed step (the project's config and
    LR schedule) of a tiny inflated UNet; writes the largest weight change of motion and spatial params."""
    import torch

    from pipelines.train.deepspeed import deepspeed_config, make_lr_scheduler, param_groups, setup_deepspeed
    from pyoco.config import TrainConfig
    from pyoco.model import TinyUNetConfig, VideoDenoiser, build_unet2d, inflate

    _gloo_init(rank, world, port)
    deepspeed = setup_deepspeed(use_gpu=False)
    deepspeed.init_distributed(dist_backend="gloo")
    t = TrainConfig(
        lr=1e-3, motion_lr_multiplier=10.0, zero_stage=zero_stage, batch_size_per_worker=2, warmup_steps=0
    )
    unet = build_unet2d(
        TinyUNetConfig(sample_size=8, block_out_channels=(8, 16), attention_head_dim=2), seed=0
    )
    model = VideoDenoiser(inflate(unet, motion_num_attention_heads=1))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=param_groups(model, t),
        config=deepspeed_config(t, world_size=world),
        lr_scheduler=make_lr_scheduler(t, 10),
    )
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(2, 3, 2, 8, 8, generator=g), torch.randn(2, 4, 384, generator=g)
    loss = (engine(x, torch.tensor([10, 500]), cond) - x).pow(2).mean()
    engine.backward(loss)
    engine.step()
    moved = {"motion": 0.0, "spatial": 0.0}
    for n, p in engine.module.named_parameters():
        kind = "motion" if ".motion_modules." in n else "spatial"
        moved[kind] = max(moved[kind], float((p.detach() - before[n]).abs().max()))
    moved["lrs"] = [grp["lr"] for grp in engine.optimizer.param_groups]
    Path(out, "result.json").write_text(json.dumps(moved))
    torch.distributed.destroy_process_group()


def gather_worker(rank: int, world: int, port: int, out: str, zero_stage: int) -> None:
    """One rank of tests/test_train_unit.py's worker-side export check: a tiny inflated UNet (motion modules
    trained, the rest frozen, positional-embedding buffers) takes two DeepSpeed steps with EMA; rank 0 then
    compares :func:`pipelines.train.gather.gather_fp32_weights` with ``zero_to_fp32`` of the saved checkpoint
    and the consolidated EMA files."""
    import torch

    from pipelines.train.deepspeed import deepspeed_config, param_groups, setup_deepspeed
    from pipelines.train.ema import ShardedEMA, consolidate, load_ema_state, save_ema_state
    from pipelines.train.gather import gather_fp32_weights
    from pyoco.config import TrainConfig
    from pyoco.model import TinyUNetConfig, VideoDenoiser, build_unet2d, inflate

    _gloo_init(rank, world, port)
    deepspeed = setup_deepspeed(use_gpu=False)
    deepspeed.init_distributed(dist_backend="gloo")
    t = TrainConfig(lr=1e-2, zero_stage=zero_stage, batch_size_per_worker=2, warmup_steps=0)
    unet = build_unet2d(
        TinyUNetConfig(sample_size=8, block_out_channels=(8, 16), attention_head_dim=2), seed=0
    )
    model = VideoDenoiser(inflate(unet, motion_num_attention_heads=1))
    model.set_trainable("temporal")
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=param_groups(model, t), config=deepspeed_config(t, world_size=world)
    )
    named = [(n, p) for n, p in engine.module.named_parameters() if p.requires_grad]
    ema = ShardedEMA(named, 0.5, rank=rank)
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        x, cond = torch.randn(2, 3, 2, 8, 8, generator=g), torch.randn(2, 4, 384, generator=g)
        loss = (engine(x, torch.tensor([10, 500]), cond) - x).pow(2).mean()
        engine.backward(loss)
        engine.step()
        ema.update()
    ckpt = Path(out, "ckpt")
    engine.save_checkpoint(str(ckpt), tag="ds")
    if ema.zero3 or rank == 0:
        save_ema_state(ema.state_dict(), ckpt / f"ema_rank{rank:03d}.safetensors")
    raw = gather_fp32_weights(engine.module, None, zero_stage=zero_stage, rank=rank, world=world)
    with_ema = gather_fp32_weights(engine.module, ema, zero_stage=zero_stage, rank=rank, world=world)
    torch.distributed.barrier()
    if rank == 0:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        ref = {k: v.float() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag="ds").items()}
        shards = [load_ema_state(f) for f in sorted(ckpt.glob("ema_rank*.safetensors"))]
        ref_ema = {**ref, **consolidate(shards)}
        result = {
            "same_keys": sorted(raw) == sorted(ref) == sorted(model.state_dict()),
            "frozen": sum(not p.requires_grad for p in engine.module.parameters()),
            "trainable": len(named),
            "buffers": sum(1 for n, _ in engine.module.named_buffers() if n in raw),
            "raw_max_err": max(float((raw[k] - ref[k]).abs().max()) for k in ref),
            "ema_max_err": max(float((with_ema[k] - ref_ema[k]).abs().max()) for k in ref),
            "ema_moved": max(float((with_ema[k] - raw[k]).abs().max()) for k, _ in named),
            "shapes_ok": all(raw[k].shape == ref[k].shape == with_ema[k].shape for k in ref),
        }
        Path(out, "result.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()

"""Training building blocks without Ray: collate layouts, DeepSpeed config, LR schedule, EMA math (and under real
ZeRO-3 in two gloo processes), the MLflow adapter's redaction, config resolution and CLI errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipelines import tracking
from pipelines.train.data import DataError, collate_clips, inspect_clips, manifest_hash
from pipelines.train.deepspeed import deepspeed_config, lr_multiplier, param_groups, use_bf16
from pipelines.train.ema import ShardedEMA, consolidate
from pipelines.train.plan import pretrain_config, resolve_config, total_steps
from pyoco.config import PyocoConfig, TrainConfig, parse_config
from tests.fixtures_train import (
    clip_frames,
    ema_zero3_worker,
    gather_worker,
    motion_lr_worker,
    spawn_gloo,
    tiny_config,
    write_clips,
)


# --------------------------------------------------------------------------------------------------- data
@pytest.mark.parametrize(
    ("frames_format", "embedding"), [("binary", "flat"), ("list", "nested"), ("binary", "pooled")]
)
def test_collate_layout_and_values(tmp_path, frames_format, embedding):
    clips = write_clips(
        tmp_path,
        num_clips=5,
        num_frames=3,
        size=8,
        text_len=4,
        frames_format=frames_format,
        embedding=embedding,
    )
    g = inspect_clips(str(clips))
    assert (g.num_frames, g.height, g.width, g.num_rows) == (3, 8, 8, 5)
    assert g.token_level == (embedding != "pooled")
    assert (g.text_len, g.text_dim) == ((4, 384) if embedding != "pooled" else (1, 384))
    table = pa.concat_tables([pq.read_table(f) for f in g.files])
    for batch in (table, {c: table.column(c).to_numpy(zero_copy_only=False) for c in table.column_names}):
        out = collate_clips(batch, g)
        x0, cond, mask = out["x0"], out["cond"], out["cond_mask"]
        assert x0.shape == (5, 3, 3, 8, 8) and x0.dtype == torch.float32
        assert cond.shape == (5, g.text_len, 384) and cond.dtype == torch.float32
        assert mask.shape == (5, g.text_len) and mask.dtype == torch.bool
        assert x0.min() >= -1.0 and x0.max() <= 1.0
        # (B, T, H, W, 3) uint8 -> (B, C, T, H, W) in [-1, 1], exactly x / 127.5 - 1
        expected = torch.from_numpy(clip_frames(2, 3, 8)).permute(3, 0, 1, 2).float() / 127.5 - 1
        torch.testing.assert_close(x0[2], expected, rtol=0, atol=1e-6)
        if embedding != "pooled":
            assert mask[0].tolist() == [True, True, False, False] and mask[1].tolist() == [
                True,
                True,
                True,
                False,
            ]
        else:
            assert mask.all()


def test_inspect_clips_names_the_problem(tmp_path):
    with pytest.raises(DataError, match="clips folder not found"):
        inspect_clips(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no \\*.parquet"):
        inspect_clips(str(tmp_path / "empty"))
    bad = tmp_path / "bad"
    bad.mkdir()
    pq.write_table(pa.table({"frames": [b"x"], "caption": ["a"]}), bad / "part-0.parquet")
    with pytest.raises(DataError, match=r"part-0.parquet: missing column\(s\) \['caption_embedding'\]"):
        inspect_clips(str(bad))


def test_manifest_hash_is_read_next_to_clips(tmp_path):
    clips = write_clips(tmp_path, num_clips=2)
    h = manifest_hash(str(clips))
    assert isinstance(h, str) and len(h) == 16
    (tmp_path / "manifest.json").write_text(json.dumps({"inputs": 3}))
    assert manifest_hash(str(clips)) != h
    assert manifest_hash(str(tmp_path / "elsewhere" / "clips")) is None


# ------------------------------------------------------------------------------------------ deepspeed/lr
def test_deepspeed_config_follows_train_config():
    t = TrainConfig(
        zero_stage=3,
        batch_size_per_worker=3,
        grad_accum_steps=2,
        grad_clip=0.5,
        lr=2e-4,
        weight_decay=0.01,
        betas=(0.8, 0.95),
    )
    ds = deepspeed_config(t, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 3 * 2 * 4
    assert ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["optimizer"]["type"] == "AdamW"
    assert ds["optimizer"]["params"] == {
        "lr": 2e-4,
        "betas": [0.8, 0.95],
        "eps": 1e-8,
        "weight_decay": 0.01,
        "torch_adam": True,
    }
    assert ds["bf16"] == {"enabled": False}  # CPU: fp32
    assert deepspeed_config(TrainConfig(use_gpu=True), world_size=1)["bf16"] == {"enabled": True}
    assert use_bf16(TrainConfig(use_gpu=True, precision="fp32")) is False
    assert deepspeed_config(TrainConfig(grad_clip=None), world_size=1)["gradient_clipping"] == 0.0


def test_param_groups_default_is_the_trainable_list_and_split_only_a_video_model():
    from pyoco.model import TinyUNetConfig, VideoDenoiser, build_unet2d, inflate

    unet = build_unet2d(
        TinyUNetConfig(sample_size=8, block_out_channels=(8, 16), attention_head_dim=2), seed=0
    )
    image = VideoDenoiser(unet)
    video = VideoDenoiser(inflate(unet, motion_num_attention_heads=1))
    trainable = [p for p in video.parameters() if p.requires_grad]
    assert param_groups(video, TrainConfig(lr=1e-3)) == trainable  # multiplier 1: as before, one group
    spatial, motion = param_groups(video, TrainConfig(lr=1e-3, motion_lr_multiplier=30.0))
    assert "lr" not in spatial and motion["lr"] == pytest.approx(3e-2)
    assert {id(p) for p in motion["params"]} == {id(p) for p in video.motion_parameters()}
    assert len(spatial["params"]) + len(motion["params"]) == len(trainable)
    assert param_groups(image, TrainConfig(motion_lr_multiplier=30.0)) == list(image.parameters())
    video.set_trainable("temporal")
    (only,) = param_groups(video, TrainConfig(lr=1e-3, motion_lr_multiplier=30.0))
    assert only["lr"] == pytest.approx(3e-2) and len(only["params"]) == len(video.motion_parameters())


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_motion_lr_multiplier_reaches_the_deepspeed_optimizer(tmp_path, zero_stage):
    """Through a real DeepSpeed engine (ZeRO-0 and the demo's ZeRO-2): after one Adam step (whose first update
    is about lr per weight) the motion modules moved ~10x as far as the spatial layers."""
    spawn_gloo(motion_lr_worker, str(tmp_path), zero_stage, nprocs=1)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["lrs"][1] == pytest.approx(10 * r["lrs"][0])  # after the step the schedule scaled both alike
    assert r["spatial"] == pytest.approx(1e-3, rel=0.05) and r["motion"] == pytest.approx(1e-2, rel=0.05), r


def test_lr_schedule_shapes():
    f = [lr_multiplier(s, warmup_steps=4, total_steps=20, kind="cosine") for s in range(20)]
    assert f[:4] == [0.25, 0.5, 0.75, 1.0]
    assert f[4] == pytest.approx(1.0) and f[12] == pytest.approx(0.5) and f[19] < 0.02
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))
    lin = [lr_multiplier(s, warmup_steps=0, total_steps=10, kind="linear") for s in range(10)]
    assert lin[0] == 1.0 and lin[5] == pytest.approx(0.5)
    assert {lr_multiplier(s, warmup_steps=0, total_steps=10, kind="constant") for s in range(10)} == {1.0}


def test_total_steps_from_epochs_and_max_steps():
    t = TrainConfig(max_steps=None, epochs=3, batch_size_per_worker=2, grad_accum_steps=1)
    assert total_steps(t, num_rows=10, world_size=2) == (6, 2)  # 5 rows/worker -> 2 batches
    t = TrainConfig(max_steps=4, batch_size_per_worker=2)
    assert total_steps(t, num_rows=10, world_size=2) == (4, 2)
    with pytest.raises(Exception, match="too few"):
        total_steps(TrainConfig(batch_size_per_worker=4), num_rows=6, world_size=2)


# ------------------------------------------------------------------------------------------------- EMA
def test_ema_update_swap_and_consolidate_single_process():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ema = ShardedEMA(net.named_parameters(), 0.9)
    ref = {n: p.detach().clone() for n, p in net.named_parameters()}
    for n_upd in range(5):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        d = min(0.9, (1 + n_upd) / (10 + n_upd))
        ref = {n: d * ref[n] + (1 - d) * p.detach() for n, p in net.named_parameters()}
    full = consolidate([ema.state_dict()])
    for n in ref:
        torch.testing.assert_close(full[n], ref[n], rtol=0, atol=1e-6)
    before = net.weight.detach().clone()
    with ema.swap():
        torch.testing.assert_close(net.weight.detach(), ref["weight"], rtol=0, atol=1e-6)
    torch.testing.assert_close(net.weight.detach(), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="decay"):
        ShardedEMA(net.named_parameters(), 1.0)


def test_ema_is_exact_under_real_zero3_with_persistent_params(tmp_path):
    """Two gloo processes run DeepSpeed ZeRO-3: the sharded EMA, consolidated, equals an EMA of the gathered
    weights; inside swap() the model computes with the EMA (persistent and partitioned params alike), and the
    trained weights come back afterwards."""
    spawn_gloo(ema_zero3_worker, str(tmp_path), nprocs=2)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["persistent"] >= 2 and r["partitioned"] >= 2  # both ZeRO-3 parameter kinds are exercised
    assert r["shard_numel"] == [120, 120]  # a.weight (40 x 6) split in two
    assert r["ema_max_err"] < 1e-6
    assert r["swap_max_err"] < 1e-5
    assert r["restore_max_err"] == 0.0
    assert r["ema_differs_from_weights"] > 1e-3  # the swap really changed the weights in use


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_worker_side_export_gather_equals_zero_to_fp32_and_the_consolidated_ema(tmp_path, zero_stage):
    """Two gloo processes under real DeepSpeed: the weights the workers gather for the export (fp32 masters,
    frozen params and buffers; then with the sharded EMA) equal what zero_to_fp32 and ema.consolidate read
    back from the checkpoint files, which the driver therefore never needs to download."""
    spawn_gloo(gather_worker, str(tmp_path), zero_stage, nprocs=2)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["same_keys"] and r["shapes_ok"]
    assert r["frozen"] > 0 and r["trainable"] > 0 and r["buffers"] > 0  # every kind of tensor is covered
    assert r["raw_max_err"] == 0.0 and r["ema_max_err"] == 0.0
    assert r["ema_moved"] > 1e-4  # the EMA really replaced the trained weights


# --------------------------------------------------------------------------------------------- tracking
def test_tracking_uri_defaults_to_sqlite_in_cwd(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.resolve_tracking_uri(cwd=tmp_path) == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.resolve_tracking_uri() == "http://127.0.0.1:5000"
    assert (
        tracking.resolve_tracking_uri("sqlite:///rel.db", cwd=tmp_path)
        == f"sqlite:///{tmp_path.resolve()}/rel.db"
    )
    assert tracking.redact_uri("https://bob:hunter2@mlflow.example/x") == "https://***@mlflow.example/x"


def test_params_have_no_secrets(monkeypatch):
    secret = "fake-secret-value-123456"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    cfg = {"train": {"lr": 1e-4}, "s3": {"secret_key": "abc-should-hide", "endpoint": f"http://x/{secret}"}}
    params = tracking.safe_params(cfg)
    assert params["train.lr"] == "0.0001"
    assert params["s3.secret_key"] == "***"
    assert secret not in json.dumps(params)
    assert secret not in tracking.config_yaml(cfg) and "abc-should-hide" not in tracking.config_yaml(cfg)


# ------------------------------------------------------------------------------------------- config/CLI
def test_resolve_config_defaults(tmp_path):
    cfg = PyocoConfig.model_validate(
        {
            "name": "demo",
            "output": str(tmp_path / "o"),
            "preprocess": {"input": "x", "output": str(tmp_path / "pp")},
        }
    )
    r = resolve_config(cfg)
    assert r.train.data == str(tmp_path / "pp" / "clips" / "train")  # train never reads clips/val
    assert r.train.output == str(tmp_path / "o" / "model")
    assert r.train.storage_path == str(tmp_path / "o" / "ray")
    assert r.train.run_name is None  # run_train names the run after the settings' key (issue 12)
    p = resolve_config(pretrain_config(cfg), image_pretrain=True)
    assert p.train.image_pretrain and p.model.train_layers == "all"
    assert p.train.output == str(tmp_path / "o" / "pretrained-image")
    assert p.train.zero_stage == 0 and p.train.num_workers == 1
    # Image pretraining is decided here, once: whatever the noise section says, an image model's frames are
    # independent (the worker's ImagePretrainer has no branch of its own for it).
    q = resolve_config(
        cfg.model_copy(update={"noise": cfg.noise.model_copy(update={"alpha": 2.0})}), image_pretrain=True
    )
    assert (q.noise.kind, q.noise.alpha, q.model.train_layers) == ("iid", 0.0, "all")
    with pytest.raises(Exception, match="train.data is not set"):
        resolve_config(PyocoConfig())


def test_shipped_tiny_configs_validate():
    from pyoco.config import load_config

    root = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"demo.yaml", "pretrain_video16.yaml", "bench_image16.yaml", "train_tiny.yaml"} <= set(names)
    for name in names:
        cfg = load_config(root / name)
        assert cfg.train.max_steps and cfg.train.num_workers >= 1, name
    # The demo finetunes the shipped video model, which has the branch its config asks for.
    demo, video = load_config(root / "demo.yaml"), load_config(root / "pretrain_video16.yaml")
    assert demo.model.motion_branch == video.model.motion_branch == "caption-conv"
    assert demo.noise == video.noise and demo.train.prediction_type == video.train.prediction_type


def test_cli_bad_input_is_one_line(tmp_path):
    from pipelines.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["train", "--config", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "config file not found" in res.output and "Traceback" not in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  zero_stage: 5\n")
    res = runner.invoke(app, ["train", "--config", str(bad)])
    assert res.exit_code == 2 and "train.zero_stage" in res.output
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps(tiny_config(tmp_path, tmp_path / "no-clips")))
    res = runner.invoke(app, ["train", "--config", str(cfg)])
    assert res.exit_code == 2 and "clips folder not found" in res.output
    for bad_set, why in (("lr=1", "expected SECTION.FIELD=VALUE"), ("train.lr=", "null value"),
                         ("train.lr=[1", "not YAML"), ("train.wings=1", "train.wings")):  # fmt: skip
        res = runner.invoke(app, ["train", "--config", str(cfg), "--set", bad_set])
        assert res.exit_code == 2 and why in res.output and "Traceback" not in res.output, res.output
    help_text = runner.invoke(app, ["train", "--help"]).output
    for flag in (
        "--config",
        "--data",
        "--max-steps",
        "--num-workers",
        "--zero-stage",
        "--storage-path",
        "--set",
    ):
        assert flag in help_text
    assert "--config" in runner.invoke(app, ["pretrain-image", "--help"]).output


def test_train_set_overrides_any_field_as_yaml():
    from pipelines.cli.train import parse_sets
    from pyoco.config import load_config

    root = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
    sets = ["model.pretrained=./x", "train.lr=5e-4", "train.seed=1", "train.betas=[0.9, 0.99]"]
    cfg = load_config(root / "pretrain_video16.yaml", parse_sets(sets))
    assert (cfg.model.pretrained, cfg.train.lr, cfg.train.seed) == ("./x", 5e-4, 1)
    assert tuple(cfg.train.betas) == (0.9, 0.99) and cfg.train.max_steps == 1600  # the rest as the file says


def test_typed_config_rejects_unknown_train_field():
    with pytest.raises(Exception, match="train.zero_stages: unknown field"):
        parse_config({"train": {"zero_stages": 2}})
    assert math.isfinite(parse_config({"train": {"precision": "bf16"}}).train.lr)
    assert np.isclose(TrainConfig().sample_guidance, 3.0)


# ------------------------------------------------------------------------------- issue 12: stop, resume
def test_epochs_alone_is_not_capped_by_the_default_max_steps():
    """Issue 12 item 8: ``train: {epochs: 5}`` used to stop at the default max_steps (20)."""
    from pyoco.config import ConfigError

    t = parse_config({"train": {"epochs": 5, "batch_size_per_worker": 2}}).train
    assert (t.max_steps, t.epochs) == (None, 5)
    assert total_steps(t, num_rows=100, world_size=2) == (5 * 25, 25)  # 50 rows/worker -> 25 batches
    assert parse_config({"train": {}}).train.max_steps == 20  # neither given: the default stop
    with pytest.raises(ConfigError, match=r"train: .*set max_steps or epochs, not both") as err:
        parse_config({"train": {"epochs": 5, "max_steps": 30}})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="both are empty"):
        parse_config({"train": {"max_steps": None}})
    # The typed config round-trips (workers rebuild it from model_dump).
    assert TrainConfig.model_validate(t.model_dump()).epochs == 5


def _compat(tmp_path, **over):
    from pipelines.train.checkpoint import compat_fields

    clips = write_clips(tmp_path / "data", num_clips=4, num_frames=4, size=8)
    cfg = parse_config(tiny_config(tmp_path, clips))
    for dotted, value in over.items():
        section, field = dotted.split(".")
        setattr(getattr(cfg, section), field, value)
    g = inspect_clips(str(clips))
    return compat_fields(cfg, g, total=cfg.train.max_steps or 0, data_hash=manifest_hash(str(clips)))


def test_resume_check_names_the_changed_settings_and_the_worker_count(tmp_path):
    """Issue 12 item 2: a checkpoint records what was learned with; restore refuses another config in one
    line naming the fields, and another worker count."""
    from pipelines.common import PyocoError
    from pipelines.train.checkpoint import check_resume, compat_hash

    base = _compat(tmp_path)
    state = {"world_size": 2, "compat": {"hash": compat_hash(base), "fields": base}}
    check_resume(state, base, 2, where="ckpt")  # same config, same world: resumes
    # Things that do not change what is learned keep the hash: logging, checkpointing, the stop under a
    # constant LR schedule (extending a run).
    same = _compat(tmp_path, **{"train.max_steps": 9, "train.log_every": 3, "train.num_to_keep": 5})
    assert compat_hash(same) == compat_hash(base)
    with pytest.raises(PyocoError, match=r"noise\.alpha 1\.0 -> 2\.0") as err:
        check_resume(state, _compat(tmp_path, **{"noise.alpha": 2.0}), 2, where="ckpt")
    assert "\n" not in str(err.value) and str(err.value).startswith("ckpt: refusing to resume")
    with pytest.raises(PyocoError, match=r"train\.lr 0\.001 -> 0\.002.*train\.seed 0 -> 1"):
        check_resume(state, _compat(tmp_path, **{"train.lr": 2e-3, "train.seed": 1}), 2, where="ckpt")
    with pytest.raises(PyocoError, match="model.train_layers 'all' -> 'temporal'"):
        check_resume(state, _compat(tmp_path, **{"model.train_layers": "temporal"}), 2, where="ckpt")
    # Under a decaying schedule the horizon is part of what is learned.
    cosine = _compat(tmp_path, **{"train.lr_schedule": "cosine"})
    longer = _compat(tmp_path, **{"train.lr_schedule": "cosine", "train.max_steps": 9})
    assert cosine["train.total_steps"] == 4 and compat_hash(cosine) != compat_hash(longer)
    with pytest.raises(PyocoError, match=r"written by 2 workers, this run has train.num_workers 1"):
        check_resume(state, base, 1, where="ckpt")
    with pytest.raises(PyocoError, match="no compatibility record"):
        check_resume({"world_size": 2, "step": 20}, base, 2, where="ckpt")


def test_existing_checkpoints_skip_ray_files_named_like_checkpoints(tmp_path):
    """A finished run's folder holds Ray Train's ``checkpoint_manager_snapshot.json`` next to the checkpoint
    folders: rerunning the same train key must read the folders and ignore the file (it raised
    NotADirectoryError before)."""
    from pipelines.train.checkpoint import STATE_DIR, TRAIN_STATE, _check_existing_checkpoints, compat_hash

    base = _compat(tmp_path)
    cfg = parse_config(tiny_config(tmp_path, tmp_path / "data"))
    t = cfg.train.model_copy(
        update={"storage_path": str(tmp_path / "runs"), "run_name": "r", "num_workers": 2}
    )
    run = tmp_path / "runs" / "r"
    for step in (2, 4):
        state_dir = run / f"checkpoint_2026-12-02_00-00-0{step}.000000" / STATE_DIR
        state_dir.mkdir(parents=True)
        state = {"world_size": 2, "step": step, "compat": {"hash": compat_hash(base), "fields": base}}
        (state_dir / TRAIN_STATE).write_text(json.dumps(state))
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert _check_existing_checkpoints(t, base) == 4
    assert _check_existing_checkpoints(t.model_copy(update={"run_name": "none"}), base) is None


# ----------------------------------------------------------------------------- issue 12: no pickles
def test_rng_and_ema_state_are_tensors_and_json_not_pickles(tmp_path):
    """Issue 12 item 7: checkpoint RNG/EMA state loads without unpickling anything."""
    import random

    from pipelines.train.checkpoint import load_rng_state, save_rng_state
    from pipelines.train.ema import load_ema_state, save_ema_state

    torch.manual_seed(3)
    net = torch.nn.Linear(3, 2)
    ema = ShardedEMA(net.named_parameters(), 0.9, rank=1)
    ema.update()
    save_ema_state(ema.state_dict(), tmp_path / "ema.safetensors")
    back = load_ema_state(tmp_path / "ema.safetensors")
    assert {k: back[k] for k in ("decay", "num_updates", "zero3", "rank")} == {
        "decay": 0.9,
        "num_updates": 1,
        "zero3": False,
        "rank": 1,
    }
    assert back["shapes"] == {"weight": [2, 3], "bias": [2]}
    for n, t in ema.shadow.items():
        torch.testing.assert_close(back["shadow"][n], t, rtol=0, atol=0)

    g = torch.Generator().manual_seed(11)
    np.random.seed(5)
    random.seed(7)
    torch.randn(3, generator=g)
    save_rng_state(tmp_path / "rng.safetensors", g)
    expected = (torch.randn(4, generator=g), torch.rand(2), np.random.rand(2), random.random())
    torch.randn(9, generator=g), torch.rand(9), np.random.rand(9), random.random()  # move every stream on
    load_rng_state(tmp_path / "rng.safetensors", g)
    got = (torch.randn(4, generator=g), torch.rand(2), np.random.rand(2), random.random())
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], expected[1], rtol=0, atol=0)
    assert np.array_equal(got[2], expected[2]) and got[3] == expected[3]

    # Both files are safetensors: an 8-byte header length, a JSON header, raw tensor bytes; no pickle.
    for name in ("ema.safetensors", "rng.safetensors"):
        blob = (tmp_path / name).read_bytes()
        n = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + n])
        assert "__metadata__" in header and not blob.startswith(b"\x80")  # pickle protocol 2+ opens with 0x80
        assert b"\x80\x02" not in blob[:16] and b"PK\x03\x04" not in blob  # nor a torch.save zip


# -------------------------------------------------------------------------- issue 12: data hash, pooled
def test_manifest_hash_is_the_stable_data_hash(tmp_path):
    """Issue 12 item 8: train tagged a hash of the whole manifest (new on every preprocess run); now it is the
    manifest's data_hash, the value the workflow and the registry record."""
    clips = write_clips(tmp_path, num_clips=2)
    manifest = {"inputs": 2, "data_hash": "0123456789abcdef", "created_at": "2026-01-01T00:00:00+00:00"}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert manifest_hash(str(clips)) == "0123456789abcdef"
    manifest.update(created_at="2026-06-01T00:00:00+00:00", elapsed_s=12.5)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert manifest_hash(str(clips)) == "0123456789abcdef"
    # A manifest without data_hash: its volatile fields do not count either.
    (tmp_path / "manifest.json").write_text(json.dumps({"inputs": 2, "created_at": "a"}))
    h = manifest_hash(str(clips))
    (tmp_path / "manifest.json").write_text(json.dumps({"inputs": 2, "created_at": "b", "elapsed_s": 1}))
    assert manifest_hash(str(clips)) == h


def test_pooled_clips_sample_with_the_one_pooled_token_they_trained_on(tmp_path):
    """Issue 12 item 8: a pooled-embedding dataset trains on 1 token; the package's text encoder must give
    the same conditioning at sampling/evaluation, not 32 token states."""
    from pipelines.train.driver import _text_embeddings
    from pyoco.text import load_text_encoder

    clips = write_clips(tmp_path, num_clips=2, embedding="pooled")
    cfg = parse_config(tiny_config(tmp_path, clips, sample_prompts=["a red square moves right", "a dot"]))
    g = inspect_clips(str(clips))
    desc, null, null_mask, cond, mask = _text_embeddings(cfg, g)
    assert cond.shape == (2, 1, 384) and null.shape == (1, 1, 384) and mask.all()
    enc = load_text_encoder(desc)  # what pyoco.package.ModelPackage.text_encoder() builds
    c, m = enc.encode(["a red square moves right", "a dot"])
    assert tuple(c.shape) == (2, 1, 384) and m.all()
    torch.testing.assert_close(c.numpy(), cond, rtol=0, atol=1e-6)
    n, _ = enc.null_embedding(1)
    torch.testing.assert_close(n.numpy(), null, rtol=0, atol=1e-6)
    # Token-level clips keep their token length.
    tok = write_clips(tmp_path / "tok", num_clips=2, text_len=4)
    desc_tok = _text_embeddings(cfg, inspect_clips(str(tok)))[0]
    assert not desc_tok.get("pooled") and load_text_encoder(desc_tok).encode(["a"])[0].shape == (1, 4, 384)


def test_deepspeed_checkpoint_loading_refuses_code_in_the_pickle(tmp_path):
    """Issue 12 item 7: DeepSpeed 0.19 loads its checkpoint files with weights_only=False; the engine pyoco
    installs before ``load_checkpoint`` unpickles only tensors, plain data and DeepSpeed's data classes."""
    import os
    import types

    from pipelines.train.deepspeed import setup_deepspeed, use_weights_only_loading

    setup_deepspeed(use_gpu=False)
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    engine = types.SimpleNamespace(checkpoint_engine=TorchCheckpointEngine())
    use_weights_only_loading(engine)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"module": {"w": torch.ones(2)}, "evil": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(RuntimeError, match=r"evil.pt: refusing to unpickle DeepSpeed checkpoint .*system"):
        engine.checkpoint_engine.load(str(tmp_path / "evil.pt"), map_location="cpu")
    assert not marker.exists()
    # What DeepSpeed's ZeRO optimizer shards really hold still loads.
    ok = {
        "loss_scaler": LossScaler(1.0),
        "zero_stage": ZeroStageEnum.gradients,
        "state": {"m": torch.zeros(3)},
    }
    torch.save(ok, tmp_path / "ok.pt")
    back = engine.checkpoint_engine.load(str(tmp_path / "ok.pt"), map_location="cpu")
    assert back["zero_stage"] == ZeroStageEnum.gradients and back["loss_scaler"].cur_scale == 1.0


# ------------------------------------------------------------------------------------- image pretraining
def test_image_pretrainer_trains_one_random_frame_per_clip_drawn_from_the_rank_stream():
    """ImagePretrainer overrides one step, ``prepare``: each clip gives one frame (T = 1), its index drawn
    from the rank's noise generator; the video Trainer keeps all frames."""
    from pipelines.train.loop import ImagePretrainer, Trainer

    def bare(cls, seed: int):
        tr = object.__new__(cls)  # prepare needs no engine: device, dtype, generator, no online VAE
        tr.device, tr.dtype, tr.encode_online = torch.device("cpu"), torch.float32, False
        tr.generator = torch.Generator().manual_seed(seed)
        return tr

    # x0 (B, C, T, H, W), every pixel of frame t of clip b equal to 10 b + t
    b, t = torch.meshgrid(torch.arange(5), torch.arange(4), indexing="ij")
    x0 = (10 * b + t).float()[:, None, :, None, None].expand(5, 3, 4, 2, 2).contiguous()
    batch = {"x0": x0, "cond": torch.zeros(5, 2, 8), "cond_mask": torch.ones(5, 2, dtype=torch.bool)}

    video, cond, mask = bare(Trainer, 0).prepare(batch)
    torch.testing.assert_close(video, x0, rtol=0, atol=0)
    assert cond.shape == (5, 2, 8) and mask.all()

    image, _, _ = bare(ImagePretrainer, 0).prepare(batch)
    assert image.shape == (5, 3, 1, 2, 2)
    expected = torch.randint(0, 4, (5,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(image[:, 0, 0, 0, 0], 10 * torch.arange(5.0) + expected, rtol=0, atol=0)
    assert (image == image[:, :1, :1, :1, :1]).all()  # a whole frame, every channel and pixel
    again, _, _ = bare(ImagePretrainer, 0).prepare(batch)
    torch.testing.assert_close(again, image, rtol=0, atol=0)
    assert (
        len({tuple(bare(ImagePretrainer, s).prepare(batch)[0][:, 0, 0, 0, 0].tolist()) for s in range(4)}) > 1
    )
    # A batch that is already single frames passes through untouched.
    one = {**batch, "x0": x0[:, :, :1]}
    torch.testing.assert_close(bare(ImagePretrainer, 0).prepare(one)[0], x0[:, :, :1], rtol=0, atol=0)


def test_step_clock_leaves_the_attempts_first_steps_out_of_the_steady_rates(monkeypatch):
    """The checkpoint summary's step-time median and loop rate skip the first two steps of an attempt (warm-up),
    and count from the attempt's own start step after a resume."""
    from pipelines.train import loop

    now = [100.0]
    monkeypatch.setattr(loop.time, "perf_counter", lambda: now[0])
    clock = loop.StepClock(start_step=4)  # resumed at step 4
    for step, (busy, idle) in enumerate(
        [(9.0, 0.0), (5.0, 0.0), (1.0, 0.5), (2.0, 0.5), (3.0, 0.5)], start=5
    ):
        now[0] += busy
        assert clock.stop(step) == busy
        now[0] += idle  # logging, samples, checkpoint: outside the step time, inside the loop rate
        clock.start()
    out = clock.summary(9, loss=0.25)
    assert out["attempt_start_step"] == 4 and out["step"] == 9 and out["loss"] == 0.25
    assert out["steady_steps"] == 3 and out["step_time_median_s"] == 2.0
    # steady from the end of step 6 (the 2nd of the attempt) to now: steps 7-9, each with its idle time
    assert out["loop_time_per_step_s"] == (1.5 + 2.5 + 3.5) / 3

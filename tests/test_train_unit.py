"""Training building blocks without Ray: collate layouts, DeepSpeed config, LR schedule, EMA math (and under real
ZeRO-3 in two gloo processes), the MLflow adapter's redaction, config resolution and CLI errors."""

from __future__ import annotations

import json
import math
import socket
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from pipelines import tracking
from pipelines.train import pretrain_config, resolve_config, total_steps
from pipelines.train_data import DataError, collate_clips, inspect_clips, manifest_hash
from pipelines.train_ds import deepspeed_config, lr_multiplier, use_bf16
from pipelines.train_ema import ShardedEMA, consolidate
from pyoco.config import PyocoConfig, TrainConfig, parse_config
from tests.fixtures_train import clip_frames, ema_zero3_worker, tiny_config, write_clips


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
    t = TrainConfig(max_steps=4, epochs=3, batch_size_per_worker=2)
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
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(ema_zero3_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r = json.loads((tmp_path / "result.json").read_text())
    assert r["persistent"] >= 2 and r["partitioned"] >= 2  # both ZeRO-3 parameter kinds are exercised
    assert r["shard_numel"] == [120, 120]  # a.weight (40 x 6) split in two
    assert r["ema_max_err"] < 1e-6
    assert r["swap_max_err"] < 1e-5
    assert r["restore_max_err"] == 0.0
    assert r["ema_differs_from_weights"] > 1e-3  # the swap really changed the weights in use


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
    assert r.train.run_name == "demo-train"
    p = resolve_config(pretrain_config(cfg), image_pretrain=True)
    assert p.train.image_pretrain and p.model.train_layers == "all"
    assert (
        p.train.output == str(tmp_path / "o" / "pretrained-image")
        and p.train.run_name == "demo-pretrain-image"
    )
    assert p.train.zero_stage == 0 and p.train.num_workers == 1
    with pytest.raises(Exception, match="train.data is not set"):
        resolve_config(PyocoConfig())


def test_shipped_tiny_configs_validate():
    from pyoco.config import load_config

    root = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
    for name in ("train_tiny.yaml", "pretrain_tiny.yaml"):
        cfg = load_config(root / name)
        assert cfg.train.max_steps and cfg.train.num_workers >= 1


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
    help_text = runner.invoke(app, ["train", "--help"]).output
    for flag in ("--config", "--data", "--max-steps", "--num-workers", "--zero-stage", "--storage-path"):
        assert flag in help_text
    assert "--config" in runner.invoke(app, ["pretrain-image", "--help"]).output


def test_typed_config_rejects_unknown_train_field():
    with pytest.raises(Exception, match="train.zero_stages: unknown field"):
        parse_config({"train": {"zero_stages": 2}})
    assert math.isfinite(parse_config({"train": {"precision": "bf16"}}).train.lr)
    assert np.isclose(TrainConfig().sample_guidance, 3.0)

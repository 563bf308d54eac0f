"""File operations that must never destroy or escape data (issue 12, item 3): export swaps a package in
and refuses to replace a folder that is not one, ``localize`` refuses remote keys with ``..``, and two
concurrent resolvers of one ``models:/`` version never delete each other's copy."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch

from pipelines.common import PyocoError
from pipelines.train.checkpoint import CHECKPOINT_TAG, STATE_DIR, TRAIN_STATE
from pipelines.train.export import export_checkpoint
from pyoco.config import PyocoConfig

pytest_plugins = ("tests.fixtures_registry",)


def make_checkpoint(root: Path, *, seed: int = 0, step: int = 5) -> Path:
    """A ZeRO-0 checkpoint folder in the layout Trainer.save_checkpoint writes (module states + state)."""
    from pyoco.diffusion import make_scheduler_config
    from pyoco.model import TinyUNetConfig, VideoDenoiser, build_unet2d, inflate

    unet = inflate(
        build_unet2d(TinyUNetConfig(sample_size=16, block_out_channels=(16, 32)), seed=seed), seed=seed
    )
    model = VideoDenoiser(unet)
    (root / CHECKPOINT_TAG).mkdir(parents=True)
    torch.save({"module": model.state_dict()}, root / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
    state_dir = root / STATE_DIR
    state_dir.mkdir()
    unet.save_config(str(state_dir / "unet"))
    state = {
        "step": step,
        "zero_stage": 0,
        "world_size": 1,
        "image_pretrain": False,
        "unet_class": type(unet).__name__,
        "ema": False,
        "ema_decay": 0.999,
        "geometry": {"height": 16, "width": 16, "num_frames": 4, "fps": 8},
        "scheduler_config": make_scheduler_config(None),
        "noise": {"kind": "progressive", "alpha": 1.0},
        "mlflow_run_id": None,
    }
    (state_dir / TRAIN_STATE).write_text(json.dumps(state))
    return root


def _export(ckpt: Path, out: str) -> dict:
    return export_checkpoint(
        ckpt, out, cfg=PyocoConfig(), text_encoder={"kind": "minilm", "max_length": 8}, lineage={}
    )


def test_export_refuses_a_folder_that_is_not_a_package_and_replaces_a_package(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", step=5)
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.tex").write_text("years of work")
    with pytest.raises(PyocoError, match="not a pyoco model package"):
        _export(ckpt, str(precious))
    assert (precious / "thesis.tex").read_text() == "years of work"
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(PyocoError, match="is a file"):
        _export(ckpt, str(tmp_path / "a-file"))

    from pyoco.package import load_package, read_info

    out = tmp_path / "exports" / "model"
    assert _export(ckpt, str(out))["step"] == 5
    assert read_info(out).lineage["step"] == 5
    (out / "leftover-from-old-version.bin").write_bytes(b"old")
    ckpt2 = make_checkpoint(tmp_path / "ckpt2", seed=1, step=9)
    _export(ckpt2, str(out))  # an earlier package is replaced as a whole
    assert read_info(out).lineage["step"] == 9
    assert not (out / "leftover-from-old-version.bin").exists()
    assert load_package(str(out)).denoiser.is_video
    assert sorted(p.name for p in out.parent.iterdir()) == ["model"]  # no temporary folders left
    empty = tmp_path / "empty"
    empty.mkdir()
    _export(ckpt, str(empty))  # an empty folder is fine
    assert read_info(empty).lineage["step"] == 5


def test_export_to_s3_replaces_a_package_and_refuses_other_prefixes(tmp_path, moto_s3):
    from pyoco import storage
    from pyoco.package import load_package

    bucket = moto_s3.make_bucket("pyoco-export")
    storage.write_bytes(f"s3://{bucket}/data/part-0.parquet", b"data")
    ckpt = make_checkpoint(tmp_path / "ckpt", step=3)
    with pytest.raises(PyocoError, match="not a pyoco model package"):
        _export(ckpt, f"s3://{bucket}/data")
    assert storage.read_bytes(f"s3://{bucket}/data/part-0.parquet") == b"data"
    out = f"s3://{bucket}/exports/model"
    _export(ckpt, out)
    storage.write_bytes(f"{out}/stale.bin", b"old")
    _export(make_checkpoint(tmp_path / "ckpt2", step=7), out)
    assert not storage.exists(f"{out}/stale.bin")
    assert load_package(out, cache_dir=str(tmp_path / "cache")).info.lineage["step"] == 7
    fs, _ = storage.filesystem(out)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{bucket}/exports")) == ["model"]


def test_localize_refuses_keys_that_climb_out_of_the_cache(tmp_path, moto_s3):
    import boto3

    from pyoco.model import localize

    bucket = moto_s3.make_bucket("pyoco-escape")
    s3 = boto3.client("s3", endpoint_url=moto_s3.endpoint_url)
    s3.put_object(Bucket=bucket, Key="model/config.json", Body=b"{}")
    s3.put_object(Bucket=bucket, Key="model/../../escaped.txt", Body=b"evil")  # S3 keys are plain strings
    cache = tmp_path / "deep" / "cache"
    with pytest.raises(ValueError, match=r"\.\.") as info:  # pyoco.errors.InputError: bad input, exit 2
        localize(f"s3://{bucket}/model", cache_dir=str(cache))
    assert type(info.value).__name__ == "InputError"
    assert not list(tmp_path.rglob("escaped.txt"))
    # the same rule as preprocess's tar members: absolute paths, drive letters, "." / ".." / empty parts
    from pyoco.model import _unsafe_key

    for bad in ("/etc/passwd", "C:/x", "a/../b", "./a", "a//b", "a\\..\\b", "a\x00b", ""):
        assert _unsafe_key(bad), bad
    assert not _unsafe_key("unet/diffusion_pytorch_model.safetensors")
    s3.put_object(Bucket=bucket, Key="ok/config.json", Body=b"{}")
    assert (localize(f"s3://{bucket}/ok", cache_dir=str(cache)) / "config.json").read_bytes() == b"{}"


def test_concurrent_resolvers_of_one_version_never_delete_each_others_copy(
    tracking_env, tiny_package, model_name, tmp_path
):
    """Four threads resolve the same models:/NAME/1 at once (empty cache, so each downloads), and each
    keeps reading every file of the folder it got back until all four are done. Before the fix a later
    resolver deleted the complete copy an earlier one was reading."""
    from pipelines.registry.register import register_model
    from pipelines.registry.resolve import resolve_model_uri
    from pyoco.package import read_info

    register_model(model_name, checkpoint=str(tiny_package), metrics={"val_loss": 0.5})
    n = 4
    barrier = threading.Barrier(n)
    done = threading.Event()
    finished = []
    results: dict[int, str] = {}
    errors: list[str] = []

    def resolve(i: int) -> None:
        try:
            barrier.wait(timeout=60)
            path = Path(resolve_model_uri(f"models:/{model_name}/1"))
            results[i] = str(path)
            files = sorted(p for p in path.rglob("*") if p.is_file())
            assert files, "empty package"
            finished.append(i)
            if len(finished) == n:
                done.set()
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                last = done.is_set()
                for f in files:
                    f.read_bytes()  # FileNotFoundError when another resolver deleted this copy
                read_info(path)
                if last:
                    break
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(f"thread {i}: {type(err).__name__}: {err}")
            done.set()

    threads = [threading.Thread(target=resolve, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert len(set(results.values())) == 1
    leftovers = [p.name for p in (tmp_path / "cache" / "registry").iterdir() if p.name.startswith(".")]
    assert leftovers == []

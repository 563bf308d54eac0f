"""Preprocess's held-out split and labels (issue 10, items 1 and 2), on real preprocess runs:

- the split is stable: synth data of N, then N + k videos; no video of the first run changes side, and train
  never sees a val clip (neither in clips/train nor through train's reader);
- synth ``.json`` ground truth becomes the ``labels`` column as-is;
- a ``.cls`` member (alone and merged with ``.json``), a bad ``.json`` (rejected ``bad_labels``), a sample
  with neither (null), and UCF-101 class folders (``{"class": NAME}``)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from pipelines.preprocess.step import run_preprocess
from pipelines.train.data import DataError, inspect_clips, list_shards
from pyoco import clips, synth
from pyoco.config import PreprocessConfig
from tests.fixtures_data import shape_video

FRAMES, SIZE = 8, 16


def _cfg(input: Path, output: Path, **kw) -> PreprocessConfig:
    base = dict(
        input=str(input),
        output=str(output),
        num_frames=4,
        size=SIZE,
        rows_per_file=4,
        videos_per_task=4,
        embed_batch_size=16,
        text_max_length=8,
        captions={"dedupe": "none"},
    )
    base.update(kw)
    return PreprocessConfig(**base)


def _sides(out: Path) -> dict[str, str]:
    """{video key: split} from the files on disk."""
    sides: dict[str, str] = {}
    for split in clips.SPLITS:
        try:
            table = clips.read_clips(str(out), split, columns=["key"])
        except clips.DataError:
            continue
        for key in table.column("key").to_pylist():
            assert sides.setdefault(key, split) == split, f"{key} has clips on both sides"
    return sides


def test_split_is_stable_when_videos_are_added_and_labels_are_the_synth_truth(ray_local, tmp_path):
    n, k, f = 10, 6, 0.3
    runs = {}
    for videos in (n, n + k):
        raw = tmp_path / f"raw{videos}"
        synth.write_dataset(str(raw), videos=videos, shards=2, seed=0, frames=FRAMES, size=SIZE, fps=8)
        out = tmp_path / f"out{videos}"
        manifest = run_preprocess(_cfg(raw, out, val_fraction=f), progress=False)
        runs[videos] = (out, manifest, _sides(out))

    (_, m_n, sides_n), (out_nk, m_nk, sides_nk) = runs[n], runs[n + k]
    assert len(sides_n) == n and len(sides_nk) == n + k
    # the stability property: every video of the first run is on the same side in the second
    assert {key: sides_nk[key] for key in sides_n} == sides_n
    # and the side is the documented hash threshold of the key
    assert all(side == clips.split_of(key, f) for key, side in sides_nk.items())
    val_n = {key for key, s in sides_n.items() if s == "val"}
    val_nk = {key for key, s in sides_nk.items() if s == "val"}
    assert val_n and val_n < val_nk  # keys 6 and 9 at n = 10; 12, 13 and 15 join them
    for m, sides in ((m_n, sides_n), (m_nk, sides_nk)):
        n_val = sum(s == "val" for s in sides.values())
        assert (m["val_videos"], m["train_videos"]) == (n_val, len(sides) - n_val)
        assert (m["val_clips"], m["train_clips"]) == (n_val, len(sides) - n_val)  # 1 clip per video
        assert m["train_clips"] + m["val_clips"] == m["clips_written"] and m["val_fraction"] == f
        assert m["warnings"] == []
        assert m["inputs"] == m["accepted_videos"] + sum(m["rejected"].values())
    assert m_n["eval_data_hash"] != m_nk["eval_data_hash"]  # the val clips differ
    assert clips.eval_data_hash(str(out_nk)) == m_nk["eval_data_hash"]

    # train never reads val: whichever folder train.data names, its files hold only training videos
    for data in (out_nk, out_nk / "clips", out_nk / "clips" / "train"):
        files = list_shards(str(data))
        assert files and all("/clips/train/" in f for f in files)
        assert inspect_clips(str(data)).num_rows == m_nk["train_clips"]
    with pytest.raises(DataError, match="val split; training never reads held-out clips"):
        list_shards(str(out_nk / "clips" / "val"))

    # labels: the synth sample's .json as-is, on both sides
    for split in clips.SPLITS:
        table = clips.read_clips(str(out_nk), split, columns=["key", "labels"])
        for key, labels in zip(table.column("key").to_pylist(), clips.labels_of(table), strict=True):
            spec = synth.make_spec(int(key), seed=0, frames=FRAMES, size=SIZE, fps=8)
            assert labels == spec.attributes()
            assert {"shape", "color", "direction", "speed"} <= labels.keys()


def test_empty_val_on_tiny_data_is_said_in_the_manifest(ray_local, tmp_path):
    raw = tmp_path / "raw"
    synth.write_dataset(str(raw), videos=3, shards=1, seed=0, frames=FRAMES, size=SIZE, fps=8)
    m = run_preprocess(_cfg(raw, tmp_path / "out"), progress=False)  # default val_fraction 0.1
    # keys 0, 1, 2 score 0.49, 0.68, 0.36: none below 0.1
    assert (m["val_videos"], m["train_videos"]) == (0, 3)
    assert len(m["warnings"]) == 1 and "val split is empty" in m["warnings"][0]
    with pytest.raises(clips.DataError, match="no clips/val/"):
        clips.clip_files(str(tmp_path / "out"), "val")


def _tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_cls_members_and_ucf_class_folders_become_labels(ray_local, tmp_path):
    raw = tmp_path / "wds"
    raw.mkdir()
    vid = {i: shape_video(40 + i, frames=FRAMES, size=SIZE) for i in range(4)}
    _tar(
        raw / "shard-0.tar",
        {
            "a": {"mp4": vid[0], "txt": b"a red circle moves left", "cls": b"3\n"},
            "b": {"mp4": vid[1], "txt": b"a blue square moves up", "json": b'{"color": "blue"}', "cls": b"7"},
            "c": {"mp4": vid[2], "txt": b"a green star moves down", "json": b"[1, 2]"},
            "d": {"mp4": vid[3], "txt": b"a yellow ring moves right"},
        },
    )
    out = tmp_path / "out-wds"
    m = run_preprocess(_cfg(raw, out, val_fraction=0.0), progress=False)
    assert (m["inputs"], m["accepted_videos"], m["rejected"]) == (4, 3, {"bad_labels": 1})
    assert (m["train_videos"], m["val_videos"], m["warnings"]) == (3, 0, [])
    table = clips.read_clips(str(out), "train", columns=["key", "labels"])
    got = dict(zip(table.column("key").to_pylist(), table.column("labels").to_pylist(), strict=True))
    assert json.loads(got["a"]) == {"class": "3"}
    assert json.loads(got["b"]) == {"color": "blue", "class": "7"}
    assert got["d"] is None
    import pyarrow.parquet as pq

    rejects = pq.read_table(out / "rejects" / "part-00000.parquet").to_pylist()
    assert [(r["key"], r["stage"], r["reason"]) for r in rejects] == [("c", "labels", "bad_labels")]
    assert "a JSON list, expected an object" in rejects[0]["detail"]

    ucf = tmp_path / "ucf"
    for c, cls in enumerate(["ApplyEyeMakeup", "JumpingJack"]):
        (ucf / cls).mkdir(parents=True)
        (ucf / cls / f"v_{cls}_g01_c01.avi").write_bytes(shape_video(50 + c, frames=FRAMES, size=SIZE))
    out = tmp_path / "out-ucf"
    m = run_preprocess(_cfg(ucf, out, val_fraction=0.0), progress=False)
    assert (m["format"], m["accepted_videos"]) == ("ucf101", 2)
    table = clips.read_clips(str(out), "train", columns=["key", "labels"])
    got = dict(zip(table.column("key").to_pylist(), clips.labels_of(table), strict=True))
    assert got == {
        "ApplyEyeMakeup/v_ApplyEyeMakeup_g01_c01.avi": {"class": "ApplyEyeMakeup"},
        "JumpingJack/v_JumpingJack_g01_c01.avi": {"class": "JumpingJack"},
    }

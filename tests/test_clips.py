"""pyoco.clips on its own (no Ray): the writer/reader round trip, an embedding width that is not 384, labels,
the split layout's errors, and the properties of the per-video split."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pyoco import clips


def _rows(n: int, *, text_len: int = 3, dim: int = 16, t: int = 2, size: int = 4, prefix: str = "c"):
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        frames = rng.integers(0, 256, (t, size, size, 3), dtype=np.uint8)
        rows.append(
            {
                "clip_id": f"{prefix}{(3 * i) % n:03d}",  # written out of clip_id order
                "source": "mem",
                "key": f"v{i}",
                "clip_index": 0,
                "start_frame": 0,
                "num_frames": t,
                "fps": 8.0,
                "height": size,
                "width": size,
                "frames": frames.tobytes(),
                "caption": f"clip {i}",
                "caption_embedding": rng.standard_normal((text_len, dim)).astype(np.float32),
                "caption_mask": [j <= i % text_len for j in range(text_len)],
                "labels": {"color": "red", "i": i} if i % 2 == 0 else None,
                "node_id": "n",
            }
        )
    return rows


def test_write_read_round_trip_with_a_non_384_width(tmp_path):
    rows = _rows(7, dim=16)
    data = tmp_path / "data"
    clips.write_clip_table(rows[:4], str(data / "clips" / "val" / "part-a.parquet"))
    clips.write_clip_table(rows[4:], str(data / "clips" / "val" / "part-b.parquet"))
    files = clips.clip_files(str(data), "val")
    assert [f.rsplit("/", 1)[-1] for f in files] == ["part-a.parquet", "part-b.parquet"]

    table = clips.read_clips(str(data), "val")
    assert table.num_rows == 7 and table.schema.names == clips.clip_schema(3, 16).names
    assert clips.embedding_shape(table.schema) == (3, 16)  # the width travels in the field metadata
    emb, mask = clips.embedding_arrays(table)
    assert emb.shape == (7, 3, 16) and emb.dtype == np.float32 and mask.shape == (7, 3)
    by_id = {r["clip_id"]: r for r in rows}
    for j, cid in enumerate(table.column("clip_id").to_pylist()):
        np.testing.assert_array_equal(emb[j], by_id[cid]["caption_embedding"])
        assert mask[j].tolist() == by_id[cid]["caption_mask"]
    row = table.slice(2, 1).to_pylist()[0]
    np.testing.assert_array_equal(
        clips.frames_array(row), np.frombuffer(by_id[row["clip_id"]]["frames"], np.uint8).reshape(2, 4, 4, 3)
    )
    labels = dict(zip(table.column("clip_id").to_pylist(), clips.labels_of(table), strict=True))
    assert labels == {r["clip_id"]: (r["labels"] or {}) for r in rows}

    # limit: the smallest clip ids, sorted, whatever the files
    first = clips.read_clips(str(data), "val", columns=["caption"], limit=3)
    assert first.column_names == ["caption"]
    assert first.num_rows == 3
    ids = clips.read_clips(str(data), "val", columns=["clip_id"], limit=3).column("clip_id").to_pylist()
    assert ids == sorted(by_id)[:3]


def test_missing_split_and_bad_labels_are_one_line_data_errors(tmp_path):
    data = tmp_path / "data"
    clips.write_clip_table(_rows(2), str(data / "clips" / "train" / "part-a.parquet"))
    with pytest.raises(
        clips.DataError, match=r"clips/val: no clips/val/\*\.parquet files.*val split can be empty"
    ):
        clips.clip_files(str(data), "val")
    with pytest.raises(ValueError, match="split must be one of"):
        clips.split_uri(str(data), "test")
    import pyarrow as pa

    bad = pa.table({"labels": ['{"a": 1}', "[1, 2]"]})
    with pytest.raises(clips.DataError, match="labels of row 1 is a JSON list"):
        clips.labels_of(bad)
    assert clips.labels_of(pa.table({"x": [1, 2]})) == [{}, {}]


def test_split_is_a_per_video_threshold():
    keys = [f"{i:08d}" for i in range(20_000)]
    scores = np.array([clips.split_score(k) for k in keys])
    # uniform: the val share at f = 0.1 is within 3 binomial sd (0.0021) of 0.1
    share = float((scores < 0.1).mean())
    assert abs(share - 0.1) < 3 * np.sqrt(0.1 * 0.9 / len(keys)), share
    # the same on every call, and only a function of the key (no other video changes it)
    assert [clips.split_of(k, 0.1) for k in keys[:50]] == [clips.split_of(k, 0.1) for k in keys[:50]]
    # raising val_fraction only moves videos from train to val
    low = {k for k in keys if clips.split_of(k, 0.1) == "val"}
    high = {k for k in keys if clips.split_of(k, 0.3) == "val"}
    assert low < high
    assert all(clips.split_of(k, 0.0) == "train" for k in keys[:100])


def test_eval_data_hash_is_read_from_the_manifest(tmp_path):
    assert clips.eval_data_hash(str(tmp_path)) is None
    (tmp_path / "manifest.json").write_text(json.dumps({"eval_data_hash": "abc"}))
    assert clips.eval_data_hash(str(tmp_path)) == "abc"

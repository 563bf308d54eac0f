"""``pyoco preprocess`` on local inputs: clip schema and manifest, the malformed corpus (every input
accounted for), folder / UCF-101 inputs, the CLI, and a 2-node Ray cluster giving the 1-node output."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from pipelines.preprocess.step import run_preprocess
from pyoco import synth, video
from pyoco.clips import embedding_arrays, frames_array
from pyoco.config import PreprocessConfig
from tests.fixtures_data import build_bad_corpus, env_without_ray, shape_video

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "pipelines" / "configs" / "preprocess_tiny.yaml"


def tiny_cfg(input: str, output: str, **kw) -> PreprocessConfig:
    base = dict(
        input=input,
        output=output,
        num_frames=8,
        frame_stride=1,
        size=32,
        rows_per_file=5,
        videos_per_task=2,
        embed_batch_size=16,
    )
    base.update(kw)
    return PreprocessConfig(**base)


def read_clips(out: Path):
    files = sorted((out / "clips").glob("*/*.parquet"))  # clips/train/ and clips/val/
    import pyarrow as pa

    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by("clip_id"), files


def read_rejects(out: Path) -> list[dict]:
    return [r for f in sorted((out / "rejects").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]


def check_invariant(manifest: dict) -> None:
    assert manifest["inputs"] == manifest["accepted_videos"] + sum(manifest["rejected"].values())


@pytest.fixture(scope="module")
def local_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("raw") / "shards"
    synth.write_dataset(str(raw), videos=16, shards=2, seed=0, frames=16, size=40, fps=8)
    return raw


@pytest.fixture(scope="module")
def one_node(local_raw, ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("one-node") / "out"
    cfg = tiny_cfg(str(local_raw), str(out), max_clips_per_video=2)
    return cfg, run_preprocess(cfg, progress=False), out


def test_clips_schema_and_manifest(one_node, local_raw):
    cfg, manifest, out = one_node
    on_disk = json.loads((out / "manifest.json").read_text())
    assert on_disk["inputs"] == manifest["inputs"] == 16
    check_invariant(on_disk)
    specs = [synth.make_spec(i, seed=0, frames=16, size=40, fps=8) for i in range(16)]
    n_unique = len({" ".join(s.caption.lower().split()) for s in specs})
    assert on_disk["accepted_videos"] == n_unique
    assert on_disk["rejected"] == ({"duplicate_caption": 16 - n_unique} if n_unique < 16 else {})
    # 16 frames, clips of 8 at stride 1, max 2 clips: exactly 2 per accepted video
    assert on_disk["clips_written"] == 2 * n_unique
    for key in ("config_hash", "pyoco_version", "decode_nodes", "clip_files", "reject_files"):
        assert key in on_disk
    table, files = read_clips(out)
    assert sorted(p.relative_to(out / "clips").as_posix() for p in files) == on_disk["clip_files"]
    assert all(pq.ParquetFile(f).metadata.num_rows <= cfg.rows_per_file for f in files)  # bounded files
    assert table.num_rows == on_disk["clips_written"]
    expected_cols = [
        "clip_id", "source", "key", "clip_index", "start_frame", "num_frames", "fps", "height", "width",
        "frames", "caption", "caption_embedding", "caption_mask", "labels", "node_id", "motion",
    ]  # fmt: skip
    assert table.schema.names == expected_cols
    assert str(table.schema.field("frames").type) == "large_binary"
    emb, mask = embedding_arrays(table)
    assert emb.shape == (table.num_rows, 32, 384) and emb.dtype == np.float32
    assert mask.shape == (table.num_rows, 32) and mask.dtype == bool
    assert (mask.sum(1) >= 3).all() and np.isfinite(emb).all() and (np.abs(emb[mask]).sum(-1) > 0).all()
    assert len(set(table.column("clip_id").to_pylist())) == table.num_rows
    # frames are the decoded, resized clip of the source video
    row = table.slice(0, 1).to_pylist()[0]
    frames = frames_array(row)
    assert frames.shape == (8, 32, 32, 3) and row["fps"] == 8.0
    index = int(row["key"])
    sample = synth.encode_sample(specs[index])
    ref = video.decode(sample["mp4"], start_frame=row["start_frame"], num_frames=8, size=32)
    np.testing.assert_array_equal(frames, ref)
    assert row["caption"] == specs[index].caption
    assert set(table.column("node_id").to_pylist()) == set(on_disk["decode_nodes"])


def test_two_node_cluster_matches_one_node(one_node, tmp_path):
    """Two Ray nodes (1 CPU + `preprocess` each): decode runs on both and the clips equal the 1-node run's."""
    cfg, manifest_1, out_1 = one_node
    out_2 = tmp_path / "two-node"
    cfg_2 = cfg.model_copy(update={"output": str(out_2), "num_cpus_per_task": 0.5})
    result = tmp_path / "result.json"
    code = (
        "import sys; from tests.fixtures_data import two_node_main; two_node_main(sys.argv[1], sys.argv[2])"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, cfg_2.model_dump_json(), str(result)],
        cwd=ROOT,
        env=env_without_ray(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(result.read_text())
    manifest_2, nodes = got["manifest"], got["nodes"]
    assert len(nodes) == 2
    assert set(manifest_2["decode_nodes"]) == set(nodes), "decode tasks did not run on both nodes"
    assert all(n > 0 for n in manifest_2["decode_nodes"].values())
    for key in ("inputs", "accepted_videos", "clips_written", "rejected", "data_hash"):
        assert manifest_2[key] == manifest_1[key], key
    assert manifest_2["config_hash"] != manifest_1["config_hash"]  # num_cpus_per_task differs
    t1, _ = read_clips(out_1)
    t2, _ = read_clips(out_2)
    assert t1.drop_columns(["node_id"]).equals(t2.drop_columns(["node_id"]))
    assert sorted(map(json.dumps, read_rejects(out_1))) == sorted(map(json.dumps, read_rejects(out_2)))


def test_malformed_corpus_every_input_accounted_for(ray_local, tmp_path):
    raw = tmp_path / "work" / "raw"
    expected = build_bad_corpus(raw)
    out = tmp_path / "work" / "out"
    # 16 of the 22 inputs are bad on purpose: lift the reject-rate limit (default 0.5) for this corpus.
    manifest = run_preprocess(tiny_cfg(str(raw), str(out), max_reject_fraction=1.0), progress=False)
    check_invariant(manifest)
    assert manifest["inputs"] == len(expected)
    outcome: dict[tuple[str, str], str] = {}
    for r in read_rejects(out):
        k = (Path(r["source"]).name, r["key"])
        assert k not in outcome, f"{k} rejected twice"
        outcome[k] = r["reason"]
        assert r["stage"] and r["detail"]
    table, _ = read_clips(out)
    for r in table.select(["source", "key"]).to_pylist():
        outcome.setdefault((Path(r["source"]).name, r["key"]), "accepted")
    unsafe_keys = {k for k, v in expected.items() if v == "unsafe_path"}
    # unsafe names are recorded escaped, never as paths
    assert {k for k in outcome if outcome[k] == "unsafe_path"} == unsafe_keys
    assert outcome == expected
    assert manifest["accepted_videos"] == Counter(expected.values())["accepted"]
    # WebM/VP9 and MKV were decoded into real clips
    keys = set(table.column("key").to_pylist())
    assert {"webm", "mkv", "good", "t0", "t1"} <= keys
    # nothing was written outside the output folder (the ../ and absolute members were never extracted)
    assert not list(tmp_path.rglob("evil*")) and not Path("/abs").exists()
    assert sorted(p.name for p in (tmp_path / "work").iterdir()) == ["out", "raw"]


def test_folder_and_ucf101_inputs_and_cli(ray_local, tmp_path):
    from pipelines.cli import app

    # A folder of videos with captions.csv: one listed file is missing, one video is not listed.
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(3):
        (folder / f"v{i}.mp4").write_bytes(shape_video(20 + i, frames=12, size=32))
    (folder / "captions.csv").write_text(
        "file,caption\nv0.mp4,a red circle moves left\nv1.mp4,a blue square moves up\nmissing.mp4,a ghost video\n"
    )
    m = run_preprocess(tiny_cfg(str(folder), str(tmp_path / "out-folder")), progress=False)
    check_invariant(m)
    assert (m["format"], m["inputs"], m["accepted_videos"]) == ("folder", 4, 2)
    assert m["rejected"] == {"caption_missing": 1, "missing_video": 1}

    # UCF-101 class folders, through the CLI with the tiny workflow config (flags override its paths).
    ucf = tmp_path / "ucf"
    for c, cls in enumerate(["ApplyEyeMakeup", "JumpingJack"]):
        (ucf / cls).mkdir(parents=True)
        for i in range(2):
            (ucf / cls / f"v_{cls}_g01_c0{i}.avi").write_bytes(
                shape_video(30 + 2 * c + i, frames=12, size=32)
            )
    out = tmp_path / "out-ucf"
    res = CliRunner().invoke(
        app, ["preprocess", "--config", str(TINY), "--input", str(ucf), "--output", str(out), "--no-progress"]
    )
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    check_invariant(m)
    assert (m["format"], m["inputs"], m["accepted_videos"]) == ("ucf101", 4, 2)
    assert m["rejected"] == {"duplicate_caption": 2}  # two videos per class share the class caption
    table, _ = read_clips(out)
    assert sorted(table.column("caption").to_pylist()) == ["apply eye makeup", "jumping jack"]
    assert m["workflow_config_hash"] is not None


def test_cli_bad_input_is_one_line_error(tmp_path):
    from pipelines.cli import app

    runner = CliRunner()
    res = runner.invoke(
        app, ["preprocess", "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]
    )
    assert res.exit_code == 2
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "nope" in lines[0]
    assert "Traceback" not in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("preprocess:\n  input: x\n  output: y\n  num_frame: 8\n")
    res = runner.invoke(app, ["preprocess", "--config", str(bad)])
    assert res.exit_code == 2 and "preprocess.num_frame: unknown field" in res.output
    res = runner.invoke(app, ["preprocess"])
    assert res.exit_code == 2 and "--config" in res.output
    # a bare preprocess-fields file works too (documented), with flags overriding it
    bare = tmp_path / "bare.yaml"
    bare.write_text(f"input: {tmp_path / 'nope'}\noutput: {tmp_path / 'o'}\nsize: 16\n")
    res = runner.invoke(app, ["preprocess", "--config", str(bare)])
    assert res.exit_code == 2 and "no such file or folder" in res.output

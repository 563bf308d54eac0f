"""pyoco.evaluator + `pyoco evaluator train`: it learns the real clips' labels (held out), exports a
TorchScript evaluator with its JSON, and bad data gets one-line errors. Also a user's TorchScript contract."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pipelines.evaluate.evaluator import unread_labels
from pyoco import evaluator as E
from tests.fixtures_eval import EVAL_VAL_VIDEOS, make_labelled_clips_dir
from tests.fixtures_registry import TINY_FRAMES, TINY_SIZE

pytest_plugins = ("tests.fixtures_eval", "tests.fixtures_registry")


def test_unread_labels_are_those_below_halfway_from_chance():
    vocab = {
        "direction": ["down", "left", "right", "up"],
        "speed": ["fast", "slow"],
        "shape": ["a", "b", "c"],
    }
    # halfway from chance: direction 0.625, speed 0.75, shape 0.667; None (no val clip) is not flagged
    assert unread_labels({"direction": 0.35, "speed": 0.75, "shape": None}, vocab) == ["direction"]
    assert unread_labels({"direction": 0.625, "speed": 0.74, "shape": 0.9}, vocab) == ["speed"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_evaluator_learns_held_out_labels_and_exports_torchscript(trained_evaluator, labelled_clips):
    meta = trained_evaluator
    # Held out: 48 val videos never seen in training (fixed seed; measured 1.0 for colour, direction and
    # speed, shape ~chance at 16 px). Chance is 1/7, 1/4 and 1/2.
    acc = meta["heldout_accuracy"]
    assert meta["heldout_counts"]["direction"] == EVAL_VAL_VIDEOS
    assert acc["color"] >= 0.8 and acc["direction"] >= 0.8 and acc["speed"] >= 0.75, acc
    assert set(meta["labels"]) == {"shape", "color", "direction", "speed"}
    assert meta["labels"]["direction"] == ["down", "left", "right", "up"]
    # a label it does not read on held-out clips is named (shape, at 16 px), the others are not
    assert "direction" not in meta["unread_labels"] and "color" not in meta["unread_labels"]
    assert set(meta["unread_labels"]) == {
        n for n in meta["labels"] if n in unread_labels(acc, meta["labels"])
    }
    assert meta["input"]["num_frames"] == TINY_FRAMES and meta["input"]["height"] == TINY_SIZE
    assert "uint8 (B, T, H, W, 3)" in meta["input"]["layout"] and len(meta["train_data_hash"]) == 16
    assert meta["train_clips"] == 96 and meta["val_clips"] == EVAL_VAL_VIDEOS

    # The TorchScript file alone (plus its JSON) reproduces the held-out accuracy.
    from pyoco import clips as C

    ev = E.load_evaluator(meta["path"])
    assert ev.labels == meta["labels"]
    table = C.read_clips(str(labelled_clips), "val").sort_by("clip_id")
    frames = np.stack(
        [C.frames_array(r) for r in table.select(["frames", "num_frames", "height", "width"]).to_pylist()]
    )
    feats, probs = ev.run(frames)
    assert feats.shape == (len(frames), meta["outputs"]["feature_dim"])
    target = [meta["labels"]["direction"].index(lab["direction"]) for lab in C.labels_of(table)]
    assert np.mean(probs["direction"].argmax(1) == np.array(target)) == pytest.approx(acc["direction"])
    np.testing.assert_allclose(probs["color"].sum(1), 1.0, rtol=1e-9)

    # Both documented input layouts give the same outputs; another size is resized inside the module.
    module = torch.jit.load(meta["path"])
    u8 = torch.from_numpy(frames[:4].copy())
    fl = u8.permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0
    torch.testing.assert_close(module(u8)["features"], module(fl)["features"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.features(u8), module(u8)["features"])
    big = torch.nn.functional.interpolate(fl, size=[TINY_FRAMES, 32, 32], mode="trilinear")
    assert module(big)["logits_color"].shape == (4, 7)


def test_evaluator_train_cli_errors_are_one_line(tmp_path, labelled_clips):
    from pipelines.cli import app

    runner = CliRunner()
    unlabelled = make_labelled_clips_dir(tmp_path / "nolabels", train=4, val=2, labels=False)
    res = runner.invoke(app, ["evaluator", "train", "--data", str(unlabelled), "--out", str(tmp_path / "e1")])
    assert res.exit_code == 2, res.output
    assert "no training clip has labels" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(
        app,
        [
            "evaluator",
            "train",
            "--data",
            str(labelled_clips),
            "--out",
            str(tmp_path / "e2"),
            "--labels",
            "colour",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "unknown label 'colour'" in res.stderr and "color" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(
        app, ["evaluator", "train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "e3")]
    )
    assert res.exit_code == 2 and "clips/train" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "e2").exists()


def test_default_labels_are_the_categorical_ones():
    labs = [
        {"key": f"{i:08d}", "color": "red" if i % 2 else "blue", "radius_px": 1.5 + i, "speed": "slow"}
        for i in range(12)
    ]
    assert E.categorical_labels(labs) == ["color"]  # unique keys, floats and constants are left out
    y = E.encode_labels([{"color": "red"}, {}, {"color": "green"}], ["color"], {"color": ["blue", "red"]})
    assert y[:, 0].tolist() == [1, -1, -1]


_USER_SRC = '''
import torch


class StyleGanVLike(torch.nn.Module):
    """Mimics the StyleGAN-V I3D export's signature; features only when return_features is set."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 6)

    def forward(self, x, rescale: bool = False, resize: bool = False, return_features: bool = False):
        if not return_features:
            return torch.zeros(x.shape[0], 400)
        pooled = x.mean(dim=(2, 3, 4))
        return torch.cat([pooled, x.std(dim=(2, 3, 4))], dim=1)


class Plain(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(3, 4))  # (N, 3, T): flattened to (N, 3T)


torch.jit.script(StyleGanVLike()).save(OUT + "/stylegan_v_like.pt")
torch.jit.script(Plain()).save(OUT + "/plain.pt")
'''


@pytest.fixture(scope="module")
def user_networks(tmp_path_factory):
    import runpy

    d = tmp_path_factory.mktemp("user_nets")
    src = d / "make.py"
    src.write_text(f"OUT = {str(d)!r}\n" + _USER_SRC)  # TorchScript needs the source in a real file
    runpy.run_path(str(src), run_name="pyoco_test_user_nets")
    return d


def test_a_users_torchscript_network_gives_features_only(user_networks):
    from pyoco import metrics

    rng = np.random.default_rng(0)
    videos = rng.integers(0, 256, size=(5, 4, 8, 8, 3), dtype=np.uint8)
    x = torch.from_numpy(videos).permute(0, 4, 1, 2, 3).float() / 127.5 - 1.0

    sg = E.load_evaluator(user_networks / "stylegan_v_like.pt", batch_size=2)
    feats, probs = sg.run(videos)
    assert feats.shape == (5, 6) and probs == {}  # features, not the 400 logits: return_features=True
    torch.testing.assert_close(torch.from_numpy(feats[:, :3]), x.mean(dim=(2, 3, 4)).double())

    plain = E.load_evaluator(user_networks / "plain.pt")
    assert plain.labels == {} and plain(videos).shape == (5, 12)
    assert metrics.frechet_distance_features(plain(videos), plain(videos)) == pytest.approx(0.0, abs=1e-8)

    # A JSON next to it can ask us to resize to the network's input size.
    (user_networks / "plain.pt.json").write_text(
        json.dumps({"input": {"num_frames": 2, "height": 4, "width": 4, "resize": True}})
    )
    assert E.load_evaluator(user_networks / "plain.pt")(videos).shape == (5, 6)


def test_evaluator_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="evaluator not found"):
        E.load_evaluator(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a TorchScript module"):
        E.load_evaluator(bad)


def test_the_workflows_evaluator_step_trains_on_the_preprocessed_clips(tmp_path, labelled_clips):
    """The workflow's ``evaluator`` step for real (the stub-step runner tests in test_workflow.py replace
    it): it trains on ``preprocess.output`` into ``{output}/evaluator`` and returns the .pt path evaluate and
    promote then use, its held-out accuracy and a stamp of the folder (in their cache keys)."""
    from pipelines.context import RunContext
    from pipelines.workflow import steps
    from pyoco.config import parse_config

    cfg = parse_config({
        "name": "ev", "output": str(tmp_path / "out"), "preprocess": {"input": str(tmp_path), "output": str(labelled_clips)},
        "evaluator": {"labels": ["color", "direction"], "steps": 5, "size": TINY_SIZE},
    })  # fmt: skip
    res = steps._step_evaluator(cfg, {}, RunContext.from_config(cfg), key="k")
    assert res["path"].endswith(".pt") and res["path"].startswith(str(tmp_path / "out" / "evaluator"))
    assert set(res["heldout_accuracy"]) == {"color", "direction"} and len(res["stamp"]) >= 8
    assert E.load_evaluator(res["path"]).labels["direction"] == ["down", "left", "right", "up"]
    assert steps._evaluator_path(cfg, {"evaluator": res}) == res["path"]
    pinned = cfg.model_copy(update={"evaluate": cfg.evaluate.model_copy(update={"evaluator": "mine.pt"})})
    assert steps._evaluator_path(pinned, {"evaluator": res}) == "mine.pt"

"""The workflow runner (pipelines/workflow/runner.py + state.py) in-process, with stub step functions.

Each step keeps its real ``enabled`` and ``key_inputs`` (from ``pipelines.workflow.steps.STEPS``); only its
``run`` is replaced by a function that records the call and returns outputs shaped like the real step's. So
the caching, the resume after a failure, ``--from``/``--only``, the downstream re-runs of a changed key, the
one RunContext handed to every step and the MLflow mirror are checked in seconds, without Ray or training.

The real steps run end to end in ``test_workflow_cluster.py`` (the one real workflow on the 2-node
cluster) and, on an embedded Ray with an SD-shaped model, in ``test_sd_workflow.py``; ``test_console.py``
drives the CLI on these stubs with a real Ray for the console. The step wrappers that workflow does not enable are run for real by ``test_noisefit.py``
(``noise_fit``) and ``test_evaluator.py`` (``evaluator``); the training run name derived from the step's key
(a changed config trains from step 0, a re-run resumes) is checked by ``test_train_ray.py``.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import shutil
from pathlib import Path

import pytest
import yaml

from pipelines.common import PyocoError
from pipelines.workflow import runner, steps
from pyoco.config import parse_config

TINY = {
    "name": "wf-test",
    "synth": {"videos": 4, "shards": 2, "frames": 6, "size": 16, "fps": 4},
    "preprocess": {"num_frames": 4, "size": 16, "max_clips_per_video": 1},
    "model": {"tiny": {"sample_size": 16, "block_out_channels": [16, 32]}, "train_layers": "all"},
    "noise": {"kind": "progressive", "alpha": 1.0},
    "train": {"num_workers": 1, "max_steps": 2, "checkpoint_every": 2, "ema_decay": None},
    "evaluate": {"num_clips": 2, "timesteps": [100, 900], "sample_steps": 1},
    "mlflow": {"experiment": "wf-test", "registered_model": "wf-test"},
    "sample": {"num_frames": 4, "steps": 1},
}
ALL = ["synth", "preprocess", "train", "evaluate", "register", "promote", "sample"]


def _cfg(tmp_path, **changes):
    data = json.loads(json.dumps(TINY))
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    out = tmp_path / "out"
    data["output"] = str(out)
    data["synth"]["out"] = str(out / "raw")
    data["preprocess"]["input"] = str(out / "raw")
    data["preprocess"]["output"] = str(out / "data")
    return parse_config(data)


# run_evaluate's metrics, in the fields the console summary reads (figures of a demo champion).
EVAL_METRICS = {
    "fvd": {"status": "computed", "value": 162.14, "ci_low": 142.68, "ci_high": 241.81, "num_generated": 64,
            "num_real": 26, "real_halves": 151.59},
    "prompt_accuracy": {
        "color": {"value": 0.90625, "ci_low": 0.810, "ci_high": 0.956, "chance": 1 / 7, "videos": 64,
                  "evaluator_accuracy_on_real": 1.0},
        "direction": {"value": 0.15625, "ci_low": 0.087, "ci_high": 0.264, "chance": 0.25, "videos": 64,
                      "evaluator_accuracy_on_real": 1.0},
    },
    "inception_score": {
        "color": {"value": 3.97, "ci_low": 3.27, "ci_high": 4.38, "max": 7},
        "direction": {"value": 1.81, "ci_low": 1.62, "ci_high": 1.95, "max": 4},
    },
    "motion": {"motion_gap": 0.0258, "motion_gap_ci_low": 0.0223, "motion_gap_ci_high": 0.0293,
               "motion_mean_generated": 0.0430, "motion_mean_real": 0.0159},
    "val_loss": 0.11,
    "val_loss_per_timestep": {"100": 0.2, "900": 0.1},
}  # fmt: skip


def _fake_outputs(name: str, cfg, outs: dict, key: str) -> dict:
    """What each real step returns, in the fields that later steps' keys and inputs read."""
    return {
        "synth": lambda: {"summary": {"videos": cfg.synth.videos}},
        "preprocess": lambda: {"output": cfg.preprocess.output, "manifest_hash": "manifest-1"},
        "evaluator": lambda: {"path": f"{cfg.output}/evaluator/evaluator.pt", "stamp": f"ev-{key}"},
        "pretrain": lambda: {"model_dir": f"{cfg.output}/pretrain/model", "stamp": f"pre-{key}"},
        "noise_fit": lambda: {"kind": "mixed" if cfg.noise.kind == "auto" else cfg.noise.kind, "alpha": 0.25},
        "train": lambda: {"model_dir": f"{cfg.output}/train/{key}", "stamp": f"train-{key}"},
        "evaluate": lambda: {"metrics": EVAL_METRICS, "metrics_hash": f"metrics-{key}"},
        "register": lambda: {"version": str(next(VERSIONS))},  # the registry numbers versions 1, 2, ...
        "promote": lambda: {"champion_version": outs["register"]["version"]},
        "sample": lambda: {"mp4": f"{cfg.output}/sample.mp4"},
    }[name]()


CALLS: list[tuple[str, str, object, dict]] = []  # (step, key, ctx, outs it was given) per stub call
VERSIONS = itertools.count(1)


@pytest.fixture()
def stub_steps(monkeypatch):
    """Replace every step's run with a recorder; ``fail[name] = message`` makes that step raise."""
    global VERSIONS
    CALLS.clear()
    VERSIONS = itertools.count(1)
    fail: dict[str, str] = {}

    def make(step):
        def run(cfg, outs, ctx, *, key):
            CALLS.append((step.name, key, ctx, json.loads(json.dumps(outs))))
            if step.name in fail:
                raise PyocoError(fail[step.name])
            return _fake_outputs(step.name, cfg, outs, key)

        return dataclasses.replace(step, run=run)

    monkeypatch.setattr(runner, "STEPS", [make(s) for s in steps.STEPS])
    yield fail
    CALLS.clear()


def _ran() -> list[str]:
    names = [c[0] for c in CALLS]
    CALLS.clear()
    return names


def _state(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "workflow" / "state.json").read_text())["steps"]


def test_a_failed_step_resumes_there_and_an_unchanged_rerun_skips_everything(tmp_path, stub_steps, capsys):
    cfg = _cfg(tmp_path)
    stub_steps["train"] = "model.tiny.cross_attention_dim 128 != caption_embedding dim 384"
    with pytest.raises(PyocoError) as err:
        runner.run_workflow(cfg, use_mlflow=False)
    assert err.value.exit_code == 1
    assert str(err.value).startswith(
        "step train failed: model.tiny.cross_attention_dim 128 != caption_embedding dim 384 (fix it"
    )
    assert _ran() == ["synth", "preprocess", "train"]
    st = _state(tmp_path)
    assert st["preprocess"]["status"] == "done" and st["train"]["status"] == "failed"
    assert st["train"]["error"].startswith("model.tiny.cross_attention_dim 128")

    # Fixed: synth and preprocess are skipped by their keys, train onwards runs, with preprocess's outputs.
    del stub_steps["train"]
    capsys.readouterr()
    summary = runner.run_workflow(cfg, use_mlflow=False)
    log = capsys.readouterr().err
    assert "synth: unchanged" in log and "preprocess: unchanged" in log
    train_call = next(c for c in CALLS if c[0] == "train")
    assert (
        train_call[3]["preprocess"]["manifest_hash"] == "manifest-1"
    )  # skipped steps' outputs are passed on
    assert _ran() == ["train", "evaluate", "register", "promote", "sample"]
    assert [s for s, v in summary.items() if v["status"] == "skipped"] == ["synth", "preprocess"]
    st = _state(tmp_path)
    assert all(st[s]["status"] == "done" for s in ALL)
    assert st["promote"]["outputs"]["champion_version"] == st["register"]["outputs"]["version"] == "1"

    # Re-run: every step unchanged and skipped; the state is the same.
    capsys.readouterr()
    summary = runner.run_workflow(cfg, use_mlflow=False)
    log = capsys.readouterr().err
    assert _ran() == [] and all(v["status"] == "skipped" for v in summary.values())
    for step in ALL:
        assert f"{step}: unchanged" in log, step
    assert {s: v["key"] for s, v in _state(tmp_path).items()} == {s: v["key"] for s, v in st.items()}


def test_a_changed_section_reruns_its_step_and_every_later_one(tmp_path, stub_steps):
    runner.run_workflow(_cfg(tmp_path), use_mlflow=False)
    first = {c[0]: c[1] for c in CALLS}
    assert _ran() == ALL

    # noise.alpha is in train's key: train gets a new key (so a new Ray Train run name), and all after it run.
    runner.run_workflow(_cfg(tmp_path, **{"noise.alpha": 2.0}), use_mlflow=False)
    second = {c[0]: c[1] for c in CALLS}
    assert _ran() == ["train", "evaluate", "register", "promote", "sample"]
    assert second["train"] != first["train"]
    assert _state(tmp_path)["register"]["outputs"]["version"] == "2"

    # evaluate's own section: train is kept, evaluate onwards runs.
    runner.run_workflow(_cfg(tmp_path, **{"noise.alpha": 2.0, "evaluate.num_clips": 3}), use_mlflow=False)
    assert _ran() == ["evaluate", "register", "promote", "sample"]

    # the synth section changes synth's summary, which is in preprocess's key: everything runs.
    runner.run_workflow(_cfg(tmp_path, **{"noise.alpha": 2.0, "evaluate.num_clips": 3, "synth.videos": 6}),
                        use_mlflow=False)  # fmt: skip
    assert _ran() == ALL


def test_from_and_only_force_their_steps_and_refuse_what_they_cannot_do(tmp_path, stub_steps):
    cfg = _cfg(tmp_path)
    with pytest.raises(PyocoError, match="step synth has no up-to-date outputs to reuse; run without --only"):
        runner.run_workflow(cfg, only="register", use_mlflow=False)  # nothing before it has run yet
    assert _ran() == []
    runner.run_workflow(cfg, use_mlflow=False)
    keys = {c[0]: c[1] for c in CALLS}
    _ran()

    summary = runner.run_workflow(cfg, from_step="evaluate", use_mlflow=False)
    assert _ran() == ["evaluate", "register", "promote", "sample"]
    assert [s for s, v in summary.items() if v["status"] == "ran"] == [
        "evaluate",
        "register",
        "promote",
        "sample",
    ]

    summary = runner.run_workflow(cfg, only="train", use_mlflow=False)
    assert [(c[0], c[1]) for c in CALLS] == [("train", keys["train"])]  # same key: forced, not changed
    assert _ran() == ["train"] and summary["sample"]["status"] == "skipped"

    for flag, kwargs in (("--from", {"from_step": "deploy"}), ("--only", {"only": "deploy"})):
        with pytest.raises(PyocoError, match=rf"{flag} 'deploy': unknown step; steps are synth, preprocess"):
            runner.run_workflow(cfg, use_mlflow=False, **kwargs)
    with pytest.raises(PyocoError, match=r"--only noise_fit: that step is not enabled by this config"):
        runner.run_workflow(cfg, only="noise_fit", use_mlflow=False)
    assert _ran() == []


def test_cli_unknown_step_and_both_flags_are_one_line_errors(tmp_path, stub_steps):
    from typer.testing import CliRunner

    from pipelines.cli import app

    path = tmp_path / "wf.yaml"
    cfg = _cfg(tmp_path)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    for extra, message in (
        (["--only", "deploy"], "unknown step"),
        (["--only", "train", "--from", "train"], "not both"),
    ):
        res = CliRunner().invoke(app, ["run", "--config", str(path), *extra])
        assert res.exit_code == 2 and message in res.output and "Traceback" not in res.output, res.output
    assert _ran() == []


def test_every_step_gets_the_yaml_mlflow_server_and_mlflow_mirrors_the_workflow(
    tmp_path, stub_steps, monkeypatch, mlflow_server
):
    """Issue 12 item 1: the tracking URI is set in the YAML only, and $MLFLOW_TRACKING_URI names another
    store, which stays untouched (as do the local defaults). Every step gets the one RunContext, on the YAML's
    `mlflow server`; there MLflow holds one parent run per ``pyoco run`` with a nested run per step (its key
    as a param, its outputs as an artifact), skipped steps tagged as such."""
    import mlflow

    name = f"wf-mirror-{tmp_path.name[-12:]}".replace("_", "-")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'env.db'}")
    monkeypatch.chdir(tmp_path)
    cfg = _cfg(
        tmp_path, mlflow={"tracking_uri": mlflow_server.uri, "experiment": name, "registered_model": name}
    )
    runner.run_workflow(cfg)
    contexts = {id(c[2]) for c in CALLS}
    ctx = CALLS[0][2]
    assert len(contexts) == 1 and (ctx.tracking_uri, ctx.experiment, ctx.registered_model) == (
        mlflow_server.uri,
        name,
        name,
    )
    assert _ran() == ALL
    runner.run_workflow(cfg, from_step="sample")
    assert _ran() == ["sample"]
    assert not any((tmp_path / p).exists() for p in ("env.db", "mlflow.db", "mlruns"))

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.uri)
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id], max_results=200)
    parents = {r.info.run_id for r in runs if r.data.tags.get("pyoco.workflow") == "wf-test"}
    assert len(parents) == 2
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") in parents]
    status = sorted((r.data.tags["pyoco.step"], r.data.tags["pyoco.step.status"]) for r in children)
    assert status == sorted(
        [(s, "ran") for s in ALL] + [(s, "skipped") for s in ALL[:-1]] + [("sample", "ran")]
    )
    assert all(r.data.params["cache_key"] for r in children)
    register = next(r for r in children if r.data.tags["pyoco.step"] == "register")
    outputs = json.loads(
        Path(client.download_artifacts(register.info.run_id, "outputs.json", str(tmp_path))).read_text()
    )
    assert outputs == {"version": "1"}


def test_auto_noise_and_an_evaluator_section_add_their_steps_in_order_and_cache_them(tmp_path, stub_steps):
    """``noise: auto`` adds noise_fit (after pretrain, whose image model it fits with), an ``evaluator:``
    section adds evaluator (after preprocess); train sees the fit, evaluate and promote the evaluator."""
    pretrain = {"num_workers": 1, "max_steps": 2, "checkpoint_every": 2, "ema_decay": None}
    changes = {
        "noise": {"kind": "auto", "alpha": "auto", "fit_clips": 2, "fit_steps": 2},
        "pretrain": pretrain,
        "evaluator": {"labels": ["color", "direction"], "steps": 5, "size": 16},
    }
    cfg = _cfg(tmp_path, **changes)
    runner.run_workflow(cfg, use_mlflow=False)
    outs_at = {c[0]: c[3] for c in CALLS}
    assert _ran() == ["synth", "preprocess", "evaluator", "pretrain", "noise_fit", *ALL[2:]]
    assert outs_at["noise_fit"]["pretrain"]["model_dir"].endswith("/pretrain/model")
    fitted = steps._fitted_noise(cfg, outs_at["train"])
    assert (fitted.noise.kind, fitted.noise.alpha) == ("mixed", 0.25) and cfg.noise.is_auto
    assert steps._evaluator_path(cfg, outs_at["evaluate"]).endswith("/evaluator/evaluator.pt")
    assert steps._evaluator_path(cfg, outs_at["promote"]) == steps._evaluator_path(cfg, outs_at["evaluate"])

    runner.run_workflow(cfg, use_mlflow=False)
    assert _ran() == []  # evaluator and noise_fit are cached like every other step

    # A new evaluator: evaluator reruns (its stamp is in evaluate's and promote's keys); pretrain does not.
    changes["evaluator"]["steps"] = 6
    runner.run_workflow(_cfg(tmp_path, **changes), use_mlflow=False)
    assert _ran() == ["evaluator", "pretrain", "noise_fit", *ALL[2:]]  # a step that runs dirties the rest


def test_fixed_kind_with_auto_alpha_and_a_pretrained_model_skip_pretrain(tmp_path, stub_steps):
    # a real image-model folder: the preprocess key reads the model's text encoder and VAE from its configs
    shutil.copytree(Path(steps.__file__).parents[1] / "assets" / "tiny-image-16px", tmp_path / "image")
    cfg = _cfg(tmp_path, **{"noise.alpha": "auto", "model.pretrained": str(tmp_path / "image")})
    assert [s.name for s in steps.STEPS if s.enabled(cfg)] == ["synth", "preprocess", "noise_fit", *ALL[2:]]
    runner.run_workflow(cfg, use_mlflow=False)
    outs_at = {c[0]: c[3] for c in CALLS}
    assert _ran() == ["synth", "preprocess", "noise_fit", *ALL[2:]]
    fitted = steps._fitted_noise(cfg, outs_at["train"])
    assert fitted.noise.alpha == 0.25 and steps._image_model(cfg, outs_at["noise_fit"]) == str(
        tmp_path / "image"
    )


def test_a_stale_step_under_only_says_which_of_its_inputs_changed(tmp_path, stub_steps):
    cfg = _cfg(tmp_path)
    with pytest.raises(PyocoError, match=r"step synth has no up-to-date .* first \(it has never run here\)$"):
        runner.run_workflow(cfg, only="train", use_mlflow=False)
    runner.run_workflow(cfg, use_mlflow=False)
    _ran()
    # train's learning rate changed: --only evaluate cannot reuse train's model, and says why.
    with pytest.raises(PyocoError, match=r"step train has no .* \(the train section changed since it ran\)$"):
        runner.run_workflow(_cfg(tmp_path, **{"train.lr": 5e-4}), only="evaluate", use_mlflow=False)
    # A run whose train failed: the recorded train is not reusable, whatever its key.
    stub_steps["train"] = "boom"
    with pytest.raises(PyocoError, match="step train failed: boom"):
        runner.run_workflow(_cfg(tmp_path, **{"noise.alpha": 3.0}), use_mlflow=False)
    del stub_steps["train"]
    with pytest.raises(PyocoError, match=r"step train has no .* \(its last run failed\)$"):
        runner.run_workflow(cfg, only="evaluate", use_mlflow=False)
    assert _ran() == ["train"]


def test_every_step_names_each_input_of_its_key(tmp_path):
    """The stale-step error names inputs by position: each step's key_names must match its key's parts."""
    cfg = runner._resolved(
        _cfg(tmp_path, **{"noise.kind": "auto", "noise.alpha": "auto", "evaluator": {}, "pretrain": {}})
    )
    outs = {name: {"summary": {}, "version": "1", "stamp": "s"} for name in steps.STEP_ORDER}
    ctx = runner.RunContext.from_config(cfg)
    enabled = [s for s in steps.STEPS if s.enabled(cfg)]
    assert [s.name for s in enabled] == steps.STEP_ORDER
    for step in enabled:
        inputs = step.key_inputs(cfg, outs, ctx)
        assert len(step.key_names) == (len(inputs) if isinstance(inputs, list) else 1), step.name


def test_evaluate_prints_its_sample_metrics_with_cis_when_it_runs_and_when_it_is_reused(
    tmp_path, stub_steps, capsys
):
    expected = [
        "evaluate: FVD 162.140 [95% CI 142.680, 241.810] over 64 generated vs 26 val clips; real-vs-real "
        "halves 151.590",
        "evaluate: prompt accuracy color: 0.906 [0.810, 0.956] (chance 0.143; evaluator on real val 1.000); "
        "class score 3.97 [3.27, 4.38] of 7",
        "evaluate: prompt accuracy direction: 0.156 [0.087, 0.264] (chance 0.250; evaluator on real val "
        "1.000); class score 1.81 [1.62, 1.95] of 4",
        "evaluate: motion gap 0.0258 [0.0223, 0.0293] (mean |Δframe| generated 0.0430, real 0.0159)",
        "evaluate: val_loss 0.110000 under the model's own prior (t=100: 0.20000, t=900: 0.10000)",
    ]
    cfg = _cfg(tmp_path)
    for attempt in ("ran", "reused"):
        capsys.readouterr()
        runner.run_workflow(cfg, use_mlflow=False)
        lines = [line.strip() for line in capsys.readouterr().err.splitlines()]
        assert [line for line in lines if line.startswith("evaluate:")] == expected, attempt
    assert "- evaluate: unchanged" in "\n".join(lines)  # the second run reused evaluate's outputs

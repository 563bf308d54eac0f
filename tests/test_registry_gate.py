"""The promotion gate of issue 10 against the real `mlflow server` fixture: versions are tagged with their
eval-data hash; promote refuses to compare metrics from different eval data unless --reevaluate evaluates
the champion on the challenger's data; the default gate is fvd with an evaluator (val_loss, said so,
without one); a challenger must win by more than max(min_improvement, its CI half-width)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from pipelines.evaluate.step import run_evaluate
from pipelines.registry.client import _client
from pipelines.registry.promote import (
    _gate,
    ci_half_width,
    default_gate,
    history,
    promote,
    reevaluated_metrics,
)
from pipelines.registry.register import register_model
from pipelines.registry.transaction import read_state
from pyoco.config import EvaluateConfig
from tests.fixtures_registry import make_clips_dir

pytest_plugins = ("tests.fixtures_registry",)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cli(*args, code: int = 0):
    from pipelines.cli import app

    res = CliRunner().invoke(app, [str(a) for a in args])
    assert res.exit_code == code, f"{args}: exit {res.exit_code}\nstdout: {res.stdout}\nstderr: {res.stderr}"
    return res


def _register(name: str, package, metrics: dict, eval_hash: str | None, data=None) -> str:
    payload = {"metrics": metrics, "eval_data_hash": eval_hash}
    if data is not None:
        payload["data"] = str(data)
    return register_model(name, checkpoint=str(package), metrics=payload)["version"]


def test_gate_refuses_metrics_from_different_eval_data(tracking_env, tiny_package, model_name):
    name, client = model_name, _client()
    assert _register(name, tiny_package, {"fvd": 10.0}, "evaldata-a") == "1"
    assert promote(name, evaluator="evaluator.pt")["reason"] == "no champion yet"
    assert _register(name, tiny_package, {"fvd": 5.0}, "evaldata-b") == "2"
    assert client.get_model_version(name, "2").tags["pyoco.eval_data_hash"] == "evaldata-b"

    res = _cli("promote", "--name", name, "--evaluator", "evaluator.pt", code=1)
    assert res.stdout.startswith("gate: fvd (min)")
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err  # one-line reason
    for needle in (
        "refused",
        "metrics not comparable",
        "v2",
        "evaldata-b",
        "v1",
        "evaldata-a",
        "--reevaluate",
    ):
        assert needle in err[0], err[0]
    assert read_state(client, name).champion == "1"
    assert history(name)[-1]["action"] == "refuse"

    # the same eval data: compared (and fvd 5 beats 10)
    assert _register(name, tiny_package, {"fvd": 5.0}, "evaldata-a") == "3"
    p = promote(name, evaluator="evaluator.pt")
    assert p["promoted"] and p["metric"] == "fvd" and p["champion_version"] == "3"


def test_reevaluate_scores_the_champion_on_the_challengers_eval_data(
    tracking_env, tiny_package, model_name, tmp_path
):
    name, client = model_name, _client()
    data_a = make_clips_dir(tmp_path / "a", num_clips=4, seed=0, eval_data_hash="hash-a")
    data_b = make_clips_dir(tmp_path / "b", num_clips=4, seed=1, eval_data_hash="hash-b")
    cfg = EvaluateConfig(num_clips=4, timesteps=[100, 900], sample_steps=1, num_videos=2)
    ev_a = run_evaluate(str(tiny_package), str(data_a), cfg, log_to_mlflow=False)
    ev_b = run_evaluate(str(tiny_package), str(data_b), cfg, log_to_mlflow=False)
    assert (ev_a["eval_data_hash"], ev_b["eval_data_hash"]) == ("hash-a", "hash-b")
    assert ev_a["val_loss"] != ev_b["val_loss"]

    v1 = register_model(name, checkpoint=str(tiny_package), metrics=ev_a)["version"]
    promote(name)
    v2 = register_model(name, checkpoint=str(tiny_package), metrics=ev_b)["version"]
    tags = client.get_model_version(name, v2).tags
    assert tags["pyoco.eval_data_hash"] == "hash-b" and tags["pyoco.eval_data"] == str(data_b.resolve())

    # no evaluator configured: the gate is val_loss, and the CLI says why; different eval data: refused
    res = _cli("promote", "--name", name, code=1)
    assert "gate: val_loss, because no evaluator is configured" in res.stdout
    assert "metrics not comparable" in res.stderr and "hash-a" in res.stderr and "hash-b" in res.stderr

    # --reevaluate: v1 (the same package) evaluated on data b with v2's settings scores what v2 scored, so
    # the gate compares like with like and finds no improvement
    p = promote(name, reevaluate=True, refuse_raises=False)
    assert not p["promoted"] and "champion re-evaluated on the challenger's eval data hash-b" in p["reason"]
    assert p["champion_value"] == pytest.approx(ev_b["val_loss"], rel=1e-6)
    assert p["challenger_value"] == pytest.approx(ev_b["val_loss"], rel=1e-12)
    stored = reevaluated_metrics(client.get_model_version(name, v1), "hash-b")
    assert stored["val_loss"] == pytest.approx(ev_b["val_loss"], rel=1e-6)
    assert float(client.get_model_version(name, v1).tags["pyoco.metric.val_loss"]) == pytest.approx(
        ev_a["val_loss"]
    )  # the champion's own metrics are untouched

    # a better challenger on data b is compared against the stored re-evaluation (no new evaluation)
    better = {**ev_b, "metrics": {**ev_b["metrics"], "val_loss": ev_b["val_loss"] - 0.5}}
    register_model(name, checkpoint=str(tiny_package), metrics=better)
    p = promote(name)
    assert p["promoted"] and p["champion_value"] == pytest.approx(ev_b["val_loss"], rel=1e-6)


def test_challenger_must_beat_the_ci_half_width(tracking_env, tiny_package, model_name):
    name = model_name
    _register(name, tiny_package, {"fvd": 10.0}, "h")
    promote(name, evaluator="e.pt")
    # improvement 1 < CI half-width (10 - 6) / 2 = 2: refused, and the reason names the margin
    _register(name, tiny_package, {"fvd": 9.0, "fvd_ci_low": 6.0, "fvd_ci_high": 10.0}, "h")
    p = promote(name, evaluator="e.pt", refuse_raises=False)
    assert not p["promoted"] and p["challenger_ci_half_width"] == pytest.approx(2.0)
    assert "required 2 = max(min_improvement 0, CI half-width 2)" in p["reason"]
    # a narrow CI (half-width 0.2): min_improvement 0.5 is the larger margin, and 1 > 0.5 passes
    _register(name, tiny_package, {"fvd": 9.0, "fvd_ci_low": 8.8, "fvd_ci_high": 9.2}, "h")
    p = promote(name, evaluator="e.pt", min_improvement=0.5)
    assert (
        p["promoted"] and "improvement 1 > 0.5 = max(min_improvement 0.5, CI half-width 0.2)" in p["reason"]
    )


def test_gate_margin_and_default_metric():
    ok, reason = _gate(
        9.0, 10.0, metric="fvd", mode="min", min_improvement=0.0, challenger_version="2",
        champion_version="1", ci_half=1.0,
    )  # fmt: skip
    assert not ok and "improvement 1 <= required 1" in reason  # strictly greater than the margin
    ok, _ = _gate(
        0.8, 0.5, metric="acc", mode="max", min_improvement=0.2, challenger_version="2",
        champion_version="1", ci_half=0.05,
    )  # fmt: skip
    assert ok
    assert ci_half_width({"fvd_ci_low": 3.0, "fvd_ci_high": 7.0}, "fvd") == 2.0
    assert ci_half_width({"fvd_ci_low": 3.0}, "fvd") is None
    assert default_gate("evaluator.pt")[:2] == ("fvd", "min")
    metric, mode, note = default_gate(None)
    assert (metric, mode) == ("val_loss", "min") and "own prior" in note

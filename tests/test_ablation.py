"""bench/ablation.py (issue 11): the noise-prior ablation runs end to end in ``--quick`` mode, and its
report is internally consistent.

``--quick``: iid and mixed(1), one seed, 48 synth videos through the real preprocess (Ray Data) and the
real evaluator training, 3 finetune steps, 8 prompts, 3 DDIM steps, each arm a Ray task. The numbers of a
3-step model mean nothing; the checks are on structure and on the arithmetic that ties the tables together
(paired differences equal the cells' difference, CIs bracket the accuracy means, MDE = z x SE, the gate
follows its threshold).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ACCURACY = ("acc_direction", "acc_color")
METRICS = (*ACCURACY, "fvd", "motion_gap")


def test_matched_rho_arm_and_comparisons():
    from bench.ablation import IID, design_comparisons, make_arms

    arms = make_arms(1.0)
    assert [a.kind for a in arms] == ["iid", "mixed", "progressive", "progressive"]
    mixed, prog, matched = arms[1], arms[2], arms[3]
    # mixed(1): rho = a^2 / (1 + a^2) = 0.5; progressive at that rho: a = rho / sqrt(1 - rho^2) = 0.5774
    assert math.isclose(mixed.rho, 0.5)
    assert math.isclose(matched.alpha, 0.5 / math.sqrt(0.75), rel_tol=1e-12)
    assert math.isclose(matched.rho, mixed.rho, rel_tol=1e-12)
    assert math.isclose(prog.alpha, mixed.alpha)
    comps = design_comparisons(arms)
    effects = [c["effect"] for c in comps]
    # 4 per non-iid arm (total, training, sampling, step-0 sampling) + equal alpha + matched rho
    assert len(comps) == 4 * 3 + 2
    assert effects.count("equal alpha") == 1 and effects.count("matched rho") == 1
    assert all(c["b"] == f"{IID.name} | sampled {IID.name}" for c in comps if c["effect"] == "training")


@pytest.fixture(scope="module")
def quick_report(tmp_path_factory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("ablation")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ablation.py"), "--out", str(out), "--quick"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Learnability gate" in proc.stdout and "reproduce: " in proc.stdout
    return json.loads((out / "ablation.json").read_text()), out


def test_quick_runs_end_to_end(quick_report):
    report, out = quick_report
    assert report["settings"]["quick"] and report["settings"]["seeds"] == 1
    assert [a["name"] for a in report["settings"]["arms"]] == ["iid", "mixed(1)"]
    # one task per arm x seed, plus the step-0 model's
    assert sorted(t["arm"] for t in report["tasks"]) == ["iid", "mixed(1)", "step0"]
    for t in report["tasks"]:
        assert t["num_videos"] == 8 and t["wall_s"] > 0 and t["cpu_s"] > 0
        if t["arm"] != "step0":
            assert math.isfinite(t["loss_first"]) and math.isfinite(t["loss_last"])
    # 2 x 2: every trained model under its own prior and iid; step 0 under every prior
    assert list(report["summary"]["cells"]) == [
        "iid | sampled iid",
        "mixed(1) | sampled mixed(1)",
        "mixed(1) | sampled iid",
        "step0 | sampled iid",
        "step0 | sampled mixed(1)",
    ]
    md = (out / "ablation.md").read_text()
    assert "| trained | sampled |" in md and "Learnability gate" in md
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((out / "tasks.jsonl").read_text().splitlines()) == 3
    assert report["machine"]["cpus"] >= 1 and "bench/ablation.py" in report["reproduce"]


def test_quick_statistics_are_consistent(quick_report):
    report, _ = quick_report
    cells = report["summary"]["cells"]
    for row in cells.values():
        assert row["seeds"] == [0]
        for m in METRICS:
            v = row["metrics"][m]
            assert len(v["per_seed"]) == 1 and math.isclose(v["mean"], v["per_seed"][0])
            assert v["ci_low"] <= v["ci_high"]
        for m in ACCURACY:
            v = row["metrics"][m]
            assert 0.0 <= v["ci_low"] <= v["mean"] <= v["ci_high"] <= 1.0
            assert round(v["mean"] * 8) == v["mean"] * 8  # a share of 8 prompts
        assert row["metrics"]["fvd"]["mean"] >= 0 and row["metrics"]["motion_gap"]["mean"] >= 0
    comps = report["summary"]["comparisons"]
    assert [c["effect"] for c in comps] == ["total", "training", "sampling", "step0 sampling"]
    for c in comps:
        for m in METRICS:
            d = c["metrics"][m]
            expected = cells[c["a"]]["metrics"][m]["mean"] - cells[c["b"]]["metrics"][m]["mean"]
            assert math.isclose(d["mean"], expected, abs_tol=1e-9)
            assert d["ci_low"] <= d["ci_high"] and d["se"] >= 0
            assert math.isclose(d["mde"], (1.959964 + 0.841621) * d["se"], rel_tol=1e-9)
            assert d["excludes_zero"] == (d["ci_low"] > 0 or d["ci_high"] < 0)
    gate = report["gate"]
    assert gate["threshold"] == 0.5
    assert gate["value"] == cells["iid | sampled iid"]["metrics"]["acc_direction"]["mean"]
    assert gate["informative"] == (gate["value"] >= 0.5)
    assert ("NOT informative" in gate["verdict"]) == (not gate["informative"])


def test_finetuned_arms_sample_with_the_recipes_prediction_type_and_step0_with_the_image_models():
    """A v-trained arm sampled as epsilon scored below chance on colour (every video washed out to
    'white'); the step-0 model is the shipped epsilon image model and must keep epsilon."""
    from bench.ablation import RECIPE_CONFIG, arm_scheduler_config, demo_recipe
    from pyoco.config import load_config

    recipe = demo_recipe(load_config(str(RECIPE_CONFIG)), prediction_type="v_prediction")
    image = {"prediction_type": "epsilon", "num_train_timesteps": 1000}
    assert arm_scheduler_config(image, recipe, trained=True)["prediction_type"] == "v_prediction"
    assert arm_scheduler_config(image, recipe, trained=False)["prediction_type"] == "epsilon"
    assert image["prediction_type"] == "epsilon"  # the pretrained config itself is not mutated


def test_plot_draws_a_ci_that_lies_wholly_above_its_point_estimate(tmp_path):
    """CI ran red on this: FVD's percentile-bootstrap CI over resampled videos sat above the point
    estimate, and matplotlib's errorbar refuses negative offsets."""
    from bench.ablation import IID, STEP0, plot

    def metric(mean, lo, hi):
        return {"mean": mean, "ci_low": lo, "ci_high": hi, "per_seed": [mean]}

    def row(trained, sampled, fvd):
        return {
            "trained": trained,
            "sampled": sampled,
            "metrics": {
                **{m: metric(0.5, 0.25, 0.75) for m in ACCURACY},
                "fvd": fvd,
                "motion_gap": metric(1, 0, 2),
            },
        }

    report = {
        "summary": {
            "metric_names": list(METRICS),
            "cells": {
                "a": row(IID.name, IID.name, metric(100.0, 120.0, 180.0)),  # CI above the estimate
                "b": row(STEP0, IID.name, metric(300.0, 250.0, 400.0)),
            },
        }
    }
    out = tmp_path / "ablation.png"
    plot(report, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

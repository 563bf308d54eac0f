"""evaluate's results as console lines (no heavy imports: the CLI and the workflow's step report use it)."""

from __future__ import annotations

from typing import Any


def label_unread(accuracy: float | None, chance: float) -> bool:
    """Whether an evaluator with this accuracy on real val clips does not read the label: below halfway
    from chance to 1. A prompt accuracy for such a label says nothing about the generator (a classifier
    that cannot tell left from right on real clips scores every model near chance)."""
    return accuracy is not None and accuracy < chance + 0.5 * (1.0 - chance)


def summary_lines(results: dict[str, Any]) -> list[str]:
    """Human-readable lines: FVD, prompt accuracy, class score and motion gap with CIs, then val_loss."""
    lines = []
    fvd = results["fvd"]
    if fvd["status"] == "computed":
        ref = f"; real-vs-real halves {fvd['real_halves']:.3f}" if fvd.get("real_halves") is not None else ""
        lines.append(
            f"FVD {fvd['value']:.3f} [95% CI {fvd['ci_low']:.3f}, {fvd['ci_high']:.3f}] over "
            f"{fvd['num_generated']} generated vs {fvd['num_real']} val clips{ref}"
        )
    else:
        lines.append(f"FVD: skipped ({fvd['reason']})")
    if results["prompt_accuracy"].get("status") != "skipped":
        for name, acc in results["prompt_accuracy"].items():
            if acc.get("value") is None:
                lines.append(f"prompt accuracy {name}: n/a ({acc['reason']})")
                continue
            score = results["inception_score"][name]
            unread = label_unread(acc["evaluator_accuracy_on_real"], acc["chance"])
            lines.append(
                f"prompt accuracy {name}: {acc['value']:.3f} [{acc['ci_low']:.3f}, {acc['ci_high']:.3f}] "
                f"(chance {acc['chance']:.3f}; evaluator on real val {acc['evaluator_accuracy_on_real']:.3f}); "
                f"class score {score['value']:.2f} [{score['ci_low']:.2f}, {score['ci_high']:.2f}] of {score['max']}"
                + ("; the evaluator does not read this label, so this is not a measure" if unread else "")
            )
    m = results["motion"]
    lines.append(
        f"motion gap {m['motion_gap']:.4f} [{m['motion_gap_ci_low']:.4f}, {m['motion_gap_ci_high']:.4f}] "
        f"(mean |Δframe| generated {m['motion_mean_generated']:.4f}, real {m['motion_mean_real']:.4f})"
    )
    per_t = ", ".join(f"t={t}: {v:.5f}" for t, v in results["val_loss_per_timestep"].items())
    lines.append(f"val_loss {results['val_loss']:.6f} under the model's own prior ({per_t})")
    return lines

"""Promotion: the gate (default metric, CI half-width, eval-data check, re-evaluation of the champion),
``promote``, ``rollback``, the history and ``describe``."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pipelines.common import EXIT_REFUSED, PyocoError
from pipelines.registry.client import (
    CHALLENGER,
    CHAMPION,
    DEFAULT_NAME,
    UNKNOWN,
    V_EVAL_CONFIG,
    V_EVAL_DATA,
    V_EVAL_HASH,
    V_PREVIOUS,
    V_REEVAL,
    V_STATUS,
    _client,
    _one_line,
)
from pipelines.registry.register import _metrics_from
from pipelines.registry.resolve import resolve_model_uri
from pipelines.registry.transaction import _transaction, _version, read_state, version_metrics


# -------------------------------------------------------------------------------------------- promotion
def default_gate(evaluator: str | None) -> tuple[str, str, str]:
    """``(metric, mode, note)`` of the default promotion gate: ``fvd`` when an evaluator is configured, else
    ``val_loss`` with a note saying why that is the weaker choice."""
    if evaluator:
        return "fvd", "min", "gate: fvd (min), comparable across noise priors"
    return (
        "val_loss",
        "min",
        "gate: val_loss, because no evaluator is configured (set evaluate.evaluator to gate on fvd); "
        "val_loss is computed under each model's own prior, so it is biased against correlated priors",
    )


def ci_half_width(metrics: dict[str, float], metric: str) -> float | None:
    """``(high - low) / 2`` of the 95 % CI recorded as ``<metric>_ci_low`` / ``<metric>_ci_high``; None
    when either is missing."""
    low, high = metrics.get(f"{metric}_ci_low"), metrics.get(f"{metric}_ci_high")
    if low is None or high is None:
        return None
    return abs(high - low) / 2.0


def _gate(
    challenger: float | None,
    champion: float | None,
    *,
    metric: str,
    mode: str,
    min_improvement: float,
    challenger_version: str,
    champion_version: str,
    ci_half: float | None = None,
) -> tuple[bool, str]:
    """(better, reason). Better means an improvement strictly greater than ``max(min_improvement,
    ci_half)`` (absolute units of the metric; ``ci_half`` is the challenger's CI half-width): for mode=min,
    champion - challenger > that margin."""
    if challenger is None:
        return False, f"challenger v{challenger_version} has no {metric} metric (register it with --eval)"
    if champion is None:
        return False, f"champion v{champion_version} has no {metric} metric to compare against"
    improvement = champion - challenger if mode == "min" else challenger - champion
    relation = f"{metric} {challenger:.6g} (v{challenger_version}) vs {champion:.6g} (v{champion_version})"
    margin = max(min_improvement, ci_half or 0.0)
    if ci_half is None:
        required = f"{margin:g}"
    else:
        required = f"{margin:.6g} = max(min_improvement {min_improvement:g}, CI half-width {ci_half:.6g})"
    if improvement > margin:
        return True, f"better: {relation}, improvement {improvement:.6g} > {required}"
    return (
        False,
        f"not better: {relation}, improvement {improvement:.6g} <= required {required} (mode={mode})",
    )


def _tag(mv, key: str) -> str | None:
    value = (mv.tags or {}).get(key)
    return value if value and value != UNKNOWN else None


def reevaluated_metrics(mv, eval_hash: str) -> dict[str, float]:
    """The metrics of version ``mv`` re-evaluated on eval data ``eval_hash`` (``pyoco.reeval.*`` tags)."""
    prefix = f"{V_REEVAL}{eval_hash}."
    out = {}
    for k, v in (mv.tags or {}).items():
        if k.startswith(prefix):
            try:
                out[k[len(prefix) :]] = float(v)
            except ValueError:
                continue
    return out


def _champion_on_challenger_data(cand_mv, champ_mv, metric: str) -> tuple[float | None, str | None, str]:
    """``(champion's metric value on the challenger's eval data, refusal reason, note)``."""
    h_cand, h_champ = _tag(cand_mv, V_EVAL_HASH), _tag(champ_mv, V_EVAL_HASH)
    value = version_metrics(champ_mv).get(metric)
    if h_cand == h_champ:
        note = "eval data not verified: neither version records an eval-data hash" if h_cand is None else ""
        return value, None, note
    if h_cand is not None:
        again = reevaluated_metrics(champ_mv, h_cand)
        if metric in again:
            return again[metric], None, f"champion re-evaluated on the challenger's eval data {h_cand}"
    reason = (
        f"metrics not comparable: challenger v{cand_mv.version} was evaluated on eval data "
        f"{h_cand or UNKNOWN}, champion v{champ_mv.version} on {h_champ or UNKNOWN}"
    )
    if h_cand is None:
        return None, f"{reason} (register the challenger with evaluate results that record it)", ""
    return None, f"{reason} (promote --reevaluate evaluates the champion on the challenger's data)", ""


def reevaluate_champion(
    client,
    name: str,
    candidate: str,
    champion: str,
    *,
    evaluate_cfg=None,
    tracking_uri: str | None = None,
) -> dict[str, float]:
    """Evaluate the champion's model on the eval data and settings the challenger was evaluated with, and
    record the results on the champion version as ``pyoco.reeval.<hash>.<metric>`` tags (idempotent, so
    done outside the registry lock: an evaluation takes longer than a lock lease)."""
    from pipelines.evaluate.step import run_evaluate
    from pyoco.config import EvaluateConfig

    cand_mv = _version(client, name, candidate)
    h_cand, data = _tag(cand_mv, V_EVAL_HASH), _tag(cand_mv, V_EVAL_DATA)
    if h_cand is None or data is None:
        raise PyocoError(
            f"--reevaluate: challenger v{candidate} records no eval data (tags {V_EVAL_HASH}, {V_EVAL_DATA}); "
            "register it with evaluate results"
        )
    recorded = _tag(cand_mv, V_EVAL_CONFIG)
    try:
        cfg = EvaluateConfig.model_validate(json.loads(recorded)) if recorded else evaluate_cfg
    except (json.JSONDecodeError, ValueError) as err:
        raise PyocoError(
            f"--reevaluate: v{candidate} tag {V_EVAL_CONFIG} is unreadable ({_one_line(err)})"
        ) from None
    if cfg is None:
        raise PyocoError(
            f"--reevaluate: challenger v{candidate} records no evaluate settings ({V_EVAL_CONFIG}); pass --config"
        )
    package = resolve_model_uri(f"models:/{name}/{champion}", tracking_uri=tracking_uri)
    results = run_evaluate(package, data, cfg.model_copy(update={"output": None}), log_to_mlflow=False)
    got = results.get("eval_data_hash")
    if got != h_cand:
        raise PyocoError(
            f"--reevaluate: the eval data at {data} now has hash {got}, but challenger v{candidate} was "
            f"evaluated on {h_cand}; evaluate the challenger again"
        )
    values = _metrics_from(results, None)
    for k, v in values.items():
        client.set_model_version_tag(name, champion, f"{V_REEVAL}{h_cand}.{k}", repr(v))
    return values


def promote(
    name: str = DEFAULT_NAME,
    *,
    metric: str | None = None,
    mode: str | None = None,
    min_improvement: float = 0.0,
    force: bool = False,
    version: str | int | None = None,
    refuse_raises: bool = True,
    tracking_uri: str | None = None,
    evaluator: str | None = None,
    reevaluate: bool = False,
    evaluate_cfg=None,
    _use_lock: bool = True,
    _after_read: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Move ``champion`` to the challenger (or ``version``) when it beats the champion on ``metric``.

    ``metric`` None: the default gate (:func:`default_gate`: ``fvd`` when ``evaluator`` is set, else
    ``val_loss``); ``mode`` None: ``min``. The challenger must win by more than ``max(min_improvement, its
    CI half-width)``, on the same eval data as the champion's metric; ``reevaluate`` first evaluates the
    champion on the challenger's eval data when they differ (see the module docstring).

    Returns {"promoted", "forced", "version", "champion_version", "previous_champion", "reason", "gate",
    ...}. A refused promotion is recorded in the history; it raises PyocoError(exit 1) when
    ``refuse_raises``. ``challenger`` stays where it is (on the new champion after a promotion), so a
    concurrent ``register`` moving it is never undone. ``_use_lock`` / ``_after_read`` exist for the race
    test only (run without the lock; a hook between reading the aliases and writing them).
    """
    gate_note = ""
    if metric is None:
        metric, default_mode, gate_note = default_gate(evaluator)
        mode = mode or default_mode
    mode = mode or "min"
    if mode not in ("min", "max"):
        raise PyocoError(f"--mode must be 'min' or 'max' (got {mode!r})")
    if not min_improvement >= 0:
        raise PyocoError(f"--min-improvement must be >= 0 (got {min_improvement})")
    client = _client(tracking_uri)
    if reevaluate and not force:
        # Outside the lock (an evaluation outlasts a lease); the transaction below re-reads everything and
        # only uses the re-evaluation if the champion is still the version evaluated here.
        st0 = read_state(client, name)
        cand0 = str(version) if version is not None else st0.challenger
        if cand0 is not None and st0.champion is not None and st0.champion != cand0:
            cand_mv0, champ_mv0 = _version(client, name, cand0), _version(client, name, st0.champion)
            _, refusal, _ = _champion_on_challenger_data(cand_mv0, champ_mv0, metric)
            if refusal is not None:
                reevaluate_champion(
                    client, name, cand0, st0.champion, evaluate_cfg=evaluate_cfg, tracking_uri=tracking_uri
                )
    with _transaction(client, name, use_lock=_use_lock) as txn:
        st = txn.state
        candidate = str(version) if version is not None else st.challenger
        if candidate is None:
            raise PyocoError(f"registered model {name!r} has no {CHALLENGER!r} alias; register a model first")
        mv = _version(client, name, candidate)
        cand_metrics = version_metrics(mv)
        cand_value = cand_metrics.get(metric)
        ci_half = ci_half_width(cand_metrics, metric)
        champ = st.champion
        refusal, data_note, champ_value = None, "", None
        if champ and champ != candidate:
            champ_value, refusal, data_note = _champion_on_challenger_data(
                mv, _version(client, name, champ), metric
            )
        elif champ:
            champ_value = cand_value
        if _after_read is not None:
            _after_read()
        base = {
            "version": candidate,
            "metric": metric,
            "mode": mode,
            "gate": gate_note or f"gate: {metric} ({mode})",
            "challenger_value": cand_value,
            "challenger_ci_half_width": ci_half,
            "champion_value": champ_value,
            "eval_data_hash": _tag(mv, V_EVAL_HASH),
            "previous_champion": champ,
        }
        if champ == candidate:
            return {
                **base,
                "promoted": False,
                "forced": False,
                "champion_version": champ,
                "reason": f"v{candidate} is already {CHAMPION}",
                "generation": st.generation,
            }
        gate_args = dict(
            metric=metric,
            mode=mode,
            min_improvement=min_improvement,
            challenger_version=candidate,
            champion_version=champ,
            ci_half=ci_half,
        )
        if champ is None:
            ok, reason = True, "no champion yet"
        elif force:
            why = refusal or _gate(cand_value, champ_value, **gate_args)[1]
            ok, reason = True, f"forced ({why})"
        elif refusal is not None:
            ok, reason = False, refusal
        else:
            ok, reason = _gate(cand_value, champ_value, **gate_args)
            if data_note:
                reason = f"{reason}; {data_note}"
        if not ok:
            event = txn.commit({**base, "action": "refuse", "reason": reason, "champion": champ})
            client.set_model_version_tag(
                name, candidate, V_STATUS, f"refused g{event['generation']}: {reason}"[:4900]
            )
            result = {
                **base,
                "promoted": False,
                "forced": False,
                "champion_version": champ,
                "reason": reason,
                "generation": event["generation"],
            }
            if refuse_raises:
                raise PyocoError(f"promotion of {name} v{candidate} refused: {reason}", EXIT_REFUSED)
            return result
        # Version tags first: once the alias moves, rollback must already find its way back.
        client.set_model_version_tag(name, candidate, V_PREVIOUS, champ or "")
        action = "force-promote" if force and champ is not None else "promote"
        event = txn.commit(
            {**base, "action": action, "reason": reason, "champion": candidate},
            set_aliases={CHAMPION: candidate},
        )
        client.set_model_version_tag(name, candidate, V_STATUS, f"{action} g{event['generation']}")
    return {
        **base,
        "promoted": True,
        "forced": action == "force-promote",
        "champion_version": candidate,
        "reason": reason,
        "generation": event["generation"],
    }


def rollback(name: str = DEFAULT_NAME, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Restore the champion that the current champion replaced (recorded at its promotion)."""
    client = _client(tracking_uri)
    with _transaction(client, name) as txn:
        champ = txn.state.champion
        if champ is None:
            raise PyocoError(
                f"registered model {name!r} has no {CHAMPION!r}; nothing to roll back", EXIT_REFUSED
            )
        previous = (_version(client, name, champ).tags or {}).get(V_PREVIOUS) or None
        if previous is None:
            raise PyocoError(
                f"{name} v{champ} has no previous champion recorded; nothing to roll back to", EXIT_REFUSED
            )
        try:
            _version(client, name, previous)
        except PyocoError:
            raise PyocoError(
                f"previous champion v{previous} of {name} no longer exists; cannot roll back", EXIT_REFUSED
            ) from None
        event = txn.commit(
            {
                "action": "rollback",
                "version": previous,
                "previous_champion": champ,
                "champion": previous,
                "reason": f"rollback from v{champ}",
            },
            set_aliases={CHAMPION: previous},
        )
        client.set_model_version_tag(name, champ, V_STATUS, f"rolled back g{event['generation']}")
    return {"champion_version": previous, "rolled_back": champ, "generation": event["generation"]}


def history(name: str = DEFAULT_NAME, *, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    """The registry events of ``name`` (register, promote, force-promote, refuse, rollback), oldest first."""
    return read_state(_client(tracking_uri), name).events()


def describe(name: str = DEFAULT_NAME, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """Aliases, generation and every version's metrics and status, for ``pyoco registry history``."""
    client = _client(tracking_uri)
    state = read_state(client, name)
    versions = client.search_model_versions(f"name='{name}'")
    return {
        "name": name,
        "aliases": state.aliases,
        "generation": state.generation,
        "versions": [
            {
                "version": mv.version,
                "run_id": mv.run_id,
                "metrics": version_metrics(mv),
                "status": (mv.tags or {}).get(V_STATUS, ""),
                "previous_champion": (mv.tags or {}).get(V_PREVIOUS, ""),
            }
            for mv in sorted(versions, key=lambda m: int(m.version))
        ],
    }

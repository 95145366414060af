"""Model-registry helpers for the promote stage: the gate rule, the current alias holder, tags.

The gate is a pure function (``gate``) so its rule can be read and tested without MLflow; the
rest are thin wrappers over ``mlflow.MlflowClient`` that keep registry conventions in one place:
evaluation scores live in version tags ``eval.<metric>``, lineage in ``lineage.*``, the
per-question results' artifact URI in ``evaluation.per_question``, and the promotion decision in
``promotion.*``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import metadata
from typing import Any

EVAL_TAG = "eval."
PER_QUESTION_TAG = "evaluation.per_question"


@dataclass(frozen=True)
class GateDecision:
    """Whether a candidate version takes the alias, and why (recorded verbatim as tags)."""

    promote: bool
    reason: str
    forced: bool
    metric: str
    value: float | None
    champion_version: str | None
    champion_value: float | None
    gate: str = "point"
    interval: dict[str, Any] | None = None  # the ci gate's: diff, ci95, n, against, paired, note

    def as_tags(self) -> dict[str, str]:
        return {
            "promotion.decision": "promoted" if self.promote else "refused",
            "promotion.reason": self.reason,
            "promotion.forced": str(self.forced).lower(),
            "promotion.gate": self.gate,
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def gate(
    *,
    metric: str,
    value: float | None,
    threshold: float | None,
    margin: float,
    champion_version: str | None,
    champion_value: float | None,
    force: bool = False,
    mode: str = "point",
    interval: dict[str, Any] | None = None,
) -> GateDecision:
    """The promotion rule: ``value`` (higher is better) must be present, at or above
    ``threshold`` when one is set, and not below the current champion's value by more than
    ``margin``. A champion without a recorded value cannot be compared, so it is kept.
    ``mode="ci"``: instead of the two values, the ``interval`` of (candidate - champion), or of
    (candidate - base) before there is a champion, must have its lower bound above ``-margin``.
    ``force`` promotes regardless and says what the gate would have decided."""
    passed, reason = _rule(metric, value, threshold, margin, champion_version, champion_value)
    if mode == "ci":
        passed, reason = _ci_rule(metric, value, threshold, margin, interval, (passed, reason))
    if force:
        verdict = "passed" if passed else "failed"
        reason = f"forced with --force (gate {verdict}: {reason})"
        passed = True
    return GateDecision(
        passed, reason, force, metric, value, champion_version, champion_value, mode, interval
    )


def _ci_rule(
    metric: str,
    value: float | None,
    threshold: float | None,
    margin: float,
    interval: dict[str, Any] | None,
    point: tuple[bool, str],
) -> tuple[bool, str]:
    if value is None or (threshold is not None and value < threshold) or interval is None:
        return point  # nothing to compare with: the point rule's answer (and reason)
    low, high = interval["ci95"]
    kind = "shared" if interval["paired"] else "(unpaired)"
    text = (
        f"{metric}: candidate - {interval['against']} = {interval['diff']:+.4g}, 95% interval "
        f"[{low:+.4g}, {high:+.4g}] over {interval['n']} {kind} questions; its lower bound is "
    )
    text = (f"{interval['note']}; " if interval.get("note") else "") + text
    if low > -margin:
        return True, text + f"above -margin ({-margin or 0.0:g})"
    return False, text + f"not above -margin ({-margin or 0.0:g})"


def _rule(
    metric: str,
    value: float | None,
    threshold: float | None,
    margin: float,
    champion_version: str | None,
    champion_value: float | None,
) -> tuple[bool, str]:
    if value is None:
        return False, f"{metric} is missing from the evaluation results (null)"
    if threshold is not None and value < threshold:
        return False, f"{metric}={value:g} is below the threshold {threshold:g}"
    if champion_version is None:
        floor = f" and meets the threshold {threshold:g}" if threshold is not None else ""
        return True, f"no current champion; {metric}={value:g}{floor}"
    if champion_value is None:
        return (
            False,
            f"the current champion (version {champion_version}) has no recorded {metric} to compare with",
        )
    if value < champion_value - margin:
        return False, (
            f"{metric}={value:g} is worse than the champion's {champion_value:g} (version "
            f"{champion_version}) by more than the margin {margin:g}"
        )
    return True, (
        f"{metric}={value:g} is within the margin {margin:g} of or better than the champion's "
        f"{champion_value:g} (version {champion_version})"
    )


def current_holder(client: Any, name: str, alias: str) -> Any | None:
    """The model version that holds ``alias`` now, or None (no such model or alias yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def recorded_value(version: Any | None, metric: str) -> float | None:
    """The gate metric recorded on a version's tags at its registration."""
    if version is None:
        return None
    raw = (version.tags or {}).get(EVAL_TAG + metric)
    try:
        return None if raw in (None, "", "None") else float(raw)
    except ValueError:
        return None


def eval_tags(metrics: dict[str, float | None]) -> dict[str, str]:
    return {EVAL_TAG + name: str(value) for name, value in metrics.items() if value is not None}


def pip_requirements(*, peft: bool) -> list[str]:
    """Explicit requirements for a logged model. MLflow's transformers flavor would otherwise
    infer them and add torchvision, which these text models never use."""
    names = ["transformers", "torch", "accelerate", "safetensors", "tokenizers"] + (["peft"] if peft else [])
    requirements = []
    for name in names:
        try:
            version = metadata.version(name).split("+")[0]  # drop local tags such as +cpu
        except metadata.PackageNotFoundError:
            continue
        requirements.append(f"{name}=={version}")
    return requirements

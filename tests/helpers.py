"""Small helpers the test modules share."""

from __future__ import annotations

import re
import time


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.2, what: str = "condition"):
    """Poll `predicate` until it returns something truthy; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last: {last!r})")


def promql_metric_names(expr: str) -> set[str]:
    """The pretrain_* metric names in a PromQL expression (label matchers, grouping labels and the
    label argument of Grafana's label_values() left out)."""
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr = re.sub(r",\s*[a-z_]+\)\s*$", ")", expr) if expr.startswith("label_values") else expr
    return set(re.findall(r"\b(pretrain_[a-z0-9_]+)\b", expr))

"""Shadow traffic: a copy of a share of an alias's requests goes to its shadow version once the caller's answer has
been sent, and the two answers are compared.

The copy is drawn per request (`Resolution.shadows`), sent as a whole answer (a streamed caller's copy too) through
the same placement, hooks and contract checks, and told to no observer: the caller's usage events, quota and
request metrics never see it, and its failure is only counted. Per version pair the gateway records whether the
answers agree (same text; the same parsed JSON where a JSON constraint applies; judged only for greedy requests,
temperature 0), whether the shadow kept to its contract, and its latency (`GatewayMetrics.shadow_observed`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import TYPE_CHECKING, Any, Literal

from gateway.call import Call
from gateway.errors import GatewayError
from gateway.structured import constraint_of

if TYPE_CHECKING:
    from gateway.metrics import GatewayMetrics
    from gateway.proxy import Proxy

log = logging.getLogger(__name__)

ShadowOutcome = Literal["agree", "differ", "unjudged", "error", "dropped"]
MAX_SHADOWS_IN_FLIGHT = 8  # beyond it a copy is dropped (counted): shadow traffic never queues behind itself
SHADOWED_ROUTES = frozenset({"chat", "completions"})
_JSON_KINDS = frozenset({"json_schema", "json_object"})


def choice_texts(answer: dict[str, Any] | None) -> list[str | None] | None:
    """Each choice's text (chat: the message content), in index order; None for an answer without choices."""
    choices = answer.get("choices") if answer is not None else None
    if not isinstance(choices, list) or not choices:
        return None
    texts: list[str | None] = []
    for choice in sorted((c for c in choices if isinstance(c, dict)), key=lambda c: c.get("index", 0)):
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        texts.append(text if isinstance(text, str) else None)
    return texts


def agreement(primary: list[str | None], shadow: list[str | None], as_json: bool) -> bool:
    """Whether two answers agree: the same texts, or with `as_json` the same parsed JSON (text where either is not
    JSON)."""
    if len(primary) != len(shadow):
        return False
    return all(_same(a, b, as_json) for a, b in zip(primary, shadow, strict=True))


def _same(a: str | None, b: str | None, as_json: bool) -> bool:
    if as_json and a is not None and b is not None:
        try:
            return bool(json.loads(a) == json.loads(b))
        except ValueError:
            pass
    return a == b


def greedy(body: dict[str, Any]) -> bool:
    """A request whose answer is deterministic enough to compare: temperature 0 (or top_k 1)."""
    return body.get("temperature") == 0 or body.get("top_k") == 1


class Shadows:
    def __init__(self, proxy: Proxy, metrics: GatewayMetrics, max_in_flight: int = MAX_SHADOWS_IN_FLIGHT) -> None:
        self.proxy = proxy
        self.metrics = metrics
        self.max_in_flight = max_in_flight
        self._tasks: set[asyncio.Task[None]] = set()

    def wanted(self, call: Call) -> bool:
        """Whether this call gets a shadow copy (then the proxy keeps its answer for the comparison)."""
        rollout = call.rollout
        if rollout is None or call.route not in SHADOWED_ROUTES or call.manifest is None:
            return False
        shadow = rollout.shadows(call.request_id)
        return shadow is not None and shadow.version != call.manifest.version

    def copy(self, call: Call, path: str) -> None:
        """After the caller's answer: send the copy in the background (nothing when the caller's call failed)."""
        if not call.keep_answer or call.rollout is None or call.rollout.shadow is None or call.manifest is None:
            return
        if call.status != 200 or call.answer is None:
            return
        labels = (call.rollout.ref, str(call.manifest.version), str(call.rollout.shadow.version))
        if len(self._tasks) >= self.max_in_flight:
            self.metrics.shadow_observed(*labels, "dropped", None, None)
            return
        task = asyncio.get_running_loop().create_task(self._shadow(call, path, labels))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _shadow(self, primary: Call, path: str, labels: tuple[str, str, str]) -> None:
        assert primary.rollout is not None and primary.rollout.shadow is not None
        body = {k: v for k, v in primary.body.items() if k not in ("stream", "stream_options")}
        call = Call(primary.route, f"{primary.request_id}-shadow", body=body)
        call.resolved(primary.rollout.shadow, primary.rollout.shadow.engine_name)
        started = time.monotonic()
        try:
            answer = await self.proxy.fetch(call, path)
        except GatewayError as exc:  # counted; the caller has its answer already
            log.info("%s: shadow copy to %s failed: %s", primary.request_id, call.label, exc.message)
            self.metrics.shadow_observed(*labels, "error", None, None)
            return
        except Exception:
            log.exception("%s: shadow copy to %s failed", primary.request_id, call.label)
            self.metrics.shadow_observed(*labels, "error", None, None)
            return
        latency = time.monotonic() - started
        mine, theirs = choice_texts(answer), choice_texts(primary.answer)
        outcome: ShadowOutcome
        if call.status != 200 or mine is None:
            outcome = "error"
        elif theirs is None or not greedy(body):
            outcome = "unjudged"
        else:
            constraint = constraint_of(call)
            as_json = constraint is not None and constraint.kind in _JSON_KINDS
            outcome = "agree" if agreement(theirs, mine, as_json) else "differ"
        self.metrics.shadow_observed(*labels, outcome, call.output_valid, latency)

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

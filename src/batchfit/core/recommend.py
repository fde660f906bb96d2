"""One recommended batch size from what was measured, with the reasons in plain words. Pure.

The recommendation is made by *criteria*: small objects that look at the measured facts
(:class:`TuneFacts`) and return a :class:`Verdict`. A verdict either *caps* the batch (memory:
never above what fits with headroom) or *proposes* one (the throughput knee; the goodput
optimum once the gradient noise scale is known). The proposal of the highest-priority criterion
that has an opinion decides, clipped to the tightest cap; the result says which criterion
decided. A new criterion plugs in by being added to the list, without touching the others.

Example:

>>> facts = TuneFacts(max_batch=300, safe_batch=270, batch_sizes=(32, 64, 128, 256, 300),
...                   throughputs=(900.0, 1500.0, 1900.0, 1960.0, 1970.0))
>>> rec = recommend(facts)
>>> rec.batch_size, rec.decided_by
(128, 'throughput')
>>> print(rec.reasons[0])
throughput stops improving past 128: +4% at 300 for 2.3x the batch
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..errors import InvalidInputError
from ..results.tune import Recommendation, TargetPlan, Verdict
from .throughput import knee, knee_range
from .validate import check_int

__all__ = ["Criterion", "GoodputCriterion", "MemoryCriterion", "Recommendation", "TargetPlan", "ThroughputCriterion",
           "TuneFacts", "Verdict", "default_criteria", "interpolate_throughput", "plan_target",
           "recommend"]


@dataclass(frozen=True)
class TuneFacts:
    """Everything measured that a criterion may weigh; plain numbers only.

    Args:
        max_batch: the largest batch size verified to fit.
        safe_batch: the largest size that leaves the stated memory headroom free.
        batch_sizes: sizes whose throughput was measured (ascending).
        throughputs: samples/s at each of ``batch_sizes``.
        tolerance: fraction of the best throughput that counts as "as good" (the knee).
        bytes_at: predicted peak bytes per size (from the memory model), if known.
        granularity: recommended sizes are multiples of this.
        extras: facts added by other measurements, e.g. ``{"noise_scale": 420.0}``.
        errors: relative standard error of each throughput's median (``()``: unknown, the
            knee is then the plain one of :func:`~batchfit.core.throughput.knee`).
    """

    max_batch: int
    safe_batch: int
    batch_sizes: tuple[int, ...] = ()
    throughputs: tuple[float, ...] = ()
    tolerance: float = 0.05
    bytes_at: dict[int, float] = field(default_factory=dict)
    granularity: int = 1
    extras: dict[str, Any] = field(default_factory=dict)
    errors: tuple[float | None, ...] = ()

    def __post_init__(self) -> None:
        if len(self.batch_sizes) != len(self.throughputs):
            raise InvalidInputError("batch_sizes and throughputs must have the same length")
        if self.errors and len(self.errors) != len(self.batch_sizes):
            raise InvalidInputError("errors must be empty or have one entry per batch size")
        if self.max_batch < 1 or self.safe_batch < 0:
            raise InvalidInputError("max_batch must be >= 1 and safe_batch >= 0")


@runtime_checkable
class Criterion(Protocol):
    """A rule that looks at the facts and caps or proposes a batch size."""

    name: str

    def judge(self, facts: TuneFacts) -> Verdict | None: ...


def _ratio(a: float, b: float) -> str:
    r = a / b
    return f"{r:.1f}x" if r < 9.95 else f"{r:.0f}x"


class MemoryCriterion:
    """Caps the batch at the largest size that fits with headroom (the safe size)."""

    name = "memory"

    def judge(self, facts: TuneFacts) -> Verdict:
        cap = facts.safe_batch if facts.safe_batch >= 1 else facts.max_batch
        if cap < facts.max_batch:
            reason = (f"{facts.max_batch} is the largest batch that fits; {cap} leaves the "
                      f"stated headroom for fragmentation, longer inputs and evaluation")
        else:
            reason = f"{facts.max_batch} is the largest batch that fits"
        return Verdict(self.name, cap, "cap", reason=reason)


class ThroughputCriterion:
    """Proposes the knee: the smallest size within ``tolerance`` of the best throughput.

    With the medians' errors among the facts, the knee is a range (the sizes that may be within
    the tolerance as far as the timing can tell, :func:`~batchfit.core.throughput.knee_range`)
    and the proposal its smallest member, so that two runs on a flat curve propose the same size
    instead of flipping between neighbours.
    """

    name = "throughput"
    priority = 10

    def judge(self, facts: TuneFacts) -> Verdict | None:
        if not facts.batch_sizes:
            return None
        sizes, rates = facts.batch_sizes, facts.throughputs
        if facts.errors:
            k, k_high = knee_range(sizes, rates, facts.errors, tolerance=facts.tolerance)
        else:
            k = k_high = knee(sizes, rates, tolerance=facts.tolerance)
        best_i = max(range(len(sizes)), key=lambda i: rates[i])
        top_i = max(range(len(sizes)), key=lambda i: sizes[i])
        t_k = rates[sizes.index(k)]
        if k == sizes[top_i]:
            reason = (f"throughput still grows up to the largest size measured ({k}): memory, "
                      f"not speed, limits the batch")
        else:
            big = sizes[best_i] if sizes[best_i] > k else sizes[top_i]
            gain = rates[sizes.index(big)] / t_k - 1 if t_k > 0 else math.inf
            if k in facts.bytes_at and big in facts.bytes_at and facts.bytes_at[k] > 0:
                cost = f"{_ratio(facts.bytes_at[big], facts.bytes_at[k])} memory"
            else:
                cost = f"{_ratio(big, k)} the batch"
            reason = (f"throughput stops improving past {k}: {_gain(gain)} at {big} for {cost}")
        if k_high != k:
            reason += (f" (the knee lies in {k}-{k_high} given the timing error: every size in "
                       f"it is within {facts.tolerance:.0%} of the best as far as the timing "
                       "can tell; the smallest is proposed)")
        return Verdict(self.name, k, "propose", priority=self.priority, reason=reason)


def _gain(gain: float) -> str:
    """A throughput change in words: "+4%", "no faster" (under 0.5%), "7% slower" (not "-0%").

    Example:

    >>> _gain(0.04), _gain(-0.004), _gain(-0.07)
    ('+4%', 'no faster', '7% slower')
    """
    if abs(gain) < 0.005:
        return "no faster"
    return f"{gain:+.0%}" if gain > 0 else f"{-gain:.0%} slower"


class GoodputCriterion:
    """Proposes the goodput-optimal batch: throughput times statistical efficiency.

    With the gradient noise scale ``B_simple`` known (``noise_scale=``, or
    ``facts.extras["noise_scale"]``), a larger batch saves fewer steps than it costs samples:
    the statistical efficiency ``E(M) = (B + M0) / (B + M)`` (Pollux / AdaptDL, from McCandlish
    et al. 2018) falls with the batch, and goodput ``= throughput(M) * E(M)`` peaks at a batch
    that weighs speed against steps to converge. Without a noise scale it has no opinion.
    Its priority is above the throughput knee's: when it speaks, it decides (memory still caps).
    """

    name = "goodput"
    priority = 20

    def __init__(self, noise_scale: float | None = None, base_batch: float | None = None) -> None:
        self.noise_scale = noise_scale
        self.base_batch = base_batch

    def judge(self, facts: TuneFacts) -> Verdict | None:
        from .noise import goodput_optimal_batch

        b_noise = self.noise_scale if self.noise_scale is not None else facts.extras.get(
            "noise_scale")
        if b_noise is None or not facts.batch_sizes:
            return None
        cap = facts.safe_batch if facts.safe_batch >= 1 else facts.max_batch
        sizes = [b for b in facts.batch_sizes if b <= cap] or [min(facts.batch_sizes)]
        rates = [facts.throughputs[facts.batch_sizes.index(b)] for b in sizes]
        choice = goodput_optimal_batch(sizes, rates, float(b_noise), self.base_batch)
        b = choice.batch_size
        noise = "unbounded" if not math.isfinite(float(b_noise)) else f"about {float(b_noise):,.0f}"
        reason = (f"goodput (throughput x statistical efficiency; gradient noise scale "
                  f"{noise}) peaks at {b}")
        if choice.throughput_best > b:
            i, j = choice.index, choice.batch_sizes.index(choice.throughput_best)
            gain = choice.throughputs[j] / choice.throughputs[i] - 1 if choice.throughputs[i] else 0
            reason += (f": {choice.throughput_best} is {gain:+.0%} faster in samples/s but "
                       f"each sample there is worth {choice.efficiency[j] / choice.efficiency[i]:.0%} "
                       f"as much progress")
        return Verdict(self.name, b, "propose", priority=self.priority, reason=reason)


def default_criteria() -> list[Criterion]:
    """The criteria :func:`recommend` uses unless told otherwise.

    Memory caps; goodput proposes when a gradient noise scale is among the facts
    (``extras["noise_scale"]``); otherwise the throughput knee proposes.
    """
    return [MemoryCriterion(), ThroughputCriterion(), GoodputCriterion()]


def _round_down(b: int, granularity: int) -> int:
    return max(granularity, (b // granularity) * granularity)


def recommend(facts: TuneFacts, criteria: Sequence[Criterion] | None = None) -> Recommendation:
    """Combine the criteria's verdicts into one batch size.

    The highest-priority proposal decides; the tightest cap clips it. Without any proposal
    (no throughput measured) the cap itself is the recommendation.
    """
    verdicts = [v for c in (criteria if criteria is not None else default_criteria())
                if (v := c.judge(facts)) is not None]
    caps = [v for v in verdicts if v.kind == "cap" and v.batch_size is not None]
    proposals = [v for v in verdicts if v.kind == "propose" and v.batch_size is not None]
    cap = min(caps, key=lambda v: v.batch_size) if caps else None  # type: ignore[arg-type,return-value]
    limit = cap.batch_size if cap is not None else facts.max_batch
    if proposals:
        chosen = max(proposals, key=lambda v: v.priority)
        size = chosen.batch_size if chosen.batch_size is not None else limit
        if size > limit:
            decided = cap
            size = limit
            first = (f"{chosen.criterion} would take {chosen.batch_size}, but "
                     f"{cap.reason if cap else 'memory limits it'}: {limit}")
        else:
            decided = chosen
            first = chosen.reason
    else:
        decided, size = cap, limit
        first = cap.reason if cap else f"{limit} is the largest batch that fits"
    size = _round_down(int(size), facts.granularity)  # type: ignore[arg-type]
    others = [v.reason for v in verdicts if v is not decided and v.reason]
    return Recommendation(batch_size=size,
                          decided_by=decided.criterion if decided else "memory",
                          reasons=(first, *others), verdicts=tuple(verdicts))


def interpolate_throughput(batch_sizes: Sequence[int], throughputs: Sequence[float],
                           batch: float) -> float | None:
    """Throughput at ``batch`` by linear interpolation in log(batch); ``None`` outside the range."""
    pairs = sorted(zip(batch_sizes, throughputs))
    if not pairs or batch < pairs[0][0] or batch > pairs[-1][0]:
        return None
    for (b0, t0), (b1, t1) in itertools.pairwise(pairs):
        if b0 <= batch <= b1:
            if b1 == b0:
                return t0
            w = (math.log(batch) - math.log(b0)) / (math.log(b1) - math.log(b0))
            return t0 + w * (t1 - t0)
    return pairs[-1][1]


def plan_target(target: int, facts: TuneFacts) -> TargetPlan:
    """Micro-batch and accumulation steps that reach ``target`` within the memory cap.

    The fewest accumulation steps whose micro-batch fits with headroom; among splits with up to
    twice that many steps, one that divides ``target`` exactly is preferred (the effective
    batch is then exactly the target); otherwise (a prime target, say) the micro-batch is
    rounded up and the effective batch slightly exceeds the target.

    Example:

    >>> f = TuneFacts(max_batch=300, safe_batch=270, batch_sizes=(64, 128, 256),
    ...               throughputs=(1500.0, 1900.0, 1960.0))
    >>> p = plan_target(1024, f)
    >>> p.micro_batch, p.accumulation_steps, p.effective_batch
    (256, 4, 1024)
    """
    check_int("target batch size", target, minimum=1)
    cap = facts.safe_batch if facts.safe_batch >= 1 else facts.max_batch
    best = max(facts.throughputs) if facts.throughputs else None

    def rate(b: int) -> float | None:
        return interpolate_throughput(facts.batch_sizes, facts.throughputs, b)

    if target <= facts.max_batch:
        r = rate(target)
        rel = r / best if (r is not None and best) else None
        note = "" if target <= cap else f" (above the safe size {cap}: little memory to spare)"
        return TargetPlan(target, True, target, 1, target, r, rel,
                          f"{target} fits as one batch{note}; no accumulation needed.")
    g = facts.granularity
    fewest = math.ceil(target / max(1, cap))
    micro = steps = 0
    for n in range(fewest, 2 * fewest + 1):  # an exact split, with as few steps as possible
        if target % n == 0 and (target // n) % g == 0 and target // n <= cap:
            micro, steps = target // n, n
            break
    if not micro:  # none: the fewest steps, micro-batches rounded up to the granularity
        steps = fewest
        while True:
            micro = math.ceil(target / steps / g) * g
            if micro <= max(cap, g):
                break
            steps += 1
    effective = micro * steps
    r = rate(micro)
    rel = r / best if (r is not None and best) else None
    text = (f"{target} does not fit (the largest batch that fits is {facts.max_batch}): run "
            f"micro-batches of {micro} with gradient_accumulation_steps={steps}")
    if effective != target:
        text += f" (effective batch {effective}: no divisor of {target} fits well)"
    if r is not None and rel is not None:
        text += (f"; expected {r:,.0f} samples/s, {rel:.0%} of the best measured "
                 f"({best:,.0f}), one optimizer update every {steps} steps")
    else:
        text += f"; one optimizer update every {steps} steps"
    return TargetPlan(target, False, micro, steps, effective, r, rel, text + ".")

"""Whether prefetching pays on this machine, measured while it runs: prediction must never cost.

Admission (admission.py) keeps guesses that are mostly wrong from reading, but even the
reads it admits are not free. On a virtual drive every read in flight takes compute from
the kernels beside it (bench/read_contention.py: 1.65-3.3 ms of a 2-thread decode step
per 5 MiB read), and the predictions themselves take time (about 1 ms a layer for the
48-layer bench file's predictors). Whether the stalls a prefetch saves outweigh that
depends on the drive, the CPU, the pool and the text: on the 12-layer bench file under a
4 GiB pool pre-attn decoded 5.6-6.0 tokens/s against none's 4.3-4.5, on the 48-layer
file, whose steps are bound by compute and demand reads alike, 3.09 against 3.19.
No fixed rule gets both right, so the governor measures: it times forward passes with
prefetching on and with it off, and keeps whichever is faster.

    warm-up  WARM_UP passes on, not timed: the scorer learns each rank's precision, without
             which admission reads nothing (a rank not scored yet is never read)
    trial    TRIAL_ORDER blocks of BLOCK passes, on, off, off, on, so that a drift (the
             pool filling, the text changing) weighs both arms alike; the first pass of a
             block is not timed, as the reads the block before queued are still landing
    hold     the faster arm, by the median time of a pass, for HOLD passes; then another
             trial, as the drive or the text may have changed. A tie goes to off, which
             is on-demand loading exactly.

Passes are only compared with passes of as many tokens: the count the trial timed most
often in both arms (1 in decoding, a server's batch of sequences). A trial that timed too
few passes of any count (a run of long prompts) is run again.

With prefetching off the prefetcher makes no predictions at all (and scores none), so an
off pass costs what `--prefetch none` does. The oracle is not governed: it is the upper
bound that the measurements compare against.
"""

from __future__ import annotations

from collections import defaultdict, deque
from statistics import median

WARM_UP = 8  # passes on before the first trial
BLOCK = 8  # passes per trial block; the first is not timed
TRIAL_ORDER = (True, False, False, True)  # on/off per block
HOLD = 256  # passes the faster arm runs before the next trial
MIN_TIMED = 3  # timed passes of one token count each arm needs for a verdict


class PrefetchGovernor:
    """Turns prefetching on and off between forward passes by their measured time (module docstring).

    The engine reports every forward pass (`passed`); the prefetcher asks `enabled()` at
    each of its hooks. Both run in the model's thread.
    """

    def __init__(self, warm_up: int = WARM_UP, block: int = BLOCK, hold: int = HOLD):
        self.warm_up, self.block, self.hold = warm_up, block, hold
        self.reset()

    def reset(self) -> None:
        """Back to the warm-up (a cold store), forgetting what was measured."""
        self.passes = 0
        self.passes_on = 0
        self.decisions: list[dict] = []
        self.phase = "warm-up"
        self.plan: deque[tuple[bool, bool]] = deque([(True, False)] * self.warm_up)  # (on, timed) per pass
        self.timed: dict[bool, dict[int, list[float]]] = {True: defaultdict(list), False: defaultdict(list)}
        if not self.plan:
            self._start_trial()

    def enabled(self) -> bool:
        """Whether this forward pass prefetches."""
        return self.plan[0][0]

    def passed(self, seconds: float, n_tokens: int) -> None:
        """A forward pass of `n_tokens` tokens took `seconds`."""
        on, timed = self.plan.popleft()
        self.passes += 1
        self.passes_on += on
        if timed:
            self.timed[on][n_tokens].append(seconds)
        if not self.plan:
            if self.phase == "trial":
                self._decide()
            else:
                self._start_trial()

    def _start_trial(self) -> None:
        self.phase = "trial"
        self.timed = {True: defaultdict(list), False: defaultdict(list)}
        for on in TRIAL_ORDER:
            self.plan += [(on, False)] + [(on, True)] * (self.block - 1)

    def _decide(self) -> None:
        counts = set(self.timed[True]) & set(self.timed[False])
        n_tokens = max(counts, key=lambda n: min(len(self.timed[True][n]), len(self.timed[False][n])), default=None)
        if n_tokens is None or min(len(self.timed[True][n_tokens]), len(self.timed[False][n_tokens])) < MIN_TIMED:
            self._start_trial()
            return
        on_s, off_s = median(self.timed[True][n_tokens]), median(self.timed[False][n_tokens])
        choice = on_s < off_s
        self.decisions.append({"at_pass": self.passes, "tokens": n_tokens, "on_s": on_s, "off_s": off_s,
                               "prefetch": choice})
        self.phase = "on" if choice else "off"
        self.plan = deque([(choice, False)] * self.hold)

    def summary(self) -> dict:
        """JSON-ready: where the schedule is, and every verdict so far."""
        return {"phase": self.phase, "passes": self.passes, "passes_on": self.passes_on,
                "decisions": list(self.decisions)}


def describe(summary: dict) -> str:
    """One line for `--stats`: the governor's latest verdict, or that there is none yet."""
    head = f"governor: {summary['phase']}, prefetched in {summary['passes_on']} of {summary['passes']} passes"
    if not summary["decisions"]:
        return head + "; no verdict yet"
    d = summary["decisions"][-1]
    return (f"{head}; last verdict at pass {d['at_pass']}: {'on' if d['prefetch'] else 'off'} "
            f"(median {1e3 * d['on_s']:.1f} ms a {d['tokens']}-token pass on, {1e3 * d['off_s']:.1f} ms off)")

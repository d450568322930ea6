"""Whether prefetching pays on this machine, measured while it runs: prediction must never cost.

Admission (admission.py) keeps guesses that are mostly wrong from reading, but even the
reads it admits are not free. On a virtual drive every read in flight takes compute from
the kernels beside it (bench/read_contention.py: 1.65-3.3 ms of a 2-thread decode step
per 5 MiB read), and every token pays for the predictions (on the 48-layer bench file
0.30 ms a call at width 1024, 15 ms of a 220 ms step). Whether the stalls a prefetch
saves outweigh that depends on the drive, the CPU, the pool and the text: on that file
prefetching made the run 1.3x faster under a 12 GiB pool and about as fast as none under
its 19 GiB auto pool. No fixed rule gets both right, so the governor measures.

Timing whole passes with prefetching on and off does not work: a pass's time depends far
more on its token than on prefetching. On the 48-layer file, teacher-forced on text, a
token whose experts are in the pool reads 10-50 MB and takes 200-250 ms, one whose
experts are not reads 600-800 MB and takes 450-700 ms, in the same steps of every run;
blocks of 8 passes on against 8 off measured 260 against 471 ms a pass whichever way
prefetching went. So the governor compares the two halves of each pass, which share its
token: in a trial pass one half of the MoE layers prefetches and the other does not,
alternating pass by pass, and it times the halves (the split is the pre-attention of the
first layer of the second half). With D = (first half's time) - (second half's), the
mean of D over passes with the second half prefetching, less its mean over passes with
the first half prefetching, is what prefetching every layer saves a pass (the halves' own
difference cancels).

A mean, trimmed of the TRIM highest and lowest eighths (a preempted pass), and not a
median, because the time a run takes is what prefetching must not lengthen: it costs a
few ms on every token, while its savings come on the tokens whose experts are not
resident, fewer than half. On the 12-layer file under a 4 GiB pool prefetching made the
median step 2-8 % slower than none's and the steps together 12-15 % faster; on the
48-layer file under its auto pool 5-9 % slower and 0-11 % faster. Two costs escape the
measurement: a guess made `--lookahead` layers ahead loads the blocks before its layer,
so the first layers of the second half charge a little of their cost to the first; and a
wrong prefetch that evicts a slab costs a read later, in either half.

    warm-up  WARM_UP passes on everywhere, not timed: the scorer learns each rank's
             precision, without which admission reads nothing
    trial    TRIAL passes, the first and the second half prefetching by turns
    hold     prefetching everywhere if it made passes faster, else nowhere (a tie: nowhere,
             which is on-demand loading exactly); then another trial, as the drive, the pool
             or the text may have changed. The first verdict holds HOLD passes, each that
             repeats the one before holds twice as long (up to MAX_HOLD), and one that
             reverses it HOLD again: a run's first passes, while the pool fills, are not its
             steady state (on the 48-layer file under a 19 GiB pool the passes before the
             40th read 370 MB a token, those after the 48th 265), and a trial costs little
             (half the layers on the slower side for TRIAL passes)

Passes are only compared with passes of as many tokens: the count the trial timed most
often in both arms (1 in decoding, a server's batch of sequences). A trial that timed too
few passes of any one count (a run of long prompts) is run again.

A layer that does not prefetch makes no prediction at all (and is not scored), so a
held-off pass costs what `--prefetch none` does. The oracle is not governed: it is the
upper bound that the measurements compare against.
"""

from __future__ import annotations

from collections import defaultdict, deque
from statistics import mean, median

WARM_UP = 8  # passes prefetching everywhere before the first trial
TRIAL = 32  # passes of a trial, the two halves prefetching by turns
HOLD = 64  # passes the first verdict holds before the next trial; a repeated one holds twice as long
MAX_HOLD = 512
MIN_TIMED = 3  # timed passes of one token count each arm needs for a verdict
TRIM = 1 / 8  # share of the highest and of the lowest differences left out of a mean

ON, OFF, FIRST, SECOND = "on", "off", "first", "second"  # which layers of a pass prefetch


class PrefetchGovernor:
    """Says which MoE layers of each forward pass prefetch, by the measured time (module docstring).

    The prefetcher asks `enabled(layer)` at its hooks and calls `split(now)` at the
    pre-attention of `split_layer`; the engine reports each pass's start and end (`passed`).
    All of it runs in the model's thread. Times are time.perf_counter() values.
    """

    def __init__(self, moe_layers: list[int], warm_up: int = WARM_UP, trial: int = TRIAL, hold: int = HOLD,
                 max_hold: int = MAX_HOLD):
        if len(moe_layers) < 2:
            raise ValueError("the governor compares two halves of the MoE layers: it needs two at least")
        half = len(moe_layers) // 2
        self.first = frozenset(moe_layers[:half])
        self.split_layer = moe_layers[half]
        self.warm_up, self.trial, self.first_hold, self.max_hold = warm_up, trial, hold, max_hold
        self.reset()

    def reset(self) -> None:
        """Back to the warm-up (a cold store), forgetting what was measured."""
        self.passes = 0
        self.layer_share_on = 0.0  # passes counted by the share of their MoE layers that prefetched
        self.decisions: list[dict] = []
        self.hold = self.first_hold
        self.phase = "warm-up"
        self.plan: deque[str] = deque([ON] * self.warm_up)
        self.split_at: float | None = None
        self.diffs: dict[str, dict[int, list[float]]] = {}
        if not self.plan:
            self._start_trial()

    def enabled(self, layer: int) -> bool:
        """Whether `layer` prefetches in this pass."""
        mode = self.plan[0]
        if mode in (ON, OFF):
            return mode == ON
        return (layer in self.first) == (mode == FIRST)

    def split(self, now: float) -> None:
        """The pass reached the pre-attention of `split_layer`: its first half is done."""
        self.split_at = now

    def passed(self, start: float, end: float, n_tokens: int) -> None:
        """A forward pass of `n_tokens` tokens ran from `start` to `end`."""
        mode = self.plan.popleft()
        self.passes += 1
        self.layer_share_on += {ON: 1.0, OFF: 0.0}.get(mode, 0.5)
        if mode in (FIRST, SECOND) and self.split_at is not None and start <= self.split_at <= end:
            self.diffs[mode][n_tokens].append((self.split_at - start) - (end - self.split_at))
        self.split_at = None
        if not self.plan:
            if self.phase == "trial":
                self._decide()
            else:
                self._start_trial()

    def _start_trial(self) -> None:
        self.phase = "trial"
        self.diffs = {FIRST: defaultdict(list), SECOND: defaultdict(list)}
        self.plan = deque(FIRST if i % 2 == 0 else SECOND for i in range(self.trial))

    def _decide(self) -> None:
        first, second = self.diffs[FIRST], self.diffs[SECOND]
        n_tokens = max(set(first) & set(second), key=lambda n: min(len(first[n]), len(second[n])), default=None)
        if n_tokens is None or min(len(first[n_tokens]), len(second[n_tokens])) < MIN_TIMED:
            self._start_trial()
            return
        # D = first half - second half; prefetching the first half lowers D by what it saves there,
        # prefetching the second raises it by what it saves there: the difference is both savings
        saved = trimmed_mean(second[n_tokens]) - trimmed_mean(first[n_tokens])
        choice = saved > 0
        if self.decisions:
            repeated = self.decisions[-1]["prefetch"] == choice
            self.hold = min(2 * self.hold, self.max_hold) if repeated else self.first_hold
        self.decisions.append({"at_pass": self.passes, "tokens": n_tokens, "saved_s": saved, "prefetch": choice,
                               "hold": self.hold,
                               "median_saved_s": median(second[n_tokens]) - median(first[n_tokens])})
        self.phase = ON if choice else OFF
        self.plan = deque([self.phase] * self.hold)

    def summary(self) -> dict:
        """JSON-ready: where the schedule is, and every verdict so far."""
        return {"phase": self.phase, "passes": self.passes, "layer_share_on": self.layer_share_on,
                "decisions": list(self.decisions)}


def describe(summary: dict) -> str:
    """One line for `--stats`: the governor's latest verdict, or that there is none yet."""
    share = summary["layer_share_on"] / summary["passes"] if summary["passes"] else 0.0
    head = f"governor: {summary['phase']}, prefetched in {100 * share:.0f} % of {summary['passes']} passes' layers"
    if not summary["decisions"]:
        return head + "; no verdict yet"
    d = summary["decisions"][-1]
    return (f"{head}; last verdict at pass {d['at_pass']}: {'on' if d['prefetch'] else 'off'}, prefetching "
            f"{'saved' if d['saved_s'] > 0 else 'cost'} {1e3 * abs(d['saved_s']):.1f} ms a {d['tokens']}-token pass")


def trimmed_mean(values: list[float]) -> float:
    """The mean of `values` without the TRIM highest and the TRIM lowest of them."""
    cut = int(len(values) * TRIM)
    ordered = sorted(values)
    return mean(ordered[cut:len(ordered) - cut])

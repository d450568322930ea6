"""The prefetch governor: it keeps prefetching only while passes measure faster with it (no wall-clock asserts:
the unit tests feed it made-up pass times, the model test checks what an off pass does)."""

from __future__ import annotations

import pytest
import torch

import qmoe
from qmoe.errors import QmoeError
from qmoe.experts.governor import TRIAL_ORDER, PrefetchGovernor, describe
from qmoe.experts.options import OffloadOptions
from qmoe.experts.stats import format_table

WARM_UP, BLOCK, HOLD = 2, 4, 10
TRIAL = len(TRIAL_ORDER) * BLOCK


def run(governor: PrefetchGovernor, passes: int, on_s: float, off_s: float, n_tokens: int = 1) -> list[bool]:
    """Feed `passes` passes that take on_s with prefetching and off_s without; which were on."""
    arms = []
    for _ in range(passes):
        on = governor.enabled()
        arms.append(on)
        governor.passed(on_s if on else off_s, n_tokens)
    return arms


def test_warm_up_then_trial_blocks_on_off_off_on():
    g = PrefetchGovernor(WARM_UP, BLOCK, HOLD)
    arms = run(g, WARM_UP + TRIAL, 1.0, 2.0)
    assert arms == [True] * WARM_UP + [on for on in TRIAL_ORDER for _ in range(BLOCK)]
    assert TRIAL_ORDER == (True, False, False, True)


@pytest.mark.parametrize("on_s, off_s, keeps", [(1.0, 2.0, True), (2.0, 1.0, False), (1.0, 1.0, False)])
def test_the_faster_arm_is_held_and_a_tie_goes_to_off(on_s, off_s, keeps):
    g = PrefetchGovernor(WARM_UP, BLOCK, HOLD)
    run(g, WARM_UP + TRIAL, on_s, off_s)
    assert g.phase == ("on" if keeps else "off")
    (verdict,) = g.decisions
    assert verdict == {"at_pass": WARM_UP + TRIAL, "tokens": 1, "on_s": on_s, "off_s": off_s, "prefetch": keeps}
    assert run(g, HOLD, on_s, off_s) == [keeps] * HOLD
    assert g.phase == "trial"  # then measured again: the drive or the text may have changed
    run(g, TRIAL, 0.25 * on_s, off_s)  # ... and now prefetching is faster
    assert [d["prefetch"] for d in g.decisions] == [keeps, True]
    assert g.summary()["passes_on"] == WARM_UP + TRIAL // 2 + keeps * HOLD + TRIAL // 2


def test_a_blocks_first_pass_is_not_timed():
    g = PrefetchGovernor(WARM_UP, BLOCK, HOLD)
    run(g, WARM_UP, 1.0, 1.0)
    for on in TRIAL_ORDER:
        for i in range(BLOCK):
            assert g.enabled() == on
            # the pass after a switch, still paying for the last block's reads, is slow either way
            g.passed(100.0 if i == 0 else (1.0 if on else 2.0), 1)
    assert g.decisions[-1]["prefetch"] and g.decisions[-1]["on_s"] == 1.0


def test_passes_are_compared_only_with_passes_of_as_many_tokens():
    g = PrefetchGovernor(WARM_UP, BLOCK, HOLD)
    run(g, WARM_UP, 1.0, 1.0)
    for n in range(TRIAL):
        on = g.enabled()
        if n % 4 == 3:  # long prompts, those in the on arm slower than any one-token pass
            g.passed(50.0 if on else 1.0, 512)
        else:
            g.passed(1.0 if on else 2.0, 1)
    (verdict,) = g.decisions
    assert verdict["tokens"] == 1 and verdict["prefetch"]


def test_a_trial_with_too_few_comparable_passes_runs_again():
    g = PrefetchGovernor(WARM_UP, BLOCK, HOLD)
    run(g, WARM_UP, 1.0, 1.0)
    for n in range(TRIAL):
        g.passed(1.0, n + 1)  # no two passes of as many tokens
    assert g.phase == "trial" and not g.decisions
    run(g, TRIAL, 1.0, 2.0)
    assert g.phase == "on"


def test_reset_starts_from_the_warm_up():
    g = PrefetchGovernor(WARM_UP, BLOCK, HOLD)
    run(g, WARM_UP + TRIAL, 2.0, 1.0)
    assert not g.enabled()
    g.reset()
    assert g.phase == "warm-up" and g.enabled() and g.summary() == {
        "phase": "warm-up", "passes": 0, "passes_on": 0, "decisions": []}


def test_describe_says_the_latest_verdict():
    g = PrefetchGovernor(WARM_UP, BLOCK, HOLD)
    assert describe(g.summary()) == "governor: warm-up, prefetched in 0 of 0 passes; no verdict yet"
    run(g, WARM_UP + TRIAL, 0.004, 0.003)
    assert describe(g.summary()) == (
        f"governor: off, prefetched in {WARM_UP + TRIAL // 2} of {WARM_UP + TRIAL} passes; last verdict at pass "
        f"{WARM_UP + TRIAL}: off (median 4.0 ms a 1-token pass on, 3.0 ms off)")


def test_always_prefetch_is_for_the_governed_policies():
    OffloadOptions(ram_budget="50%", prefetch="cross-layer", govern=False)
    for policy in ("none", "oracle"):
        with pytest.raises(QmoeError, match="--always-prefetch applies to --prefetch pre-attn and cross-layer"):
            OffloadOptions(ram_budget="50%", prefetch=policy, govern=False)


STEPS = 24


def decode(m, ids: list[int]) -> list:
    """A 4-token prompt, then teacher-forced single-token steps: the logits of every pass."""
    cache = m.new_cache()
    return [m.eval(ids[:4], cache)] + [m.eval([t], cache) for t in ids[4:]]


@pytest.fixture(scope="module")
def q4_path(tiny_gguf):
    return tiny_gguf("qwen3moe", "q8_0", "q4_0")


def test_an_off_pass_predicts_nothing_and_results_do_not_change(q4_path):
    ids = list(range(3, 3 + 4 + STEPS))
    with qmoe.load(q4_path) as plain:
        reference = decode(plain, ids)
    with qmoe.load(q4_path, offload=OffloadOptions(ram_budget="50%", prefetch="cross-layer")) as m:
        governor = m.prefetcher.governor = PrefetchGovernor(WARM_UP, BLOCK, HOLD)
        per_pass, arms = [], []
        report = governor.passed

        def watched(seconds: float, n_tokens: int) -> None:
            arms.append(governor.enabled())
            per_pass.append(m.prefetcher.scorer.stats.predictions)
            report(seconds, n_tokens)

        governor.passed = watched
        assert all(torch.equal(a, b) for a, b in zip(decode(m, ids), reference, strict=True))
        stats = m.offload_stats()
    made = [b - a for a, b in zip([0] + per_pass, per_pass)]
    assert arms[:WARM_UP + TRIAL] == [True] * WARM_UP + [on for on in TRIAL_ORDER for _ in range(BLOCK)]
    # cross-layer predicts every MoE layer but the first, in the passes that prefetch and in no other
    assert made == [(len(m.net.moe_layers) - 1) * on for on in arms]
    assert stats["prefetch"]["governor"]["passes"] == len(arms) == 1 + STEPS
    assert stats["total"]["actual"] > 0 and "governor: " in format_table(stats)


def test_always_prefetch_predicts_in_every_pass(q4_path):
    options = OffloadOptions(ram_budget="50%", prefetch="cross-layer", govern=False)
    with qmoe.load(q4_path, offload=options) as m:
        assert m.prefetcher.governor is None
        decode(m, list(range(3, 3 + 4 + STEPS)))
        stats = m.offload_stats()
    assert stats["prefetch"]["predictions"] == (1 + STEPS) * (len(m.net.moe_layers) - 1)
    assert stats["prefetch"]["governor"] is None and "governor" not in format_table(stats)

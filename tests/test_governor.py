"""The prefetch governor: it keeps prefetching only while passes measure faster with it (no wall-clock asserts:
the unit tests feed it made-up pass times, the model test checks what an off pass does)."""

from __future__ import annotations

import pytest
import torch

import qmoe
from qmoe.cli import main
from qmoe.errors import QmoeError
from qmoe.experts.governor import PrefetchGovernor, describe
from qmoe.experts.options import OffloadOptions
from qmoe.experts.stats import format_table
from qmoe.predictor.sidecar import write_sidecar
from tests.test_store import random_predictors

WARM_UP, TRIAL, HOLD = 2, 8, 10
LAYERS = [0, 1, 2, 3]  # halves: 0-1 and 2-3


def governor() -> PrefetchGovernor:
    return PrefetchGovernor(LAYERS, WARM_UP, TRIAL, HOLD)


def run(g: PrefetchGovernor, passes: int, saved: dict[int, float], n_tokens: int = 1,
        token_s: list[float] | None = None) -> list[tuple[bool, ...]]:
    """Feed `passes` passes in which each layer takes 1 s (plus what its token costs, token_s[i] for
    the i-th pass, spread over the layers), less saved[layer] where it prefetches; which layers did."""
    arms, clock = [], 0.0
    for i in range(passes):
        start = clock
        on = tuple(g.enabled(layer) for layer in LAYERS)
        arms.append(on)
        for layer, prefetches in zip(LAYERS, on):
            if layer == g.split_layer:
                g.split(clock)
            clock += 1.0 + (token_s[i] / len(LAYERS) if token_s else 0.0) - (saved[layer] if prefetches else 0.0)
        g.passed(start, clock, n_tokens)
    return arms


EVERY, NONE, FIRST, SECOND = (True,) * 4, (False,) * 4, (True, True, False, False), (False, False, True, True)


def test_warm_up_then_halves_by_turns():
    g = governor()
    assert g.split_layer == 2
    assert run(g, WARM_UP + TRIAL, dict.fromkeys(LAYERS, 0.1)) == [EVERY] * WARM_UP + [FIRST, SECOND] * (TRIAL // 2)


@pytest.mark.parametrize("saved, keeps", [(0.1, True), (-0.1, False), (0.0, False)])
def test_the_verdict_is_held_and_a_tie_goes_to_off(saved, keeps):
    g = governor()
    run(g, WARM_UP + TRIAL, dict.fromkeys(LAYERS, saved))
    assert g.phase == ("on" if keeps else "off")
    (verdict,) = g.decisions
    assert verdict["at_pass"] == WARM_UP + TRIAL and verdict["tokens"] == 1 and verdict["prefetch"] == keeps
    assert verdict["saved_s"] == pytest.approx(4 * saved)  # what prefetching every layer saves a pass
    assert run(g, HOLD, dict.fromkeys(LAYERS, saved)) == [EVERY if keeps else NONE] * HOLD
    assert g.phase == "trial"  # then measured again: the drive or the text may have changed
    run(g, TRIAL, dict.fromkeys(LAYERS, 0.2))  # ... and now prefetching saves time
    assert [d["prefetch"] for d in g.decisions] == [keeps, True]
    assert g.summary()["layer_share_on"] == WARM_UP + TRIAL / 2 + keeps * HOLD + TRIAL / 2
    assert [d["hold"] for d in g.decisions] == [HOLD, 2 * HOLD if keeps else HOLD]


def test_a_repeated_verdict_holds_twice_as_long_up_to_the_longest_hold():
    g = PrefetchGovernor(LAYERS, WARM_UP, TRIAL, HOLD, max_hold=4 * HOLD)
    run(g, WARM_UP, dict.fromkeys(LAYERS, 0.0))
    holds = []
    for saved in (0.1, 0.1, 0.1, 0.1, -0.1, -0.1):
        run(g, TRIAL, dict.fromkeys(LAYERS, saved))
        holds.append(g.decisions[-1]["hold"])
        assert run(g, holds[-1], dict.fromkeys(LAYERS, saved)) == [EVERY if saved > 0 else NONE] * holds[-1]
    assert holds == [HOLD, 2 * HOLD, 4 * HOLD, 4 * HOLD, HOLD, 2 * HOLD]  # reversed: held briefly again


def test_the_token_of_a_pass_does_not_sway_the_verdict():
    # Passes with prefetching cost 0.2 s more, but the first half prefetches in the passes of
    # slow tokens (10 s more): by whole passes, prefetching would look slower by far, or faster
    # the other way round; by halves it is what it is.
    for slow_first, slow_second in ((10.0, 0.0), (0.0, 10.0)):
        g = governor()
        token_s = [0.0] * WARM_UP + [slow_first, slow_second] * (TRIAL // 2)
        run(g, WARM_UP + TRIAL, dict.fromkeys(LAYERS, -0.05), token_s=token_s)
        (verdict,) = g.decisions
        assert not verdict["prefetch"] and verdict["saved_s"] == pytest.approx(-0.2)


def test_a_saving_in_one_half_counts():
    g = governor()
    run(g, WARM_UP + TRIAL, {0: 0.0, 1: 0.0, 2: 0.3, 3: 0.0})  # only layer 2's prefetch pays
    assert g.decisions[0]["prefetch"] and g.decisions[0]["saved_s"] == pytest.approx(0.3)


def test_the_verdict_weighs_what_a_run_takes_not_its_typical_pass():
    # Prefetching costs 2 ms a layer in most passes and saves 50 ms a layer in every fourth (a
    # token whose experts are not resident): the median pass is slower, the run faster.
    g = governor()
    run(g, WARM_UP, dict.fromkeys(LAYERS, 0.0))
    for i in range(TRIAL):
        run(g, 1, dict.fromkeys(LAYERS, 0.05 if i % 4 in (0, 1) and i % 8 < 4 else -0.002))
    (verdict,) = g.decisions
    assert verdict["prefetch"] and verdict["saved_s"] > 0 > verdict["median_saved_s"]


def test_a_preempted_pass_does_not_sway_the_verdict():
    g = PrefetchGovernor(LAYERS, WARM_UP, 16, HOLD)
    run(g, WARM_UP, dict.fromkeys(LAYERS, 0.0))
    for i in range(16):  # prefetching costs 1 ms a half; one pass lost 10 s in its second half to another process
        first_half_prefetches = g.enabled(0)
        g.split(2.0 + 0.001 * first_half_prefetches)
        g.passed(0.0, 4.0 + 0.001 + (10.0 if i == 4 else 0.0), 1)
    (verdict,) = g.decisions
    assert not verdict["prefetch"] and verdict["saved_s"] == pytest.approx(-0.002)  # both halves


def test_passes_are_compared_only_with_passes_of_as_many_tokens():
    g = PrefetchGovernor(LAYERS, WARM_UP, 16, HOLD)
    run(g, WARM_UP, dict.fromkeys(LAYERS, 0.0))
    for i in range(16):  # prefill passes of 512 tokens in which prefetching costs, among one-token steps
        if i % 3 == 2:
            run(g, 1, dict.fromkeys(LAYERS, -5.0), n_tokens=512)
        else:
            run(g, 1, dict.fromkeys(LAYERS, 0.1))
    (verdict,) = g.decisions
    assert verdict["tokens"] == 1 and verdict["prefetch"]


def test_a_trial_with_too_few_comparable_passes_runs_again():
    g = governor()
    run(g, WARM_UP, dict.fromkeys(LAYERS, 0.0))
    for i in range(TRIAL):
        run(g, 1, dict.fromkeys(LAYERS, 0.1), n_tokens=i + 1)  # no two passes of as many tokens
    assert g.phase == "trial" and not g.decisions
    run(g, TRIAL, dict.fromkeys(LAYERS, 0.1))
    assert g.phase == "on"


def test_a_pass_that_never_reached_the_split_is_not_timed():
    g = governor()
    run(g, WARM_UP, dict.fromkeys(LAYERS, 0.0))
    for _ in range(TRIAL):
        g.passed(0.0, 1.0, 1)
    assert g.phase == "trial" and not g.decisions


def test_reset_starts_from_the_warm_up():
    g = governor()
    run(g, WARM_UP + TRIAL, dict.fromkeys(LAYERS, -0.1))
    assert not g.enabled(0)
    g.reset()
    assert g.phase == "warm-up" and g.enabled(0) and g.summary() == {
        "phase": "warm-up", "passes": 0, "layer_share_on": 0.0, "decisions": []}


def test_describe_says_the_latest_verdict():
    g = governor()
    assert describe(g.summary()) == "governor: warm-up, prefetched in 0 % of 0 passes' layers; no verdict yet"
    run(g, WARM_UP + TRIAL, dict.fromkeys(LAYERS, -0.001))
    assert describe(g.summary()) == (
        f"governor: off, prefetched in 60 % of {WARM_UP + TRIAL} passes' layers; last verdict at pass "
        f"{WARM_UP + TRIAL}: off, prefetching cost 4.0 ms a 1-token pass")


def test_the_governor_needs_two_halves():
    with pytest.raises(ValueError, match="two at least"):
        PrefetchGovernor([5])


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


def test_a_layer_that_does_not_prefetch_predicts_nothing_and_results_do_not_change(q4_path, tmp_path):
    ids = list(range(3, 3 + 4 + STEPS))
    sidecar = tmp_path / "preds.pred.gguf"
    with qmoe.load(q4_path) as plain:
        reference = decode(plain, ids)
        hp, layers = plain.net.hp, plain.net.moe_layers
        write_sidecar(sidecar, random_predictors(q4_path, layers, hp.n_embd, hp.n_expert, hp.n_expert_used))
    options = OffloadOptions(ram_budget="50%", prefetch="pre-attn", predictors=str(sidecar))
    with qmoe.load(q4_path, offload=options) as m:
        g = m.prefetcher.governor = PrefetchGovernor(layers, WARM_UP, TRIAL, HOLD)
        made, arms = [], []
        report = g.passed

        def watched(start: float, end: float, n_tokens: int) -> None:
            arms.append(tuple(g.enabled(layer) for layer in layers))
            made.append(m.prefetcher.scorer.stats.predictions - sum(made))
            report(start, end, n_tokens)

        g.passed = watched
        assert all(torch.equal(a, b) for a, b in zip(decode(m, ids), reference, strict=True))
        stats = m.offload_stats()
    first, second = (True, False), (False, True)
    assert arms[:WARM_UP + TRIAL] == [(True, True)] * WARM_UP + [first, second] * (TRIAL // 2)
    assert made == [sum(on) for on in arms]  # a prediction for each layer that prefetches, and none else
    assert len(g.decisions) == 1 and stats["prefetch"]["governor"]["passes"] == len(arms) == 1 + STEPS
    assert "governor: " in format_table(stats)


def test_always_prefetch_predicts_in_every_pass(q4_path):
    options = OffloadOptions(ram_budget="50%", prefetch="cross-layer", govern=False)
    with qmoe.load(q4_path, offload=options) as m:
        assert m.prefetcher.governor is None
        decode(m, list(range(3, 3 + 4 + STEPS)))
        stats = m.offload_stats()
    assert stats["prefetch"]["predictions"] == (1 + STEPS) * (len(m.net.moe_layers) - 1)
    assert stats["prefetch"]["governor"] is None and "governor" not in format_table(stats)


def test_cli_says_the_verdict_and_takes_always_prefetch(q4_path, capsys):
    run_args = ["run", str(q4_path), "-p", "x", "-n", "4", "--ram-budget", "30%", "--prefetch", "cross-layer", "--stats"]
    assert main(run_args) == 0
    assert "governor: warm-up" in capsys.readouterr().err
    assert main(run_args + ["--always-prefetch"]) == 0
    assert "governor" not in capsys.readouterr().err
    assert main(["run", str(q4_path), "-p", "x", "--always-prefetch"]) == 1
    assert "--always-prefetch only apply with an expert store" in capsys.readouterr().err
    assert main(["run", str(q4_path), "-p", "x", "--ram-budget", "30%", "--always-prefetch"]) == 1
    assert "--always-prefetch applies to --prefetch pre-attn and cross-layer, not none" in capsys.readouterr().err

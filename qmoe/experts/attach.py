"""Wiring expert offloading into a loaded model: the store, its compute, the prefetcher.

    offload = attach(net, file, options, device, n_ctx, n_batch)  # MoE layers compute through the store
    offload.stats()                                # once every prediction and transfer is done
    offload.close()

`attach` first resolves `--ram-budget auto` (budget.py): a model whose experts fit
the memory available gets no store at all (attach returns None, unless a fast tier
was asked for), one whose experts do not gets a RAM pool of what is left, read with
O_DIRECT. It then replaces each MoE layer's `experts` (the kernels on the memory-mapped
file) with `StoreExperts` over one `ExpertStore`, chooses the prefetch policy from
the options (loading and checking predictors for pre-attn), and starts a
`Prefetcher` that observes the forward pass. The engine only passes the
Prefetcher to the forward pass as its observer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from qmoe.errors import QmoeError
from qmoe.experts.budget import RunSizes, choose_ram_budget, mem_available, run_sizes
from qmoe.experts.compute import StoreExperts
from qmoe.experts.options import OffloadOptions
from qmoe.experts.prefetch import (
    CrossLayerPolicy,
    OraclePolicy,
    Policy,
    PreAttentionPolicy,
    Prefetcher,
    RoutingTrace,
)
from qmoe.experts.slabs import ExpertSlabs
from qmoe.experts.stats import report
from qmoe.experts.store import ExpertStore
from qmoe.gguf_file import GGUFFile
from qmoe.models.base import MoE, Transformer
from qmoe.predictor.metrics import default_k_prime
from qmoe.predictor.runtime import load_predictors


@dataclass
class Offload:
    """A model's expert offloading: the store, the compute over it, and the prefetcher (if any)."""

    store: ExpertStore
    experts: StoreExperts
    prefetcher: Prefetcher | None

    def stats(self) -> dict:
        """The statistics (stats.py) once every pending prediction and transfer is done."""
        if self.prefetcher is not None:
            self.prefetcher.drain()
        self.store.drain()
        return self.snapshot()

    def snapshot(self) -> dict:
        """The statistics as they stand, without waiting for anything (a live server's /metrics)."""
        scores = self.prefetcher.scorer if self.prefetcher is not None else None
        with self.store.lock:
            if scores is None:
                return report(self.store.stats, None, self.store.describe())
            governor = self.prefetcher.governor
            with scores.lock:
                return report(self.store.stats, scores.stats, self.store.describe(),
                              governor.summary() if governor is not None else None)

    def reset(self) -> None:
        """Empty the tiers and zero the statistics (a cold start, which the governor measures anew)."""
        if self.prefetcher is not None:
            self.prefetcher.drain()
            self.prefetcher.scorer.reset()
            if self.prefetcher.governor is not None:
                self.prefetcher.governor.reset()
        self.store.clear()

    def reset_stats(self) -> None:
        """Zero the statistics, keeping what the tiers hold (e.g. to measure decode apart from prefill)."""
        if self.prefetcher is not None:
            self.prefetcher.drain()
            self.prefetcher.scorer.reset()
        self.store.reset_stats()

    def close(self) -> None:
        """Stop the prefetch and transfer threads. Idempotent."""
        if self.prefetcher is not None:
            self.prefetcher.close()
        self.store.close()


def attach(net: Transformer, file: GGUFFile, options: OffloadOptions, device: torch.device,
           n_ctx: int, n_batch: int, say: Callable[[str], None] = print) -> Offload | None:
    """Serve every MoE layer's routed experts of `net` (loaded from `file`) from an ExpertStore.

    n_ctx, n_batch: the run's context and prefill batch, which `auto` leaves memory for.
    say: where `auto` tells the user, in one line, what it chose when it made a pool.
    None: `auto` found that the experts fit, and no other tier was asked for.
    """
    moe = [block.ffn for block in net.blocks if isinstance(block.ffn, MoE)]
    if not moe and options.auto_ram and not options.has_fast_tier:
        return None  # nothing routed to offload, nothing asked for
    file_experts = moe[0].experts if moe else None  # the kernels on the mapped file (MmapExperts), shared
    slabs = ExpertSlabs(file.path, {m.layer: file_experts.tensors[m.layer] for m in moe})
    if options.auto_ram:
        options = _resolve_auto(options, run_sizes(net.hp, file, slabs, n_ctx, n_batch), say)
        if options is None:
            return None
    store = ExpertStore(slabs, options, device)
    try:
        experts = StoreExperts(store, file_experts)
        for m in moe:
            m.experts = experts
        policy = _policy(net, file, options, device, {m.layer: m.router for m in moe})
    except BaseException:
        store.close()
        raise
    prefetcher = None
    if policy is not None:
        norms = [block.attn_norm for block in net.blocks]
        worker = options.predict_in == "worker" or (options.predict_in == "auto" and device.type == "cuda")
        prefetcher = Prefetcher(store, policy, net.moe_layers, norms, options.lookahead, worker, options.govern)
    return Offload(store, experts, prefetcher)


def _resolve_auto(options: OffloadOptions, sizes: RunSizes, say: Callable[[str], None]) -> OffloadOptions | None:
    """`--ram-budget auto` made a size (with O_DIRECT reads), or no pool; None: no store at all."""
    choice = choose_ram_budget(sizes, mem_available())
    if choice.budget is not None:
        say(f"--ram-budget auto: {choice.message}")
        return replace(options, ram_budget=choice.budget, direct_io=True)
    if options.has_fast_tier:
        return replace(options, ram_budget=None)
    if options.prefetch != "none":
        say(f"--ram-budget auto: {choice.message}; --prefetch {options.prefetch} has no store to fill "
            "(give --ram-budget SIZE for one)")
    return None


def _policy(net: Transformer, file: GGUFFile, options: OffloadOptions, device: torch.device,
            routers: dict[int, torch.Tensor]) -> Policy | None:
    hp = net.hp
    if options.k_prime is not None and options.k_prime > hp.n_expert:
        raise QmoeError(f"--k-prime {options.k_prime} exceeds the model's {hp.n_expert} experts")
    if options.prefetch == "none":
        return None
    if options.prefetch == "oracle":
        return OraclePolicy(RoutingTrace())  # predicts nothing until the engine replays a recording
    if options.prefetch == "cross-layer":
        return CrossLayerPolicy(routers, options.k_prime or _candidates(default_k_prime(hp.n_expert_used), hp))
    predictors = load_predictors(file, options.predictors, net.moe_layers, device)
    return PreAttentionPolicy(predictors, options.k_prime or _candidates(predictors.k_prime, hp))


def _candidates(k_prime: int, hp) -> int:
    """Without --k-prime, a policy names twice its k' candidates, ranked, and the store admits
    what each rank's measured precision allows (admission.py)."""
    return min(hp.n_expert, 2 * k_prime)

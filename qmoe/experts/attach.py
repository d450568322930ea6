"""Wiring expert offloading into a loaded model: the store, its compute, the prefetcher.

    offload = attach(net, file, options, device)   # every MoE layer now computes through the store
    offload.stats()                                # once every prediction and transfer is done
    offload.close()

`attach` replaces each MoE layer's `experts` (the kernels on the memory-mapped
file) with `StoreExperts` over one `ExpertStore`, chooses the prefetch policy from
the options (loading and checking predictors for pre-attn), and starts a
`Prefetcher` that observes the forward pass. The engine only passes the
Prefetcher to the forward pass as its observer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmoe.errors import QmoeError
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
            with scores.lock:
                return report(self.store.stats, scores.stats, self.store.describe())

    def reset(self) -> None:
        """Empty the tiers and zero the statistics (a cold start)."""
        if self.prefetcher is not None:
            self.prefetcher.drain()
            self.prefetcher.scorer.reset()
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


def attach(net: Transformer, file: GGUFFile, options: OffloadOptions, device: torch.device) -> Offload:
    """Serve every MoE layer's routed experts of `net` (loaded from `file`) from an ExpertStore."""
    moe = [block.ffn for block in net.blocks if isinstance(block.ffn, MoE)]
    file_experts = moe[0].experts  # the kernels on the mapped file (MmapExperts), shared by every layer
    slabs = ExpertSlabs(file.path, {m.layer: file_experts.tensors[m.layer] for m in moe})
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
        prefetcher = Prefetcher(store, policy, net.moe_layers, norms, options.lookahead, worker)
    return Offload(store, experts, prefetcher)


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
        return CrossLayerPolicy(routers, options.k_prime or default_k_prime(hp.n_expert_used))
    predictors = load_predictors(file, options.predictors, net.moe_layers, device)
    return PreAttentionPolicy(predictors, options.k_prime or predictors.k_prime)

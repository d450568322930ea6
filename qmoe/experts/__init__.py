"""Routed experts kept within memory budgets, and brought in ahead of use by predictions.

options.py   OffloadOptions: budgets, prefetch and miss policies (what the CLI's flags set)
slabs.py     the expert slab (the unit moved and accounted), its file ranges, explicit reads
cache.py     which slab is in which slot: LRU, pins, protection of predictions
tiers.py     the RAM pool of quantized slabs and the fast tier of dequantized ones
link.py      the simulated link that throttles transfers (a simulation, documented as such)
store.py     ExpertStore: the models' ExpertCompute over the tiers, with its transfer workers
prefetch.py  prefetch policies (cross-layer, pre-attn, oracle) and the worker that runs them
stats.py     hit rates, prediction precision/recall, bytes moved, stalls, overlap
"""

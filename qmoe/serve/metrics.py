"""/metrics: the scheduler's counters and the expert store's, in Prometheus' text format.

Counters end in _total (Prometheus computes rates from them); the tokens-per-second
gauges are over the time the model spent on each kind of work, so they say how
fast it runs while busy, whatever the request rate.
"""

from __future__ import annotations


def _ratio(num: float, den: float) -> float:
    return num / den if den else 0.0


class _Text:
    def __init__(self):
        self.lines: list[str] = []

    def add(self, name: str, kind: str, help: str, value: float | dict[str, float], label: str = "") -> None:
        self.lines += [f"# HELP qmoe_{name} {help}", f"# TYPE qmoe_{name} {kind}"]
        values = value if isinstance(value, dict) else {"": value}
        for key, v in values.items():
            labels = f'{{{label}="{key}"}}' if key else ""
            self.lines.append(f"qmoe_{name}{labels} {float(v):.9g}")


# (metric, type, help, Scheduler.snapshot() key); a dict value becomes one sample per label
SCHEDULER = [
    ("requests_total", "counter", "Requests finished, by how they ended.", "requests"),
    ("requests_rejected_total", "counter", "Requests answered 503 (queue full or shutting down).", "rejected"),
    ("requests_queued", "gauge", "Requests waiting for a slot.", "queued"),
    ("slots", "gauge", "Slots (sequences generated at once, --parallel).", "slots"),
    ("slots_busy", "gauge", "Slots serving a request.", "slots_busy"),
    ("prompt_tokens_total", "counter", "Prompt tokens prefilled (cached ones excluded).", "prompt_tokens"),
    ("prompt_cached_tokens_total", "counter", "Prompt tokens reused from a slot's KV cache.", "cached_tokens"),
    ("prompt_seconds_total", "counter", "Time spent prefilling.", "prompt_s"),
    ("generated_tokens_total", "counter", "Tokens generated.", "generated_tokens"),
    ("decode_steps_total", "counter", "Decode steps (each runs every generating slot's next token).",
     "decode_steps"),
    ("decode_seconds_total", "counter", "Time spent in decode steps.", "decode_s"),
    ("expert_uses_total", "counter", "Routed (token, expert) pairs in decode steps, all MoE layers.",
     "expert_uses"),
    ("expert_reads_total", "counter", "Distinct experts per MoE layer and decode step: the expert weights "
     "read; below expert_uses_total when batched tokens share experts.", "expert_reads"),
]
LABELS = {"requests_total": "finish"}


def render(scheduler: dict, store: dict | None) -> str:
    """`scheduler`: Scheduler.snapshot(); `store`: the expert store's summary (stats.report), if any."""
    m, s = _Text(), scheduler
    for name, kind, help, key in SCHEDULER:
        m.add(name, kind, help, s[key], LABELS.get(name, ""))
    m.add("prompt_tokens_per_second", "gauge", "Prefill speed while prefilling.",
          _ratio(s["prompt_tokens"], s["prompt_s"]))
    m.add("decode_tokens_per_second", "gauge", "Tokens generated per second of decoding, all slots together.",
          _ratio(s["generated_tokens"], s["decode_s"]))
    if store is not None:
        total = store["total"]
        m.add("expert_store_lookups_total", "counter", "Routed experts looked up in the store, by outcome.",
              {"hit": total["hits"], "late": total["late"], "miss": total["misses"]}, "outcome")
        m.add("expert_store_hit_rate", "gauge", "Share of looked-up experts ready in the compute tier.",
              total["hit_rate"] or 0.0)
        m.add("expert_store_stall_seconds_total", "counter", "Time the model waited for expert transfers.",
              store["stall_s"])
        m.add("expert_store_bytes_total", "counter", "Bytes moved into each tier.", store["bytes_into"], "tier")
        m.add("expert_store_prediction_recall", "gauge", "Share of routed experts that were predicted.",
              total["recall"] or 0.0)
    return "\n".join(m.lines) + "\n"

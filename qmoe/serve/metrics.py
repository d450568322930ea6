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


def render(scheduler: dict, store: dict | None) -> str:
    """`scheduler`: Scheduler.snapshot(); `store`: the expert store's summary (stats.report), if any."""
    m, s = _Text(), scheduler
    m.add("requests_total", "counter", "Requests finished, by how they ended.", s["requests"], "finish")
    m.add("requests_rejected_total", "counter", "Requests answered 503 (queue full or shutting down).",
          s["rejected"])
    m.add("requests_queued", "gauge", "Requests waiting for a slot.", s["queued"])
    m.add("slots", "gauge", "Slots (sequences generated at once, --parallel).", s["slots"])
    m.add("slots_busy", "gauge", "Slots serving a request.", s["slots_busy"])
    m.add("prompt_tokens_total", "counter", "Prompt tokens prefilled (cached ones excluded).", s["prompt_tokens"])
    m.add("prompt_cached_tokens_total", "counter", "Prompt tokens reused from a slot's KV cache.",
          s["cached_tokens"])
    m.add("prompt_seconds_total", "counter", "Time spent prefilling.", s["prompt_s"])
    m.add("prompt_tokens_per_second", "gauge", "Prefill speed while prefilling.",
          _ratio(s["prompt_tokens"], s["prompt_s"]))
    m.add("generated_tokens_total", "counter", "Tokens generated.", s["generated_tokens"])
    m.add("decode_steps_total", "counter", "Decode steps (each runs every generating slot's next token).",
          s["decode_steps"])
    m.add("decode_seconds_total", "counter", "Time spent in decode steps.", s["decode_s"])
    m.add("decode_tokens_per_second", "gauge", "Tokens generated per second of decoding, all slots together.",
          _ratio(s["generated_tokens"], s["decode_s"]))
    m.add("expert_uses_total", "counter", "Routed (token, expert) pairs in decode steps, all MoE layers.",
          s["expert_uses"])
    m.add("expert_reads_total", "counter", "Distinct experts per MoE layer and decode step: the expert weights "
          "read; below expert_uses_total when batched tokens share experts.", s["expert_reads"])
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

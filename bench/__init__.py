"""Benchmarks: each runs on its own (`python bench/<name>.py --help`); what they share is here."""

from __future__ import annotations

import os


def user_environment(**extra: str) -> dict[str, str]:
    """os.environ less the OpenMP settings that importing qmoe added (qmoe.OPENMP_DEFAULTS), plus
    `extra`: the environment of a child engine, so that llama.cpp (built with OpenMP) runs with
    the user's settings and a qmoe child makes its own choice, as it would outside a benchmark."""
    import qmoe

    env = {k: v for k, v in os.environ.items() if qmoe.OPENMP_DEFAULTS.get(k) != v}
    return env | extra

"""Fuzz the GGUF reader: mutated files must be refused with GGUFFormatError or read consistently.

Runs the random mutations of tests/test_malformed.py (overwritten bytes, replaced and nudged
integer fields, cuts, splices of a small valid GGUFWriter file) at scale through `GGUFFile`.
Anything else is a finding: another exception, a case that runs past the time limit, or an
accepted file whose tensors are misaligned, overlap, or leave the file. Each finding's input is
saved so it can be replayed.

    python -m bench.fuzz_gguf --cases 10000 [--seed 0] [--out out/fuzz_gguf]

Writes fuzz_gguf.json (counts, findings) to --out; exits 1 if there were findings.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import traceback
from pathlib import Path

from hypothesis import HealthCheck, Phase, given, seed, settings

from tests.test_malformed import CASE_SECONDS, mutated_files, open_and_check, time_limit, write_seed_file


def fuzz(n_cases: int, random_seed: int, out: Path) -> dict:
    """Run `n_cases` mutated files through the reader; return the summary written to `out`."""
    out.mkdir(parents=True, exist_ok=True)
    counts = {"cases": 0, "accepted": 0, "refused": 0}
    findings: list[dict] = []
    with tempfile.TemporaryDirectory() as scratch:
        seed_bytes = write_seed_file(Path(scratch) / "seed.gguf")
        path = Path(scratch) / "case.gguf"

        @seed(random_seed)
        @settings(max_examples=n_cases, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        @given(mutated_files(seed_bytes))
        def one_case(data: bytes) -> None:
            counts["cases"] += 1
            path.write_bytes(data)
            try:
                with time_limit(CASE_SECONDS):
                    counts["accepted" if open_and_check(path) else "refused"] += 1
            except Exception as e:  # noqa: BLE001 - another error, a Hang or a failed check: a finding
                saved = out / f"finding-{len(findings)}.gguf"
                saved.write_bytes(data)
                frame = traceback.extract_tb(e.__traceback__)[-1]
                findings.append({
                    "exception": type(e).__name__,
                    "message": str(e)[:500],
                    "where": f"{frame.filename}:{frame.lineno} in {frame.name}",
                    "input": str(saved),
                })  # fmt: skip

        start = time.perf_counter()
        one_case()
        seconds = time.perf_counter() - start
    summary = {
        **counts,
        "findings": len(findings),
        "distinct_findings": sorted({(f["exception"], f["where"]) for f in findings}),
        "seconds": round(seconds, 1),
        "cases_per_second": round(counts["cases"] / seconds, 1),
        "seed": random_seed,
        "details": findings[:100],
    }
    (out / "fuzz_gguf.json").write_text(json.dumps(summary, indent=2))
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="mutated files to try (default 10000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the mutations")
    parser.add_argument(
        "--out", type=Path, default=Path("out/fuzz_gguf"), help="folder for the JSON and findings"
    )
    args = parser.parse_args()
    summary = fuzz(args.cases, args.seed, args.out)
    print(
        f"{summary['cases']} cases in {summary['seconds']} s: {summary['refused']} refused with "
        f"GGUFFormatError, {summary['accepted']} accepted and consistent, {summary['findings']} findings"
    )
    for exception, where in summary["distinct_findings"]:
        print(f"  finding: {exception} at {where}")
    print(f"summary: {args.out / 'fuzz_gguf.json'}")
    return 1 if summary["findings"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

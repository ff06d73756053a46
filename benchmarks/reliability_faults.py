"""The fault tests behind ``benchmarks/results/reliability.json``'s ``faults`` section,
each marked as a real injected fault or as a check, run under pytest with their outcomes.

A *fault* is something a cluster really does to a run, made to happen for real on
loopback (a process SIGKILLed, the S3 server stopped or silent or throttling, bytes
flipped, a folder that refuses writes); the test then checks what the run did. A *check*
is not a fault: a precondition (the poison really poisons) or a unit test on constructed
exceptions and injected waits. Only faults count towards ``survived``.

The section's shape::

    "faults": {
      "shape": "...",              # this description, one line
      "injected": [ENTRY, ...],    # real faults
      "checks":   [ENTRY, ...],    # preconditions and unit tests (not counted)
      "survived": N, "of": M       # injected entries whose outcome is "passed"
    }
    ENTRY = {"test": "tests.MODULE::NAME", "fault": "what happened", "outcome":
             "passed" | "failed" | "error" | "skipped", "seconds": S,
             "command": "the pytest command that produced this outcome"}

Run from the repository root; without TESTS every one runs (``reliability_load.py
--faults`` does that), with TESTS only those, their entries replaced in ``--json``::

    python benchmarks/reliability_faults.py [TEST ...] [--json benchmarks/results/reliability.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Any

from common import ROOT

FAULTS = "tests/test_faults.py"
STORAGE = "tests/test_storage_faults.py"
THROTTLE = f"{STORAGE}::test_throttled_writes_are_retried_and_counted_in_the_sidecar"
# pytest id -> (kind, what happened)
CATALOGUE: dict[str, tuple[str, str]] = {
    f"{FAULTS}::test_an_actor_killed_mid_shard_is_replaced_and_its_shard_regenerated": (
        "fault",
        "inversion actor SIGKILLed mid-shard",
    ),
    f"{FAULTS}::test_writes_retry_with_backoff_through_a_10_second_s3_outage": (
        "fault",
        "SeaweedFS stopped 10 s mid-run, restarted",
    ),
    f"{FAULTS}::test_s3_down_past_the_retry_budget_fails_clearly_and_a_rerun_resumes": (
        "fault",
        "SeaweedFS down past the retry budget (Ray actors), then rerun",
    ),
    f"{FAULTS}::test_a_killed_driver_resumes_with_completed_shards_untouched": (
        "fault",
        "driver SIGKILLed mid-run, then rerun",
    ),
    f"{FAULTS}::test_a_corrupted_shard_is_named_by_inspect_and_by_the_loader": (
        "fault",
        "shard bytes flipped on S3 after writing",
    ),
    f"{FAULTS}::test_a_nonfinite_batch_is_retried_with_a_new_seed_recorded_and_never_written": (
        "fault",
        "NaN/inf loss or images in a batch",
    ),
    "tests/test_evaluation_training.py::test_a_killed_worker_resumes_from_the_last_checkpoint": (
        "fault",
        "Ray Train worker SIGKILLed during KD",
    ),
    f"{STORAGE}::test_a_silent_endpoint_fails_a_write_within_the_documented_budget": (
        "fault",
        "S3 endpoint accepts connections and never answers",
    ),
    f"{THROTTLE}[503-SlowDown]": ("fault", "S3 answers 503 SlowDown to 3 shard uploads"),
    f"{THROTTLE}[429-TooManyRequests]": ("fault", "S3 answers 429 to 3 shard uploads"),
    f"{STORAGE}::test_a_folder_made_read_only_mid_run_stops_it_at_once_and_a_rerun_completes": (
        "fault",
        "run folder made immutable mid-run (permission denied), then fixed and rerun",
    ),
    f"{STORAGE}::test_a_shard_written_after_its_folder_was_listed_reads_back": (
        "check",
        "regression: a listing cached before a shard write does not hide the shard",
    ),
    f"{FAULTS}::test_the_poison_really_makes_the_batch_nonfinite": (
        "check",
        "precondition: the NaN/inf poison really makes a batch non-finite",
    ),
    f"{FAULTS}::test_only_transient_storage_errors_are_retried_within_a_bounded_budget": (
        "check",
        "unit: which constructed errors are transient; waits with a pinned random source",
    ),
    f"{STORAGE}::test_retry_waits_are_uniform_up_to_the_doubling_bound_and_capped": (
        "check",
        "unit: full-jitter waits are uniform and capped (injected random source)",
    ),
    f"{STORAGE}::test_many_actors_do_not_retry_in_lockstep_and_the_total_wait_is_bounded": (
        "check",
        "unit: 50 actors' waits are spread, each total within the budget (no sleeping)",
    ),
}
SHAPE = (
    "injected: real faults on loopback; checks: preconditions and unit tests (not faults); "
    "each entry {test, fault, outcome, seconds, command}; survived: injected entries passed, "
    "of: injected entries"
)


def junit_id(case: ElementTree.Element) -> str:
    """``tests/module.py::name`` from a junit ``testcase`` (classname ``tests.module``)."""
    return f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"


def run_tests(tests: list[str]) -> list[dict[str, Any]]:
    """``tests`` under pytest; an entry per test case that ran (see the module's shape)."""
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as work:
        report = Path(work) / "faults.xml"
        subprocess.run([*command, f"--junitxml={report}"], cwd=ROOT, env=env, check=False)
        cases = list(ElementTree.parse(report).getroot().iter("testcase"))
    entries = []
    for case in cases:
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
        test = junit_id(case)
        entries.append(
            {
                "test": test,
                "fault": CATALOGUE.get(test, ("fault", "(not in the catalogue)"))[1],
                "outcome": outcome,
                "seconds": round(float(case.get("time", 0)), 1),
                "command": "python -m pytest -q " + " ".join(tests),
            }
        )
    return entries


def section(entries: list[dict[str, Any]]) -> dict[str, Any]:
    """The ``faults`` section from entries, sorted into injected faults and checks."""
    injected = [e for e in entries if CATALOGUE.get(e["test"], ("fault",))[0] == "fault"]
    checks = [e for e in entries if e not in injected]
    return {
        "shape": SHAPE,
        "injected": injected,
        "checks": checks,
        "survived": sum(e["outcome"] == "passed" for e in injected),
        "of": len(injected),
    }


def run_faults(tests: list[str] | None = None, previous: dict | None = None) -> dict[str, Any]:
    """Run ``tests`` (default: every catalogued one, by file) and return the section, with
    the entries of ``previous`` (a section) that were not rerun kept as they were."""
    chosen = tests or sorted({test.split("::")[0] for test in CATALOGUE})
    fresh = run_tests(chosen)
    rerun = {e["test"] for e in fresh}
    kept = [e for e in (previous or {}).get("injected", []) + (previous or {}).get("checks", [])]
    return section([e for e in kept if e["test"] not in rerun] + fresh)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tests", nargs="*", help="pytest ids (default: every catalogued test)")
    parser.add_argument("--json", type=Path, help="results file whose faults section to update")
    args = parser.parse_args()
    results = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    results["faults"] = run_faults(args.tests, results.get("faults"))
    print(json.dumps(results["faults"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()

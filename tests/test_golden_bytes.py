"""The same configs give the same shard bytes as recorded (``tests/golden.py``).

The record was made on one machine kind (its torch, CPU capability and thread count are
stored with it); elsewhere float kernels may differ, so the comparison is skipped there
and says why.
"""

from __future__ import annotations

import json

import pytest
import torch
from golden import KINDS, RECORD, environment, produce


@pytest.mark.slow
@pytest.mark.timeout(900)  # a run of the demo config, on 2 busy cores
@pytest.mark.parametrize("kind", KINDS)
def test_shards_have_the_recorded_bytes(kind: str) -> None:
    record = json.loads(RECORD.read_text())
    here = {**environment(), "threads": str(torch.get_num_threads())}
    recorded = record["environment"]
    if any(here.get(key) != value for key, value in recorded.items()):
        pytest.skip(f"recorded on {recorded}, this machine is {here}")
    assert produce(kind) == record["runs"][kind]

"""The actor pool on a real local Ray: actors that wait for room are reported while the
run goes on with the ones that started."""

from __future__ import annotations

import logging
import re
import time

from pipeline.config.sections import RuntimeConfig
from pipeline.execution import executor
from pipeline.execution.executor import ActorPool


def test_a_pool_says_how_many_actors_wait_for_room_and_runs_on_the_others(
    ray_cluster, caplog, monkeypatch
) -> None:
    class Slow:  # defined here: Ray ships it to the actors by value
        def __init__(self, device: str, threads: int) -> None:
            self.device = device

        def run(self, task: int) -> tuple[int, str]:
            time.sleep(0.4)
            return task, self.device

    monkeypatch.setattr(executor, "WAIT_REPORT_S", 0.2)
    caplog.set_level(logging.INFO, logger="dreamshard.executor")
    # 3 one-CPU actors asked for on a 2-CPU cluster: the third never finds room
    runtime = RuntimeConfig(executor="ray", device="cpu", max_workers=3, progress=False)
    with ActorPool(Slow, (), runtime, label="task") as pool:
        results = pool.map(range(8))
        assert len(pool.actors) == 3 and len(pool.starting) >= 1  # the third never started
    assert sorted(results) == [(task, "cpu") for task in range(8)]
    reports = [r.getMessage() for r in caplog.records if "wait for room" in r.getMessage()]
    assert reports, [r.getMessage() for r in caplog.records]
    # the last report comes while tasks run: at least one actor ready, the third waiting
    # (2 of 3 unless the second actor started later than every task ended)
    found = re.match(r"(\d) of 3 actors ready; (\d) wait for room on the cluster", reports[-1])
    assert found, reports[-1]
    ready, waiting = int(found[1]), int(found[2])
    assert ready >= 1 and waiting >= 1 and ready + waiting == 3
    assert "'num_cpus': 1" in reports[-1] and "an autoscaler adds nodes" in reports[-1]

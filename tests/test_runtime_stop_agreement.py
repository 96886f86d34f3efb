"""StopAgreement: every worker stops at the same step, one step after a signal on any of them,
exactly at --stop-after, and not at all without either (3 gloo workers, one spawn)."""
from types import SimpleNamespace

import torch

from trainops.distributed import spawn
from trainops.runtime.worker import STOP, StopAgreement

# (rank that gets a signal, at which step, --stop-after) -> the step every worker stops at
SCENARIOS = [((1, 5, 0), 6), ((2, 1, 0), 2), ((None, 0, 7), 7), ((None, 0, 0), None), ((0, 4, 5), 5),
             ((0, 9, 5), 5)]


def _stop_steps(rank, world):
    stops = []
    for (signal_rank, signal_step, stop_after), _ in SCENARIOS:
        agreement = StopAgreement(torch.device("cpu"))
        cfg = SimpleNamespace(stop_after=stop_after)
        STOP["flag"] = False
        stopped = None
        for step in range(1, 20):
            if rank == signal_rank and step == signal_step:
                STOP["flag"] = True
            if agreement.poll(cfg, step)[0]:
                stopped = step
                break
        agreement.settle()
        stops.append(stopped)
    STOP["flag"] = False
    return stops


def test_every_worker_stops_at_the_same_agreed_step():
    expected = [step for _, step in SCENARIOS]
    assert spawn(_stop_steps, 3, backend="gloo") == [expected] * 3

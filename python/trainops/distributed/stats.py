"""Byte and call counters of the collectives trainops issues (for demos, logs and the runtime).

Bytes are the logical payload one rank sends to the other ranks:

* two-shot quantized all-reduce: ``(W - 1) * P`` in the all-to-all plus ``(W - 1) * P``
  in the all-gather, with ``P`` the packed size (codes + fp32 scales) of one rank's chunk;
* full-precision all-reduce: ``2 * (W - 1) * ceil(nbytes / W)``, what a bandwidth-optimal
  ring all-reduce (gloo and NCCL for large messages) sends per rank.

Both count what leaves the rank, so the ratio of the two is the saving on the wire.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class CommStats:
    """Running totals; ``reset()`` zeroes them, ``as_dict()`` for logging."""

    bytes_sent: int = 0
    quantized_calls: int = 0
    full_precision_calls: int = 0
    elements: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def calls(self) -> int:
        return self.quantized_calls + self.full_precision_calls

    def record(self, nbytes: int, numel: int, quantized: bool) -> None:
        # Updated from the background communication thread too.
        with self._lock:
            self.bytes_sent += int(nbytes)
            self.elements += int(numel)
            if quantized:
                self.quantized_calls += 1
            else:
                self.full_precision_calls += 1

    def reset(self) -> None:
        with self._lock:
            self.bytes_sent = self.quantized_calls = self.full_precision_calls = self.elements = 0

    def as_dict(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "calls": self.calls, "quantized_calls": self.quantized_calls,
                "full_precision_calls": self.full_precision_calls, "elements": self.elements}


_GLOBAL = CommStats()


def comm_stats() -> CommStats:
    """The process-wide counters every trainops collective adds to."""
    return _GLOBAL


def ring_all_reduce_bytes(nbytes: int, world_size: int) -> int:
    """Bytes one rank sends in a bandwidth-optimal ring all-reduce of ``nbytes``."""
    if world_size <= 1:
        return 0
    return 2 * (world_size - 1) * (-(-nbytes // world_size))

"""``metrics.jsonl``: one JSON row per step and per evaluation, written by rank 0 only.

On resume the rows logged after the checkpoint are dropped (they are logged again), and a
partial last line of a killed run is dropped with a warning."""
from __future__ import annotations

import json
import os
import sys

from trainops.runtime.config import ConfigError

__all__ = ["MetricsLog"]


class MetricsLog:
    on_row = None  # also called with every row logged (TensorBoard, log lines)

    def __init__(self, path, enabled, resume_step):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and os.path.exists(path):
            rows = self._read(path)  # drop what was logged after the checkpoint
            # an eval row at the checkpoint's step is logged again when the phase ends
            keep = [ln for ln, r in rows if r["global_step"] < resume_step
                    or (r["global_step"] == resume_step and "event" not in r)]
            with open(path, "w") as fh:
                fh.writelines(keep)
        elif enabled and resume_step is None:
            open(path, "w").close()

    @staticmethod
    def _read(path):
        """(line, row) pairs; a partial last line (the run was killed while writing it) is
        dropped with a warning, any other unreadable line is an error naming it."""
        with open(path, "rb") as fh:
            lines = fh.read().decode("utf-8", errors="replace").splitlines(keepends=True)
        rows = []
        for no, ln in enumerate(lines, 1):
            try:
                row = json.loads(ln)
                if not isinstance(row, dict) or not isinstance(row.get("global_step"), int):
                    raise ValueError("no global_step")
            except ValueError:
                if no == len(lines):
                    print(f"trainops train: warning: {path}: dropped a partial last line "
                          f"({len(ln.encode())} bytes; the run was stopped while writing it)", file=sys.stderr)
                    break
                raise ConfigError(f"--resume: {path}:{no} is not a metrics row; fix or remove that line") from None
            rows.append((ln if ln.endswith("\n") else ln + "\n", row))
        return rows

    def log(self, **row):
        if self.enabled:
            with open(self.path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            if self.on_row is not None:
                self.on_row(row)

"""Data faults (a retried or skipped shard, an undecodable sample): one line each in the run's log when they
happen, counted where the batches arrive, and written to TensorBoard when the loader is given a log folder.

A fault happens in whichever process reads the shard (a DataLoader worker or the main process). It is warned
about there at once (`DataFaultWarning`: URL and error), and travels to the main process inside the next
batch (`EVENTS`, removed by the loader before the batch is handed out), where `FaultLog` counts it:
`data/retries`, `data/timeouts`, `data/skipped_shards`, `data/bad_samples`, `data/replaced_samples`.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter, deque

EVENTS = "_data_events"  # batch key carrying the faults met since the previous batch of that worker

_COUNTERS = {
    "retry": "retries",
    "skipped_shard": "skipped_shards",
    "bad_sample": "bad_samples",
    "replaced": "replaced_samples",
}


class DataFaultWarning(UserWarning):
    """A shard or sample could not be read as it should; the message names the URL and the error."""


def describe(event: dict) -> str:
    """One log line for a fault event."""
    who = f"svq_fast.data rank {event.get('rank', 0)} worker {event.get('worker', 0)}"
    kind = event["kind"]
    if kind == "retry":
        what = "stalled" if event.get("timeout") else "failed"
        return f"{who}: {event['error']} ({what}; retry {event['attempt']} in {event['delay']:.1f} s)"
    if kind == "skipped_shard":
        tries = f" after {event['attempts']} attempts" if event.get("attempts") else ""
        error = event["error"].removeprefix(f"{event['url']}: ")
        return (
            f"{who}: skipped {event['url']}{tries} ({error}); its {event.get('lost', '?')} sample(s) in "
            "this run are replaced by padded repeats (batch counts stay equal on every rank)"
        )
    if kind == "bad_sample":
        return f"{who}: {event['error']}; sample replaced by a padded repeat"
    return f"{who}: {kind} {event}"


def warn(event: dict) -> None:
    if event["kind"] != "replaced":
        warnings.warn(describe(event), DataFaultWarning, stacklevel=2)


class FaultLog:
    """Counts the fault events that arrive with batches; writes them to TensorBoard under `log_dir` (if given)."""

    def __init__(self, log_dir: str | None = None, *, rank: int = 0):
        self.log_dir, self.rank = log_dir, rank
        self.counts: Counter = Counter()
        self.recent: deque = deque(maxlen=256)  # the latest retry / skip events, for inspection
        self._writer = None

    def record(self, events: list[dict], step: int) -> None:
        if not events:
            return
        for e in events:
            name = _COUNTERS.get(e["kind"], e["kind"])
            self.counts[name] += int(e.get("n", 1))
            if e.get("timeout"):
                self.counts["timeouts"] += 1
            if e["kind"] in ("retry", "skipped_shard"):
                self.recent.append(e)
        if self.log_dir:
            self._write(events, step)

    def scalars(self) -> dict[str, float]:
        names = ("retries", "timeouts", "skipped_shards", "bad_samples", "replaced_samples")
        return {f"data/{k}": float(self.counts.get(k, 0)) for k in names}

    def _write(self, events: list[dict], step: int) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self.log_dir, f"data_rank{self.rank}"))
        for k, v in self.scalars().items():
            self._writer.add_scalar(k, v, step)
        for e in events:
            if e["kind"] in ("retry", "skipped_shard", "bad_sample"):
                self._writer.add_text("data/faults", describe(e), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

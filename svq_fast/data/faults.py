"""Data faults (a retried or skipped shard, an undecodable sample): one line each in the run's log when they
happen, counted where the batches arrive, and written to TensorBoard when the loader is given a log folder.

A fault happens in whichever process reads the shard (a DataLoader worker or the main process). It is warned
about there at once (`DataFaultWarning`: URL and error), and travels to the main process inside the next
batch (`EVENTS`, removed by the loader before the batch is handed out), where `FaultLog` counts it:
`data/retries`, `data/timeouts`, `data/skipped_shards`, `data/bad_samples`, `data/replaced_samples`.

Bound: the loader also tells the log how many samples each batch held. Every `window` batches (the training
loaders use the run's logging window, log.every x grad_accum micro-batches) it closes a window:
`data/replaced_fraction` = samples replaced in the window (bad samples, samples of skipped or short shards) /
samples served in it. A window with faults prints one line to the run's log (stderr) naming up to 8 of them as
`shard:key`; TensorBoard gets `data/replaced_fraction` and the counters at every window end once the run has met
a fault (a clean run writes nothing). A window above `max_bad_fraction` raises TooManyBadSamples, naming the
shards and keys, before its last batch is handed out. Padding repeats of an exact epoch are not faults.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter, deque

EVENTS = "_data_events"  # batch key carrying the faults met since the previous batch of that worker

_COUNTERS = {
    "retry": "retries",
    "skipped_shard": "skipped_shards",
    "bad_sample": "bad_samples",
    "replaced": "replaced_samples",
}


class TooManyBadSamples(RuntimeError):
    """More than max_bad_fraction of a window's samples had to be replaced; the message names shards and keys."""


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


def _reason(event: dict) -> str:
    """An event's error without the URL it starts with (the caller names the URL)."""
    error = str(event.get("error", ""))
    for prefix in (f"{event.get('url', '')}: ", f"{event.get('url', '')} "):
        error = error.removeprefix(prefix)
    return error


def warn(event: dict) -> None:
    if event["kind"] != "replaced":
        warnings.warn(describe(event), DataFaultWarning, stacklevel=2)


class FaultLog:
    """Counts the fault events that arrive with batches; writes them to TensorBoard under `log_dir` (if given)."""

    def __init__(
        self,
        log_dir: str | None = None,
        *,
        rank: int = 0,
        max_bad_fraction: float | None = None,
        window: int = 10,
        out=None,
    ):
        if max_bad_fraction is not None and not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1] (or None), got {max_bad_fraction}")
        if window < 1:
            raise ValueError(f"window must be >= 1 batch, got {window}")
        self.log_dir, self.rank = log_dir, rank
        self.max_bad_fraction, self.window = max_bad_fraction, window
        self.out = out  # where window lines go (default sys.stderr, looked up when printing)
        self.counts: Counter = Counter()
        self.recent: deque = deque(maxlen=256)  # the latest retry / skip events, for inspection
        self.last_fraction = 0.0  # data/replaced_fraction of the last closed window
        self.skipped: dict[str, str] = {}  # url -> what happened, for the first 8 shards skipped in this run
        self._writer = None
        self._win = self._new_window(0)

    @staticmethod
    def _new_window(first: int) -> dict:
        return {"first": first, "batches": 0, "samples": 0, "replaced": 0, "bad": 0, "where": [], "shards": [],
                "lost": []}  # fmt: skip

    def record(self, events: list[dict], step: int) -> None:
        if not events:
            return
        win = self._win
        for e in events:
            name = _COUNTERS.get(e["kind"], e["kind"])
            self.counts[name] += int(e.get("n", 1))
            if e.get("timeout"):
                self.counts["timeouts"] += 1
            if e["kind"] in ("retry", "skipped_shard"):
                self.recent.append(e)
            if e["kind"] == "replaced":
                win["replaced"] += int(e.get("n", 1))
                where = e.get("url")
                if where and where not in win["lost"] and len(win["lost"]) < 8:
                    win["lost"].append(where)
            elif e["kind"] == "bad_sample":
                win["bad"] += 1
                if len(win["where"]) < 8:
                    win["where"].append(f"{e.get('url', '?')} ({_reason(e)})")
            elif e["kind"] == "skipped_shard":
                line = f"{e['url']} ({_reason(e)}; {e.get('lost', '?')} sample(s) lost)"
                if len(win["shards"]) < 8:
                    win["shards"].append(line)
                if e["url"] not in self.skipped and len(self.skipped) < 8:
                    self.skipped[e["url"]] = line
        if self.log_dir:
            self._write(events, step)

    def batch(self, samples: int, step: int) -> None:
        """A batch of `samples` samples (number `step` of this process) is about to be handed out: count it and
        close the window after `window` batches (may raise TooManyBadSamples)."""
        win = self._win
        win["batches"] += 1
        win["samples"] += samples
        if win["batches"] >= self.window:
            self.close_window(step)

    def close_window(self, step: int) -> float:
        """End the current window: log it (if it had faults), write TensorBoard, check the bound -> its fraction."""
        win, self._win = self._win, self._new_window(step + 1)
        fraction = win["replaced"] / win["samples"] if win["samples"] else 0.0
        self.last_fraction = fraction
        faulty = win["replaced"] or win["bad"] or win["shards"]
        if self.log_dir and sum(self.counts.values()):
            self._write([], step, fraction)
        if faulty:
            print(self._window_line(win, fraction, step), file=self.out or sys.stderr, flush=True)
        limit = self.max_bad_fraction
        if limit is not None and fraction > limit:
            self.close()
            raise TooManyBadSamples(self._stop_message(win, fraction, step))
        return fraction

    def _window_line(self, win: dict, fraction: float, step: int) -> str:
        seen = win["where"] + win["shards"]
        return (
            f"svq_fast.data rank {self.rank}: batches {win['first']}-{step}: {win['replaced']} of {win['samples']} "
            f"samples replaced (data/replaced_fraction {fraction:.3f}), {win['bad']} bad sample(s), "
            f"{len(win['shards'])} skipped shard(s)" + (f": {'; '.join(seen)}" if seen else "")
        )

    def _stop_message(self, win: dict, fraction: float, step: int) -> str:
        lines = [
            f"svq_fast.data rank {self.rank}: {win['replaced']} of the {win['samples']} samples in batches "
            f"{win['first']}-{step} had to be replaced ({fraction:.1%} > data.max_bad_fraction="
            f"{self.max_bad_fraction:g}); stopping instead of training on repeats and blanks.",
        ]
        if win["where"]:
            lines.append(f"bad samples (shard:key): {'; '.join(win['where'])}" + (" ..." if win["bad"] > 8 else ""))
        lost = [w for w in win["lost"] if w not in {x.split(" (")[0] for x in win["where"]}]
        if lost:
            lines.append(f"replaced positions of unreadable samples (shard, or shard:key): {'; '.join(lost)}")
        if self.skipped:
            lines.append(f"unreadable or short shards in this run: {'; '.join(self.skipped.values())}")
        lines.append(
            f"so far: {self.counts.get('bad_samples', 0)} bad samples, {self.counts.get('skipped_shards', 0)} skipped "
            f"shards, {self.counts.get('replaced_samples', 0)} replaced samples. Check or rewrite those shards "
            "(python -m svq_fast.data.make_shards), or raise --data.max_bad_fraction (1 = never stop)."
        )
        return "\n".join(lines)

    def scalars(self) -> dict[str, float]:
        names = ("retries", "timeouts", "skipped_shards", "bad_samples", "replaced_samples")
        return {f"data/{k}": float(self.counts.get(k, 0)) for k in names}

    def _write(self, events: list[dict], step: int, fraction: float | None = None) -> None:
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(os.path.join(self.log_dir, f"data_rank{self.rank}"))
        for k, v in self.scalars().items():
            self._writer.add_scalar(k, v, step)
        if fraction is not None:
            self._writer.add_scalar("data/replaced_fraction", fraction, step)
        for e in events:
            if e["kind"] in ("retry", "skipped_shard", "bad_sample"):
                self._writer.add_text("data/faults", describe(e), step)
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

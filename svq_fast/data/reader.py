"""Reading one shard URL as a stream of samples, through WebDataset's openers and tar iteration, with bounded
retries, backoff and stall timeouts.

Opening: local paths and `file:` URLs with `webdataset.gopen.gopen` (a plain file); `pipe:` commands and
`http(s)://` URLs (through `curl --fail`) as a `webdataset.gopen.Pipe` whose stderr is kept for the error
message; other schemes (gs:, ais:, hf:, ...) with `webdataset.gopen.gopen`'s own handlers. A pipe is read
through a watchdog: no byte for `timeout` seconds kills the command and raises `StreamTimeout` naming the URL.
At the end of a stream the command's exit status is checked, so a command that fails (a 404 under `curl
--fail`, a dropped connection: curl's "partial file", `aws s3 cp` of a missing key) is an error, not a short
shard.

Samples come from `webdataset.tariterators.tar_file_expander` + `group_by_keys` as (key, {suffix: bytes}).
Starting at sample k skips the first k samples' members without copying their bytes (WebDataset's
`select_files`); a stream is read sequentially, so for a remote shard this still transfers them.

`ShardCursor` reads runs of samples for the loader: it keeps the current stream open when the next run
continues it, and on a failure of a streamed shard re-opens it at the sample where it stopped, up to
`FaultPolicy.retries` times in a row without progress, sleeping `backoff * 2^(attempt - 1)` seconds
between tries. Then the shard is given up for this run of samples (the caller replaces what is missing) and,
for `cooldown` seconds, later runs of it are skipped without trying. Local files are not retried: their
damage does not go away by itself.
"""

from __future__ import annotations

import os
import select
import signal
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

from webdataset.gopen import Pipe, gopen
from webdataset.handlers import reraise_exception
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

_READ_CHUNK = 1 << 20


@dataclass(frozen=True, kw_only=True)
class FaultPolicy:
    """How hard to try a streamed shard before skipping it (local files are never retried)."""

    retries: int = 3  # failed attempts in a row (no sample read in between) tolerated before the shard is skipped
    backoff: float = 1.0  # seconds before the first retry, doubling each retry, at most 30 s
    timeout: float = 60.0  # seconds without a byte (or to connect) before an attempt fails
    cooldown: float = 300.0  # a skipped shard is not tried again for this long (per worker)

    def __post_init__(self):
        if self.retries < 0 or self.backoff < 0 or self.timeout <= 0 or self.cooldown < 0:
            raise ValueError(f"FaultPolicy needs retries >= 0, backoff >= 0, timeout > 0, cooldown >= 0; got {self}")

    @classmethod
    def of(cls, data_cfg) -> FaultPolicy:
        """The policy a DataConfig asks for (its stream_retries, stream_backoff, stream_timeout)."""
        return cls(retries=data_cfg.stream_retries, backoff=data_cfg.stream_backoff, timeout=data_cfg.stream_timeout)

    def delay(self, attempt: int) -> float:
        return min(30.0, self.backoff * 2 ** (attempt - 1))


class StreamError(OSError):
    """Reading a shard URL failed; the message names the URL (and stays readable when WebDataset's iterators
    append context to the exception's args)."""

    def __init__(self, msg: str):
        super().__init__(msg)
        self.msg = msg

    def __str__(self) -> str:
        return self.msg


def _why(e: BaseException) -> str:
    """An exception's own message, without the stream reprs WebDataset's tar iterators append to its args."""
    if isinstance(e, StreamError):
        return str(e)
    first = str(e.args[0]).split(" @ ")[0] if e.args else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


class StreamTimeout(StreamError):
    """A stream produced no data for the configured timeout."""


class ShortShard(StreamError):
    """A stream ended cleanly but with fewer samples than the index says."""


def is_stream(url: str) -> bool:
    """True for URLs read as a one-way stream (pipe:, http(s):, ...); False for local paths and file: URLs."""
    if url.startswith("pipe:"):
        return True
    scheme = urlparse(url).scheme
    return scheme not in ("", "file") and not (len(scheme) == 1 and os.name == "nt")


class _Watched:
    """A webdataset Pipe read through os.read with a stall timeout; EOF checks the command's exit status."""

    def __init__(self, pipe, url: str, timeout: float, stderr=None):
        self.pipe, self.url, self.timeout, self.stderr = pipe, url, timeout, stderr
        self.fd = pipe.stream.fileno()
        self.buf = bytearray()
        self.eof = False

    def _fill(self, n: int) -> None:
        while len(self.buf) < n and not self.eof:
            ready, _, _ = select.select([self.fd], [], [], self.timeout)
            if not ready:
                self.kill()
                raise StreamTimeout(f"{self.url}: no data for {self.timeout:g} s (stalled); attempt abandoned")
            chunk = os.read(self.fd, max(n - len(self.buf), _READ_CHUNK))
            if chunk:
                self.buf += chunk
            else:
                self.eof = True
                self._check_exit()

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            while not self.eof:
                self._fill(len(self.buf) + _READ_CHUNK)
            n = len(self.buf)
        self._fill(n)
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def drain(self) -> None:
        """Read to the end (tar padding after the last member) and check the exit status."""
        while not self.eof:
            self.buf.clear()
            self._fill(_READ_CHUNK)

    def _stderr_tail(self) -> str:
        if self.stderr is None:
            return ""
        try:
            self.stderr.seek(0)
            text = self.stderr.read()[-400:].decode(errors="replace").strip()
        except (OSError, ValueError):
            return ""
        return f": {text}" if text else ""

    def _check_exit(self) -> None:
        try:
            status = self.pipe.proc.wait(timeout=self.timeout)
        except Exception as e:  # a command that closed stdout but does not exit
            self.kill()
            msg = f"{self.url}: the command did not exit {self.timeout:g} s after its output ended"
            raise StreamTimeout(msg) from e
        if status not in self.pipe.ignore_status:
            raise StreamError(f"{self.url}: exit status {status}{self._stderr_tail()}")

    def kill(self) -> None:
        proc = self.pipe.proc
        if proc.poll() is None:
            try:  # the command runs in its own session: end its children too (a shell's pipeline)
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                proc.kill()
        try:
            proc.wait(timeout=10)
        except Exception:
            pass

    def close(self) -> None:
        """Stop reading (early or not): kill the command if it still runs, without checking its status."""
        self.kill()
        self.pipe.ignore_errors = True  # its own close/__del__ must not raise for a command we killed
        try:
            self.pipe.stream.close()
        except OSError:
            pass
        if self.stderr is not None:
            self.stderr.close()


def _curl(url: str, timeout: float) -> list[str]:
    # no curl-side retries: the bounded retries are ours (FaultPolicy), so they are counted and logged
    return ["curl", "--fail", "--silent", "--show-error", "--location", "--connect-timeout", f"{timeout:g}", url]


def open_url(url: str, timeout: float = 60.0):
    """An open binary stream of `url` (see the module docstring): a plain file, or a watched pipe."""
    if not is_stream(url):
        return gopen(url, "rb")
    stderr = tempfile.TemporaryFile()
    scheme = urlparse(url).scheme
    if url.startswith("pipe:"):
        cmd, shell = url[5:], True
    elif scheme in ("http", "https"):
        cmd, shell = _curl(url, timeout), False
    else:
        stderr.close()
        stream = gopen(url, "rb")
        if not isinstance(stream, Pipe):
            return stream
        return _Watched(stream, url, timeout)
    pipe = Pipe(cmd, mode="rb", shell=shell, bufsize=0, ignore_status=[141], stderr=stderr, start_new_session=True)
    return _Watched(pipe, url, timeout, stderr)


def _close(stream) -> None:
    try:
        stream.close()
    except OSError:
        pass


class _SkipFirst:
    """WebDataset `select_files` predicate: drop the members of the first n samples (and count samples)."""

    def __init__(self, n: int):
        self.n, self.seen, self.last = n, 0, None

    def __call__(self, fname: str) -> bool:
        key = base_plus_ext(fname)[0]
        if key is None:
            return False
        if key != self.last:
            self.last, self.seen = key, self.seen + 1
        return self.seen > self.n


def iter_samples(
    url: str, *, start: int = 0, timeout: float = 60.0, expected: int | None = None
) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {suffix: bytes}) for samples start, start + 1, ... of one shard, one attempt, no retries.

    A sample is yielded once it is known to be complete (the next one began, or the stream ended cleanly);
    errors raise StreamError / tarfile.TarError / OSError naming the URL. With `expected`, a stream that ends
    cleanly after fewer samples raises ShortShard (and withholds its last sample: it may be cut)."""
    stream = open_url(url, timeout)
    held = None
    try:
        skip = _SkipFirst(start)
        source = [{"url": url, "stream": stream}]
        files = tar_file_expander(source, handler=reraise_exception, select_files=skip, eof_value=None)
        try:
            for sample in group_by_keys(files, handler=reraise_exception):
                if held is not None:
                    yield held
                held = (sample["__key__"], {k: v for k, v in sample.items() if not k.startswith("__")})
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            if held is not None:  # complete: WebDataset yields a sample mid-stream once the next one begins
                yield held
            if isinstance(e, StreamError):
                raise
            raise StreamError(f"{url}: unreadable after sample {max(skip.seen - 1, 0)} ({_why(e)})") from e
        # the stream ended: its last sample is complete only if it ended cleanly and nothing is missing
        if isinstance(stream, _Watched):
            stream.drain()
        if expected is not None and skip.seen < expected:
            raise ShortShard(f"{url}: ended after {skip.seen} of the {expected} samples its index lists")
        if held is not None:
            yield held
    finally:
        _close(stream)


def count_samples(url: str, timeout: float = 60.0) -> int:
    """Samples in a shard, from its member names (data is skipped, not copied); StreamError naming the URL for a
    shard that cannot be read to its end."""
    n, error = count_readable(url, timeout)
    if error:
        raise StreamError(error)
    return n


def count_readable(url: str, timeout: float = 60.0) -> tuple[int, str]:
    """(samples that can be read from the start of a shard, '' or why the rest cannot: the error names the URL).
    An empty file or random bytes give (0, "...: unreadable after sample 0 (ReadError: empty file)"); for a shard
    cut short the count is what iter_samples yields from it (whole samples before the cut; it withholds the last
    one when it cannot tell whether more of its members would have followed), so a loader planning that many reads
    them all."""
    try:
        stream = open_url(url, timeout)
    except OSError as e:
        return 0, _why(e) if url in _why(e) else f"{url}: {_why(e)}"
    try:
        counter = _SkipFirst(0)

        def count_only(fname: str) -> bool:
            counter(fname)
            return False

        files = tar_file_expander(
            [{"url": url, "stream": stream}], handler=reraise_exception, select_files=count_only, eof_value=None
        )
        try:
            for _ in files:
                pass
        except (tarfile.TarError, OSError, EOFError) as e:
            error = e
        else:
            return counter.seen, ""
    finally:
        _close(stream)
    whole = 0  # damaged: count what the reader itself yields (reads the data once; only for a damaged shard)
    try:
        for _ in iter_samples(url, timeout=timeout):
            whole += 1
    except (tarfile.TarError, OSError, EOFError, ValueError):
        pass
    return whole, f"{url}: unreadable after sample {whole} ({_why(error)})"


def read_bytes(url: str, faults: FaultPolicy) -> bytes:
    """The whole content of a (small) URL, e.g. an index.json, with the policy's retries."""
    for attempt in range(faults.retries + 1):
        stream = None
        try:
            stream = open_url(url, faults.timeout)
            return stream.read()
        except OSError as e:
            if attempt == faults.retries:
                raise StreamError(_why(e) if url in _why(e) else f"{url}: {_why(e)}") from e
            time.sleep(faults.delay(attempt + 1))
        finally:
            if stream is not None:
                _close(stream)
    raise AssertionError("unreachable")


Report = Callable[..., None]  # report(kind, **fields): a fault the cursor met (retry, skipped_shard)


class ShardCursor:
    """Reads runs [start, stop) of shards in the order asked, keeping one stream open between consecutive runs
    of the same shard; see the module docstring for retries and skipping. One per worker process."""

    def __init__(self, faults: FaultPolicy, report: Report, *, sleep: Callable[[float], None] = time.sleep):
        self.faults, self.report, self.sleep = faults, report, sleep
        self._url: str | None = None
        self._next = 0  # index of the sample the open iterator yields next
        self._it: Iterator | None = None
        self._dead: dict[str, tuple[float, str]] = {}  # url -> (monotonic time given up, last error)

    def close(self) -> None:
        if self._it is not None:
            self._it.close()
        self._it, self._url = None, None

    def _open(self, url: str, start: int, expected: int | None) -> None:
        self.close()
        self._it = iter_samples(url, start=start, timeout=self.faults.timeout, expected=expected)
        self._url, self._next = url, start

    def read(self, url: str, start: int, stop: int, expected: int | None = None) -> list:
        """[(key, {suffix: bytes}) or None for a sample that could not be read] for samples start..stop-1."""
        out: list = []
        remote = is_stream(url)
        failures = 0
        while start + len(out) < stop:
            pos = start + len(out)
            dead = self._dead.get(url)
            if dead is not None and time.monotonic() - dead[0] < self.faults.cooldown:
                self.report("skipped_shard", url=url, error=f"skipped again (given up on: {dead[1]})", lost=stop - pos)
                break
            if self._it is None or self._url != url or self._next != pos:
                self._open(url, pos, expected)
            try:
                out.append(next(self._it))
                self._next += 1
                failures = 0
                continue
            except StopIteration:
                self.close()
                error = f"{url}: ended after {pos} samples (its index lists {expected})"
                if not remote:
                    self.report("skipped_shard", url=url, error=error, lost=stop - pos)
                    break
                exc: Exception = ShortShard(error)
            except (OSError, tarfile.TarError, EOFError, ValueError) as e:
                self.close()
                exc = e
            error = _why(exc) if url in _why(exc) else f"{url}: {_why(exc)}"
            if not remote:  # a damaged local file: not worth retrying
                self.report("skipped_shard", url=url, error=error, lost=stop - pos)
                break
            failures += 1
            if failures > self.faults.retries:
                self._dead[url] = (time.monotonic(), error)
                timeout = isinstance(exc, StreamTimeout)
                self.report("skipped_shard", url=url, error=error, attempts=failures, lost=stop - pos, timeout=timeout)
                break
            delay = self.faults.delay(failures)
            timeout = isinstance(exc, StreamTimeout)
            self.report("retry", url=url, error=error, attempt=failures, delay=delay, timeout=timeout)
            self.sleep(delay)
        return out + [None] * (stop - start - len(out))


__all__ = [
    "FaultPolicy",
    "StreamError",
    "StreamTimeout",
    "ShortShard",
    "ShardCursor",
    "is_stream",
    "open_url",
    "iter_samples",
    "count_samples",
    "count_readable",
    "read_bytes",
]

"""A run's metrics on their way to the tracking store: :func:`log_metrics` (batched as MLflow takes them, retried),
through a :class:`MetricBuffer` during training (a background writer; what it could not write is kept beside the
checkpoint and written on resume by :func:`write_unwritten`), and :func:`logging_only_missing` for a resumed final
step."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from experiments.tracking import active_run_id
from experiments.tracking_store import TrackingStoreUnreachable, _transient, retry_tracking_write

log = logging.getLogger(__name__)

MAX_METRICS_PER_BATCH = 1000  # MLflow's limit of one log_batch request


_ONLY_MISSING: list[tuple[str, int, dict[str, bool]]] = []  # (run id, step, key -> logged there): see below


@contextmanager
def logging_only_missing(run_id: str, step: int) -> Iterator[None]:
    """Inside the block, :func:`log_metrics` skips a metric of run ``run_id`` at ``step`` that the run already has
    there: a resumed run redoing its final step (interrupted after part of it was logged) logs each value once."""
    _ONLY_MISSING.append((run_id, step, {}))
    try:
        yield
    finally:
        _ONLY_MISSING.pop()


def _not_yet_logged(run_id: str, metrics: Mapping[str, float], step: int) -> Mapping[str, float]:
    if not _ONLY_MISSING or _ONLY_MISSING[-1][:2] != (run_id, step):
        return metrics
    known, client = _ONLY_MISSING[-1][2], MlflowClient()
    for key in metrics:
        if key not in known:
            history = retry_tracking_write(partial(client.get_metric_history, run_id, key))
            known[key] = any(m.step == step for m in history)
    skipped = [key for key in metrics if known[key]]
    if skipped:
        log.info("run %s already has %s at step %d: not logged again", run_id, ", ".join(skipped), step)
    for key in metrics:
        known[key] = True
    return {key: value for key, value in metrics.items() if key not in skipped}


class MetricBuffer:
    """A run's metric writes, in the order logged, written to the store by a background thread: a training never
    waits for the store, and one that is down or restarting is written to again until it takes them.

    ``unwritten_seconds()`` says how long the oldest unwritten batch has waited (MLflow's own HTTP retries may hold
    one write for minutes, so the wait is counted from when the metrics were logged, not from a failure);
    ``save_unwritten()`` keeps what is unwritten in ``spool`` (JSON lines, written atomically at each checkpoint),
    which :func:`write_unwritten` writes to the run when it is resumed.
    """

    RETRY_DELAYS_S = (0.5, 1.0, 2.0, 4.0, 8.0)  # between attempts while the store refuses (then every 8 s)

    def __init__(self, run_id: str, spool: Path) -> None:
        import threading
        from collections import deque

        self.run_id, self.spool = run_id, Path(spool)
        self._pending: deque[tuple[float, list[Metric]]] = deque()  # (when logged, monotonic; the batch)
        self._error: BaseException | None = None  # a write the store refused (not an outage): raised to the caller
        self._closed = self._abandoned = False
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._write_loop, name=f"metrics-{run_id[:8]}", daemon=True)
        self._thread.start()

    def put(self, batch: list[Metric]) -> None:
        self.raise_error()
        with self._cond:
            self._pending.append((time.monotonic(), batch))
            self._cond.notify_all()

    def raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _write_loop(self) -> None:
        client, failures = MlflowClient(), 0
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if not self._pending:
                    return
                _, batch = self._pending[0]
            try:
                client.log_batch(self.run_id, metrics=batch)
            except Exception as exc:
                if not _transient(exc):
                    self._error = exc
                    return
                with self._cond:
                    if not failures:
                        log.warning("the tracking store does not take metrics (%s); training goes on, writing "
                                    "them again", " ".join(str(exc).split())[:200])  # fmt: skip
                    if self._closed and self._abandoned:
                        return
                    self._cond.wait(self.RETRY_DELAYS_S[min(failures, len(self.RETRY_DELAYS_S) - 1)])
                failures += 1
                continue
            with self._cond:
                self._pending.popleft()
                if failures:
                    log.info("the tracking store takes metrics again")
                failures = 0
                self._cond.notify_all()

    def unwritten_seconds(self) -> float:
        """Seconds the oldest unwritten batch has waited (0: everything is written)."""
        with self._cond:
            return time.monotonic() - self._pending[0][0] if self._pending else 0.0

    def flush(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for every batch to be written; whether it was."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending and self._error is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
        self.raise_error()
        return True

    def save_unwritten(self) -> int:
        """Keep the unwritten metrics in :attr:`spool` (none: the file removed); returns how many."""
        with self._cond:
            rows = [
                {"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step, "model_id": m.model_id}
                for _, batch in self._pending
                for m in batch
            ]
        if not rows:
            self.spool.unlink(missing_ok=True)
            return 0
        tmp = self.spool.with_name(self.spool.name + ".tmp")
        try:
            tmp.write_text("".join(json.dumps(row) + "\n" for row in rows))
            os.replace(tmp, self.spool)
        except OSError as exc:  # a full disk: the values stay in memory; the run's own error is the one to say
            log.warning("could not keep %d unwritten metric values in %s: %s", len(rows), self.spool, exc)
            tmp.unlink(missing_ok=True)
        return len(rows)

    def close(self, timeout_s: float) -> bool:
        """Write what is left (waiting up to ``timeout_s``) and stop the writer; whether everything was written."""
        written = self.flush(timeout_s)
        with self._cond:
            self._closed, self._abandoned = True, not written
            self._cond.notify_all()
        if written:
            self._thread.join()
            self.spool.unlink(missing_ok=True)  # an earlier checkpoint's copy of what is now written
        return written


_BUFFERS: dict[str, MetricBuffer] = {}  # run id -> its buffer, while its training loop runs


FLUSH_ON_FAILURE_S = 10.0  # how long a failed or stopped training waits for its metrics to be written


@contextmanager
def buffered_metrics(run_id: str, spool: Path) -> Iterator[MetricBuffer]:
    """Inside the block, :func:`log_metrics` to run ``run_id`` goes through a :class:`MetricBuffer`; the caller
    closes it (or it is abandoned, its unwritten metrics saved, when the block raises)."""
    buffer = MetricBuffer(run_id, spool)
    _BUFFERS[run_id] = buffer
    try:
        yield buffer
    except TrackingStoreUnreachable:  # what is unwritten is saved already
        buffer.close(timeout_s=0)
        raise
    except BaseException:  # the run failed or was stopped, the store is up: what was logged reaches it
        if not buffer.close(timeout_s=FLUSH_ON_FAILURE_S):
            buffer.save_unwritten()
        raise
    finally:
        _BUFFERS.pop(run_id, None)


def write_unwritten(run_id: str, spool: Path) -> int:
    """Write the metrics an earlier process could not (:meth:`MetricBuffer.save_unwritten`) to run ``run_id``, then
    remove ``spool``; returns how many."""
    if not spool.exists():
        return 0
    rows = [json.loads(line) for line in spool.read_text().splitlines() if line.strip()]
    batch = [Metric(r["key"], float(r["value"]), r["timestamp"], r["step"], model_id=r.get("model_id")) for r in rows]
    client = MlflowClient()
    for part in _requests(batch):
        retry_tracking_write(partial(client.log_batch, run_id, metrics=part))
    spool.unlink()
    log.info("wrote the %d metric values that run %s could not write before it stopped", len(batch), run_id)
    return len(batch)


def log_metrics(metrics: Mapping[str, float], step: int, *, model_id: str | None = None) -> None:
    """``metrics`` at optimizer step ``step`` of the active run, retried with backoff while the store is locked or
    unreachable; with ``model_id``, also as that logged model's metrics.

    Written through the client, so a metric is linked to a logged model only where ``model_id`` says so (MLflow's
    fluent API would link every later metric at the model's step to it). MLflow's SQLite store waits 20 s for a
    lock; a store held longer (a backup, a long query from another process) would otherwise crash a training over a
    metric. After the retries the error propagates and the run ends FAILED. Inside :func:`buffered_metrics` (a
    training loop) the write is queued instead, and the training goes on.
    """
    run_id, client, now = active_run_id(), MlflowClient(), int(time.time() * 1000)
    metrics = _not_yet_logged(run_id, metrics, step)
    batch = [Metric(key, float(value), now, step, model_id=model_id) for key, value in metrics.items()]
    for part in _requests(batch):
        if run_id in _BUFFERS:
            _BUFFERS[run_id].put(part)
        else:
            retry_tracking_write(partial(client.log_batch, run_id, metrics=part))


def _requests(batch: list[Metric]) -> Iterator[list[Metric]]:
    """``batch`` in parts MLflow takes in one ``log_batch`` request."""
    for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
        yield batch[start : start + MAX_METRICS_PER_BATCH]

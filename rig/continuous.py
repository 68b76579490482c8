"""``--mode continuous``: capture, reconstruction and writing as pipelined stages.

Three threads joined by bounded queues:

    capture (owns the devices) --q1--> reconstruct --q2--> write (sinks)

While stack k is reconstructed, stack k+1 is captured. When reconstruction falls behind and
``q1`` is full, ``continuous.when_behind`` decides: ``drop_oldest`` throws away the oldest
waiting stack (counted and logged; capture never waits), ``block`` makes capture wait. Every
stack is accounted for: captured = written + dropped + lost to an error (reported).

Stopping: ``--count``, ``--duration``, Ctrl-C or SIGTERM (treated as Ctrl-C). Ctrl-C lets the
stack in flight finish, reconstructs and writes the stacks already queued, parks the lens (the
devices close), and writes ``summary.yaml``; a second Ctrl-C hurries that up: the queued stacks
are written without depth (raw, to reconstruct later with ``python -m reconstruct``), and the
summary still follows. A full disk stops recording with one line (``DiskFull``) and never
leaves a half-written stack (the writers are atomic). A device error triggers up to
``continuous.reconnect_attempts`` reopenings of the rig; after that the run ends with exit code
3, and a cut-short sweep is kept as ``.incomplete``. A failed reconstruction also ends the run
(exit code 3). Only a failure to write stops the writing: whatever else ends a run, the stacks
already captured are still written, those without depth as raw stacks under ``stacks/``.
"""

from __future__ import annotations

import collections
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from capture.errors import DeviceError, DiskFull, RigError
from capture.repeat_log import RepeatLimiter
from capture.stack import FocalStack
from capture.sweep import SweepInterrupted
from capture.yaml_load import load_yaml
from reconstruct.api import reconstruct_stack, warm_up_network
from reconstruct.metrics import depth_metrics
from reconstruct.result import DepthResult
from rig.build import Rig, calibration_record, check_focus_map, check_reconstruction, open_rig
from rig.config import RigConfig, config_to_dict
from rig.runfolder import check_free_space, create_run_folder, write_yaml_atomic
from capture.signals import Terminated, sigterm_stops_like_ctrl_c
from rig.sinks import StackSink, build_sinks, check_sinks, folder_name
from rig.single import save_incomplete

logger = logging.getLogger(__name__)

__all__ = ["ContinuousRun", "ContinuousStats", "run_continuous"]

_STOP = object()  # end-of-stream marker between stages


@dataclass(frozen=True)
class _WarmUp:
    """Ahead of the first stack in q1: the stack shape to open the network's backend for."""

    image_hw: tuple[int, int]
    distances_m: tuple[float, ...]
_ACCURACY_KEYS = ("abs_rel", "rmse_m", "delta_1_25", "valid_fraction")


#: waits before the reopenings after a device error: 0.5 s, then doubling up to 4 s
RECONNECT_FIRST_DELAY_S = 0.5
RECONNECT_MAX_DELAY_S = 4.0


@dataclass
class ContinuousStats:
    """Counters and timings of a continuous run (thread-safe updates through ``lock``)."""

    captured: int = 0
    reconstructed: int = 0
    written: int = 0
    written_without_depth: int = 0
    dropped: int = 0
    failed: int = 0
    not_written: int = 0  # captured, but writing had stopped (a full disk, a write error) before it was written whole
    reconnects: int = 0
    stage_s: dict[str, collections.deque] = field(default_factory=lambda: {k: collections.deque(maxlen=10_000) for k in ("capture", "reconstruct", "write")})
    latency_s: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))
    started_host_s: float = field(default_factory=time.monotonic)
    lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)
    accuracy_sums: dict[str, float] = field(default_factory=dict)  # over the stacks scored against a known truth
    accuracy_stacks: int = 0
    warm_up_s: float | None = None  # the network's warm-up before the first stack, where it ran
    network: str | None = None  # where the network ran, from the first reconstructed stack ("torch on cuda:0 (fp16)")

    def score(self, metrics: dict[str, float]) -> None:
        """Add one stack's accuracy (running sums: a run of hours keeps no per-stack list)."""
        with self.lock:
            for k in _ACCURACY_KEYS:
                self.accuracy_sums[k] = self.accuracy_sums.get(k, 0.0) + float(metrics[k])
            self.accuracy_stacks += 1

    def add(self, counter: str, n: int = 1) -> None:
        with self.lock:
            setattr(self, counter, getattr(self, counter) + n)

    def record(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.stage_s[stage].append(seconds)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_host_s

    def rate_per_s(self) -> float:
        t = self.elapsed_s()
        return self.written / t if t > 0 else 0.0

    def _pct(self, values: collections.deque, q: float) -> float | None:
        return float(np.percentile(list(values), q)) if values else None

    def status_line(self) -> str:
        p50 = self._pct(self.latency_s, 50)
        lat = f"latency p50 {p50:.2f} s" if p50 is not None else "latency -"
        return (f"stacks {self.written} written, {self.captured} captured, {self.dropped} dropped | "
                f"{self.rate_per_s():.2f} stacks/s | {lat} | {self.elapsed_s():.0f} s")

    def to_dict(self) -> dict[str, Any]:
        with self.lock:
            stages = {k: {"mean_s": round(float(np.mean(v)), 4), "p95_s": round(float(np.percentile(list(v), 95)), 4)}
                      for k, v in self.stage_s.items() if v}
            lat = list(self.latency_s)
            return {
                "stacks_captured": self.captured, "stacks_reconstructed": self.reconstructed, "stacks_written": self.written,
                "stacks_written_without_depth": self.written_without_depth,
                "stacks_dropped": self.dropped, "stacks_failed": self.failed, "stacks_not_written": self.not_written,
                "reconnects": self.reconnects,
                "seconds": round(self.elapsed_s(), 3), "stacks_per_s": round(self.rate_per_s(), 4),
                "latency_s": {"p50": round(float(np.percentile(lat, 50)), 4), "p95": round(float(np.percentile(lat, 95)), 4)} if lat else None,
                "stages": stages, "errors": list(self.errors),
                **({"network": self.network} if self.network else {}),
                **({"network_warm_up_s": self.warm_up_s} if self.warm_up_s is not None else {}),
                **self._accuracy(),
            }

    def _accuracy(self) -> dict[str, Any]:
        """Mean accuracy over the stacks scored against the simulator's truth (none on hardware)."""
        if not self.accuracy_stacks:
            return {}
        mean = {k: round(v / self.accuracy_stacks, 6) for k, v in self.accuracy_sums.items()}
        return {"accuracy": {**mean, "stacks_scored": self.accuracy_stacks,
                             "note": "mean over the stacks, against the simulator's true depth; a pixel without depth counts as relative error 1"}}


@dataclass
class _Item:
    index: int
    stack: FocalStack
    t_sweep_start_host_s: float  # when the capture call began (before the first move), host monotonic clock
    result: DepthResult | None = None
    truth: Any = None  # the simulator's scene (true depth) where the rig knows it


@dataclass
class ContinuousRun:
    run_dir: Path
    summary: dict[str, Any]
    exit_code: int


class _Pipeline:
    def __init__(self, config: RigConfig, run_dir: Path, sinks: list[Any], *, count: int | None, duration_s: float | None,
                 capture: Callable[[Rig], FocalStack] | None, status: Callable[[str], None] | None) -> None:
        self.config, self.run_dir, self.sinks = config, run_dir, sinks
        self.count, self.duration_s = count, duration_s
        self.capture_fn = capture or (lambda rig: rig.capture_stack())
        self.status = status
        c = config.continuous
        self.q1: queue.Queue = queue.Queue(maxsize=c.queue_size)
        self.q2: queue.Queue = queue.Queue(maxsize=c.queue_size)
        self.stop = threading.Event()
        self.hurry = threading.Event()  # a second Ctrl-C: write what is queued without reconstructing it
        self.stats = ContinuousStats()
        self.fatal: BaseException | None = None
        self._fatal_lock = threading.Lock()
        self._repeating = RepeatLimiter(logger)  # a reconstruction slower than capture drops a stack every sweep, for hours

    # ------------------------------------------------------------------ helpers
    def _fail(self, exc: BaseException) -> None:
        with self._fatal_lock:
            if self.fatal is None:
                self.fatal = exc
        self.stats.errors.append(str(exc))
        self.stop.set()

    def _done_capturing(self) -> bool:
        if self.stop.is_set():
            return True
        if self.count is not None and self.stats.captured >= self.count:  # N stacks: a failed sweep is not one
            return True
        return self.duration_s is not None and self.stats.elapsed_s() >= self.duration_s

    def _put_for_reconstruction(self, item: _Item) -> None:
        if self.config.continuous.when_behind == "block":
            self.q1.put(item)  # the reconstruct stage takes from q1 until the end marker, whatever happens
            return
        while True:
            try:
                self.q1.put_nowait(item)
                return
            except queue.Full:
                try:
                    old = self.q1.get_nowait()
                except queue.Empty:
                    continue
                if old is _STOP:  # never drop the end marker
                    self.q1.put(old)
                    continue
                if isinstance(old, _WarmUp):  # not a stack: nothing is lost
                    continue
                self.stats.add("dropped")
                self._repeating.warning("dropped", "reconstruction is behind: dropped stack %06d (continuous.when_behind: drop_oldest; "
                                        "summary.yaml counts every drop)", old.index)

    # ------------------------------------------------------------------ stages
    def capture_stage(self) -> None:
        rig: Rig | None = None
        index = 0
        attempts_left = self.config.continuous.reconnect_attempts
        try:
            rig = open_rig(self.config)
            rig.actuator.abort_event = self.hurry  # a second Ctrl-C also ends a wait for a stuck stage
            if self.config.reconstruct.method == "dualfocus":
                # the backend opens (export, quantisation, CUDA start-up) while the first stack is captured
                self.q1.put(_WarmUp(tuple(rig.camera.image_hw), tuple(float(d) for d in rig.planned_distances_m())))
            while not self._done_capturing():
                t0 = time.monotonic()
                try:
                    stack = self.capture_fn(rig)
                except SweepInterrupted as err:
                    save_incomplete(err, self.run_dir / "stacks" / f"{index:06d}")
                    if isinstance(err.cause, KeyboardInterrupt):  # a second Ctrl-C stopped a focus wait
                        return  # the main thread has the Ctrl-C; the rig closes (below)
                    self.stats.add("failed")
                    self.stats.errors.append(str(err))
                    if not isinstance(err.cause, DeviceError):
                        raise
                    rig, attempts_left = self._reconnect(rig, err, attempts_left)
                    if rig is None:  # a Ctrl-C while waiting to reconnect: a user's stop, not a device error
                        return
                    index += 1
                    continue
                self.stats.record("capture", time.monotonic() - t0)
                self.stats.add("captured")
                self._put_for_reconstruction(_Item(index=index, stack=stack, t_sweep_start_host_s=t0, truth=rig.truth()))
                index += 1
                attempts_left = self.config.continuous.reconnect_attempts  # a good stack restores the budget
        except BaseException as exc:  # noqa: BLE001 (the main thread reports it)
            if not isinstance(exc, KeyboardInterrupt):
                self._fail(exc)
        finally:
            if rig is not None:
                try:
                    rig.close()  # the lens parks
                except Exception as exc:
                    logger.warning("closing the rig: %s", exc)
            self.q1.put(_STOP)

    def _reconnect(self, rig: Rig, err: BaseException, attempts_left: int) -> tuple[Rig | None, int]:
        """Close the rig and reopen it, spending one of ``attempts_left`` per try; (None, 0)
        when the run is stopped (Ctrl-C) meanwhile."""
        logger.warning("device error (%s); reconnecting (%d attempts left)", err, attempts_left)
        try:
            rig.close()
        except Exception as exc:
            logger.debug("close before reconnect: %s", exc)
        last: BaseException = err
        delay_s = RECONNECT_FIRST_DELAY_S
        while attempts_left > 0 and not self.stop.is_set():
            attempts_left -= 1
            # a USB device that re-enumerates, or a board that reboots on the port's DTR, takes seconds
            if self.stop.wait(delay_s):
                return None, 0
            delay_s = min(2 * delay_s, RECONNECT_MAX_DELAY_S)
            try:
                new = open_rig(self.config)
            except DeviceError as exc:
                last = exc
                logger.warning("reconnect failed: %s (%d %s left)", exc, attempts_left, "attempt" if attempts_left == 1 else "attempts")
                continue
            new.actuator.abort_event = self.hurry
            self.stats.add("reconnects")
            logger.warning("reconnected")
            return new, attempts_left
        if self.stop.is_set():
            return None, 0
        raise last

    def reconstruct_stage(self) -> None:
        rc = self.config.reconstruct
        failed = False
        try:
            while True:
                item = self.q1.get()
                if item is _STOP:
                    break
                if isinstance(item, _WarmUp):
                    if not (failed or self.hurry.is_set() or self.stop.is_set()):
                        # its own thread: a stop, a second Ctrl-C or a device error never waits for it (an int8
                        # quantisation takes half a minute on two cores); the first stack that needs the network
                        # waits for the backend's opening inside open_backend
                        threading.Thread(target=self._warm_up, args=(item,), name="warm-up", daemon=True).start()
                    continue
                if isinstance(self.fatal, DiskFull):
                    self.stats.add("not_written")  # recording stopped: let capture wind down, counting what it brings
                    continue
                if failed or self.hurry.is_set():
                    self.q2.put(item)  # written raw: nothing captured is lost
                    continue
                t0 = time.monotonic()
                try:
                    item.result = reconstruct_stack(item.stack, method=rc.method, focus_measure=rc.focus_measure, align=rc.align,
                                                    model=rc.model, weights=rc.weights, backend=rc.backend, precision=rc.precision,
                                                    input_scale=rc.input_scale)
                except Exception as exc:
                    # the run ends; this stack and those queued behind it are written raw
                    logger.error("reconstruction of stack %06d failed (%s); stopping, the queued stacks are written without depth", item.index, exc)
                    failed = True
                    self._fail(exc)
                    self.q2.put(item)
                    continue
                t1 = time.monotonic()
                self.stats.record("reconstruct", t1 - t0)
                self.stats.latency_s.append(t1 - item.t_sweep_start_host_s)
                self.stats.add("reconstructed")
                if self.stats.network is None and item.result.method == "dualfocus":
                    precision = item.result.extra.get("precision")
                    self.stats.network = f"{item.result.backend} on {item.result.device}" + (f" ({precision})" if precision else "")
                if item.truth is not None and item.result.depth_unit == "metre":
                    try:
                        self.stats.score(depth_metrics(item.result.depth, item.truth.depth_m, truth_valid=item.truth.truth_valid))
                    except Exception as exc:  # a score is a figure, never a reason to lose the stack
                        logger.warning("stack %06d: no accuracy score (%s)", item.index, exc)
                self.q2.put(item)
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
            self._forward_raw()
        finally:
            self.q2.put(_STOP)

    def _forward_raw(self) -> None:
        """Pass every stack left in q1 to the writer without depth, up to the end marker."""
        while True:
            item = self.q1.get()
            if item is _STOP:
                return
            if not isinstance(item, _WarmUp):
                self.q2.put(item)

    def _warm_up(self, item: _WarmUp) -> None:
        """Run the network once on a made-up stack of the coming stacks' shape, so that the first
        real stack does not wait for the backend to open; a failure here is only logged (the
        first stack then meets the same error and reports it)."""
        rc = self.config.reconstruct
        t0 = time.monotonic()
        try:
            backend = warm_up_network(item.image_hw, item.distances_m, model=rc.model, weights=rc.weights, backend=rc.backend,
                                      precision=rc.precision, input_scale=rc.input_scale)
        except Exception as exc:
            logger.warning("warming up the network failed (%s); the first stack will try again", exc)
            return
        self.stats.warm_up_s = round(time.monotonic() - t0, 3)
        logger.info("network ready on %s for %dx%dx%d stacks in %.2f s", backend, len(item.distances_m), *item.image_hw, self.stats.warm_up_s)

    def write_stage(self) -> None:
        # Only a failure here stops the writing: a device or reconstruction error elsewhere ends
        # the run, but what was captured before it is still written.
        try:
            while True:
                item = self.q2.get()
                if item is _STOP:
                    break
                t0 = time.monotonic()
                check_free_space(self.run_dir, min_free_gb=self.config.output.min_free_gb)
                if item.result is not None:
                    for sink in self.sinks:
                        sink.write(item.index, item.stack, item.result)
                else:
                    self._write_raw(item)
                self.stats.record("write", time.monotonic() - t0)
                self.stats.add("written")
        except BaseException as exc:  # noqa: BLE001
            self._fail(exc)
            # the stack being written (some of its files may be in place: each sink's own are whole) and those queued
            self.stats.add("not_written", 1 + self._drain(self.q2))

    def _write_raw(self, item: _Item) -> None:
        """A stack without depth: the sinks that need none, and the stack folder in any case."""
        kept = False
        for sink in self.sinks:
            if not getattr(sink, "needs_result", False):
                wrote = sink.write(item.index, item.stack, None)
                kept = kept or (wrote and isinstance(sink, StackSink))
        if not kept:  # not recorded by the config (or not this index): keep it all the same
            item.stack.write(self.run_dir / "stacks" / folder_name(item.index))
        self.stats.add("written_without_depth")
        logger.warning("stack %06d written without depth: %s", item.index, self.run_dir / "stacks" / folder_name(item.index))

    @staticmethod
    def _drain(q: queue.Queue) -> int:
        """Take everything up to the stop mark off ``q``; how many stacks that was."""
        n = 0
        while True:
            item = q.get()
            if item is _STOP:
                q.put(item)
                return n
            n += 1

    def run(self) -> None:
        # The main thread (where Ctrl-C lands) only polls flags and sleeps: a KeyboardInterrupt
        # inside Thread.join can report a live thread as finished, and one inside Event.wait /
        # Condition.wait can leave the condition's lock held, deadlocking the worker's set().
        stages = (("capture", self.capture_stage), ("reconstruct", self.reconstruct_stage), ("write", self.write_stage))
        finished = [threading.Event() for _ in stages]

        def body(stage: Callable[[], None], done: threading.Event) -> None:
            try:
                stage()
            finally:
                done.set()

        for (name, stage), done in zip(stages, finished):
            threading.Thread(target=body, args=(stage, done), name=name, daemon=True).start()
        last_status = 0.0
        try:
            while not all(done.is_set() for done in finished):
                time.sleep(0.05)
                if self.status is not None and time.monotonic() - last_status >= 0.5:
                    self.status(self.stats.status_line())
                    last_status = time.monotonic()
        except KeyboardInterrupt as exc:
            self.stop.set()
            try:
                logger.warning("%s: finishing the stack in flight and the %d queued, then stopping (Ctrl-C again: write them without depth)",
                               "SIGTERM" if isinstance(exc, Terminated) else "Ctrl-C", self.q1.qsize() + self.q2.qsize())
            except KeyboardInterrupt:
                self.hurry.set()
            while not all(done.is_set() for done in finished):
                try:
                    time.sleep(0.05)
                except KeyboardInterrupt as again:
                    if not self.hurry.is_set():
                        logger.warning("%s again: writing the queued stacks without depth, then the summary",
                                       "SIGTERM" if isinstance(again, Terminated) else "Ctrl-C")
                    self.hurry.set()
            if self.fatal is None:
                self.fatal = exc


def run_continuous(config: RigConfig, *, count: int | None = None, duration_s: float | None = None, show_status: bool = True,
                   capture: Callable[[Rig], FocalStack] | None = None) -> ContinuousRun:
    """Run continuous acquisition until ``count`` stacks, ``duration_s`` seconds or Ctrl-C.

    Args:
        capture: how one stack is captured from the open rig (default ``Rig.capture_stack``; the
            continuous sweep style plugs in here).
    """
    rc = config.reconstruct
    check_reconstruction(config)  # before any capture
    check_focus_map(config)  # a calibration file or nominal model that cannot serve: before the run folder
    calibration = calibration_record(config)
    geometry = _sink_geometry(config)
    check_sinks(config.output, config.live, **geometry)  # a bad config leaves no run folder behind
    run_dir = create_run_folder(config.output.dir, config.name, min_free_gb=config.output.min_free_gb)
    write_yaml_atomic(run_dir / "config.yaml", config_to_dict(config))
    sinks = build_sinks(config.output, config.live, run_dir, **geometry)
    status = (lambda line: print("\r" + line, end="", file=sys.stderr, flush=True)) if show_status else None
    pipeline = _Pipeline(config, run_dir, sinks, count=count, duration_s=duration_s, capture=capture, status=status)
    try:
        with sigterm_stops_like_ctrl_c():
            pipeline.run()
    finally:
        for sink in sinks:
            try:
                sink.close()
            except Exception as exc:
                logger.warning("closing %s: %s", getattr(sink, "name", sink), exc)
        if show_status:
            print(file=sys.stderr)
    summary = {"mode": "continuous", **pipeline.stats.to_dict(),
               "method": rc.method, "backend": rc.backend, "when_behind": config.continuous.when_behind}
    if calibration is not None:
        summary["calibration"] = calibration
    fatal = pipeline.fatal
    exit_code = 0
    if isinstance(fatal, KeyboardInterrupt):
        summary["stopped_by"] = "SIGTERM" if isinstance(fatal, Terminated) else "user (Ctrl-C)"
        exit_code = 130
    elif fatal is not None:
        summary["stopped_by"] = f"error: {fatal}"
        exit_code = getattr(fatal, "exit_code", 3) if isinstance(fatal, RigError) else 3
    else:
        summary["stopped_by"] = "count" if count is not None and summary["stacks_captured"] >= count else "duration"
    accounted = summary["stacks_written"] + summary["stacks_dropped"] + summary["stacks_not_written"]
    summary["stacks_unaccounted"] = summary["stacks_captured"] - accounted
    try:
        write_yaml_atomic(run_dir / "summary.yaml", summary)
    except RigError as exc:  # a full disk may refuse even the summary
        logger.error("could not write the run summary: %s", exc)
    if fatal is not None and not isinstance(fatal, KeyboardInterrupt):
        if isinstance(fatal, RigError):
            error = fatal
        else:  # an unexpected failure (a network that ran out of memory): exit 3 as the summary says, not 2 (bad input)
            error = RigError(f"{type(fatal).__name__}: {fatal}")
            error.exit_code = exit_code
        error.run_dir = run_dir  # the command line prints it
        raise error
    return ContinuousRun(run_dir=run_dir, summary=summary, exit_code=exit_code)


def _sink_geometry(config: RigConfig) -> dict[str, Any]:
    """Intrinsics from the calibration file where it has them, else the lens's focal length."""
    geometry: dict[str, Any] = {}
    cal = config.calibration.file
    if cal is not None:
        from calibration.intrinsics import Intrinsics

        doc = load_yaml(Path(cal).read_text(encoding="utf-8")) or {}
        if isinstance(doc, dict) and doc.get("intrinsics"):
            try:
                geometry["intrinsics"] = Intrinsics.from_dict(doc["intrinsics"])
            except RigError as exc:  # name the file the entry is in
                raise type(exc)(f"{cal}: {exc}".replace("fix calibration.yaml", "fix this file")) from exc
    optics = getattr(config.camera, "optics", None)
    if optics is not None and "intrinsics" not in geometry:
        from capture.optics import ThinLens

        geometry["focal_length_px"] = ThinLens(focal_length_mm=optics.focal_length_mm, f_number=optics.f_number,
                                               pixel_pitch_um=optics.pixel_pitch_um, base_focus_m=optics.base_focus_m).focal_length_px
    width, height = getattr(config.camera, "width", None), getattr(config.camera, "height", None)
    if width and height:
        geometry["image_hw"] = (int(height), int(width))
    return geometry

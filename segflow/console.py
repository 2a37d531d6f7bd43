"""The console of a run: segflow's own lines and progress bars; everything else goes to log files.

A component runs in a subprocess whose output kfp.local relays line by line (carriage
returns become line breaks), so a component never draws a bar itself: its `Progress`
prints throttled `[segflow:progress] {json}` records (counts added since the last
record, then an end record), and the process that owns the console feeds them to a
`Renderer`: a tqdm bar on a terminal, a short line every `STEP_PERCENT` % elsewhere (CI
logs), and one final line per step. Counts are deltas, so Beam workers in other
processes can report into the same step. Outside a component (`segflow predict`, a core
called directly) the records go straight to a renderer of this process on stderr.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Iterable, Iterator, TextIO, TypeVar

T = TypeVar("T")
MARK = "[segflow] "  # segflow's own lines: the default console shows only these (and progress)
PROGRESS_MARK = "[segflow:progress] "
RELAY_ENV = "SEGFLOW_PROGRESS_RELAY"  # set inside a component (and its Beam workers): print records
RECORD_SECONDS = 2.0  # at most one record per step and process this often: few relayed lines
LOG_FILE = "log.txt"  # a component's whole output in its folder; the runner's own in the run folder
STEP_PERCENT = 25  # without a terminal: a line each time a step passes a multiple of this


@dataclass
class _Step:
    total: int | None
    unit: str
    started: float = field(default_factory=time.perf_counter)
    done: int = 0
    shown_percent: int = 0
    bar: Any = None


def _is_terminal(stream: TextIO) -> bool:
    """A terminal with a width: tqdm draws empty bars on a pty of size 0 (`script`, `docker -t`)."""
    try:
        return stream.isatty() and os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, OSError, ValueError):
        return False


class Renderer:
    """Draws the steps' progress from records, between segflow's lines, on `stream`."""

    def __init__(self, stream: TextIO, tty: bool | None = None) -> None:
        self.stream = stream
        self.tty = _is_terminal(stream) if tty is None else tty
        self.steps: dict[str, _Step] = {}

    def line(self, text: str) -> None:
        """A whole line; above the bars on a terminal, so they stay at the bottom."""
        if any(step.bar is not None for step in self.steps.values()):
            from tqdm import tqdm

            tqdm.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def record(self, record: dict[str, Any]) -> None:
        name = record["step"]
        step = self.steps.get(name)
        if step is None:
            step = self.steps[name] = _Step(record.get("total"), record.get("unit", "examples"))
            if self.tty:
                from tqdm import tqdm

                step.bar = tqdm(total=step.total, desc=name, unit=f" {step.unit}", file=self.stream, leave=True, dynamic_ncols=True)
        if step.total is None and record.get("total") is not None:  # a Beam worker's record came first
            step.total = record["total"]
            if step.bar is not None:
                step.bar.total = step.total
        step.done = record["done"] if "done" in record else step.done + record.get("add", 0)
        if step.bar is not None:
            step.bar.update(step.done - step.bar.n)
        elif step.total and not record.get("end"):
            percent = step.done * 100 // step.total // STEP_PERCENT * STEP_PERCENT
            if step.shown_percent < percent < 100:
                step.shown_percent = percent
                self.line(f"{MARK}{name}: {step.done}/{step.total} {step.unit} ({step.done * 100 // step.total} %)")
        if record.get("end"):
            self._finish(name, step)

    def close(self) -> None:
        """Removes the bars of steps that never ended (their component failed)."""
        for step in self.steps.values():
            if step.bar is not None:
                step.bar.close()
        self.steps.clear()

    def _finish(self, name: str, step: _Step) -> None:
        del self.steps[name]
        if step.bar is not None:
            step.bar.close()
            return
        seconds = time.perf_counter() - step.started
        of = f"/{step.total}" if step.total is not None else ""
        rate = f", {step.done / seconds:.1f} {step.unit}/s" if seconds > 0 and step.done else ""
        self.line(f"{MARK}{name}: {step.done}{of} {step.unit} in {seconds:.1f} s{rate}")


_local: Renderer | None = None


_relay_lock = threading.Lock()


def _emit(record: dict[str, Any]) -> None:
    """To the relaying parent (inside a component), else to this process's renderer.
    One write per record, under a lock: `print` writes the text and the line break
    separately, so two of Beam's worker threads could otherwise share a line."""
    if os.environ.get(RELAY_ENV):
        with _relay_lock:
            sys.stdout.write(PROGRESS_MARK + json.dumps(record) + "\n")
            sys.stdout.flush()
        return
    _local_renderer().record(record)


def _local_renderer() -> Renderer:
    """This process's renderer on the current sys.stderr (pytest replaces it per test)."""
    global _local
    if _local is None or _local.stream is not sys.stderr:
        _local = Renderer(sys.stderr)
    return _local


def line(text: str) -> None:
    """A line on stderr that does not break this process's progress bars."""
    _local_renderer().line(text)


def parse_records(line: str) -> list[dict[str, Any]] | None:
    """The records in a relayed line (kfp.local indents them), or None for any other line.
    Another process's output can still share the line (Beam's worker processes write to the
    same pipe): every whole record in it is read, and a torn one is dropped, never fatal;
    the step's end record carries its final count."""
    stripped = line.strip()
    if not stripped.startswith(PROGRESS_MARK):
        return None
    records = []
    for piece in stripped.split(PROGRESS_MARK)[1:]:
        try:
            record, _ = json.JSONDecoder().raw_decode(piece)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


class Progress:
    """Counts one step's items (`total` None: unknown) and reports them, throttled.
    Several instances may report into one step (Beam's DoFn instances); `end` closes it."""

    def __init__(self, step: str, total: int | None = None, unit: str = "examples") -> None:
        self.step, self.total, self.unit = step, total, unit
        self.pending = 0
        self.last = time.perf_counter()
        _emit({"step": step, "total": total, "unit": unit})

    def add(self, count: int = 1) -> None:
        self.pending += count
        if time.perf_counter() - self.last >= RECORD_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Reports the counts not reported yet (a Beam bundle's end: the process may stop)."""
        if self.pending:
            _emit({"step": self.step, "add": self.pending})
        self.pending = 0
        self.last = time.perf_counter()

    def end(self, done: int | None = None) -> None:
        """Closes the step; `done`, when given, is the final count (counts that Beam workers
        did not report before they stopped are not lost)."""
        self.flush()
        _emit({"step": self.step, "end": True, **({"done": done} if done is not None else {})})


def progress(items: Iterable[T], step: str, total: int | None = None, unit: str = "examples") -> Iterator[T]:
    """Yields `items`, counting them into `step` (`total` defaults to len(items))."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    counter = Progress(step, total, unit)
    try:
        for item in items:
            yield item
            counter.add()
    finally:
        counter.end()


class NativeOutput:
    """While open, what this process writes to file descriptors 1 and 2 behind Python's back
    (TensorFlow's native logging on import, libraries' own logging handlers) goes to a
    temporary file, and `sys.stdout`/`sys.stderr` (segflow's lines, the report) still reach
    the console. `keep` names the run folder whose log gets that output."""

    def __init__(self) -> None:
        handle, name = tempfile.mkstemp(prefix="segflow-", suffix=".log")
        os.close(handle)
        self.path = Path(name)
        self.saved: list[tuple[int, int, TextIO, bool]] = []  # descriptor, its original, the Python stream, replaced
        self.destination: Path | None = None

    def __enter__(self) -> NativeOutput:
        sys.stdout.flush()
        sys.stderr.flush()
        with open(self.path, "ab") as file:
            for descriptor, name in ((1, "stdout"), (2, "stderr")):
                original = os.dup(descriptor)
                os.dup2(file.fileno(), descriptor)
                stream = getattr(sys, name)
                replaced = _writes_to(stream, descriptor)  # else (pytest's capture) it does not go through the descriptor
                if replaced:
                    setattr(sys, name, open(os.dup(original), "w", encoding=stream.encoding or "utf-8", buffering=1))
                self.saved.append((descriptor, original, stream, replaced))
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        for (descriptor, original, stream, replaced), name in zip(self.saved, ("stdout", "stderr")):
            console = getattr(sys, name)
            console.flush()
            os.dup2(original, descriptor)
            os.close(original)
            if replaced:
                setattr(sys, name, stream)
                console.close()
        self.saved.clear()
        if kind is None and self.destination is not None and self.destination.parent.is_dir():
            # First: it began before the run's own transcript (pipelines.local), at the imports.
            after = self.destination.read_bytes() if self.destination.exists() else b""
            self.destination.write_bytes(self.path.read_bytes() + after)
        self.path.unlink(missing_ok=True)

    def keep(self, folder: str | os.PathLike[str]) -> None:
        """On closing without an error, put the captured output at the top of `folder`'s log
        file (else it is dropped: the folder may be another run's)."""
        self.destination = Path(folder) / LOG_FILE


def _writes_to(stream: TextIO, descriptor: int) -> bool:
    try:
        return stream.fileno() == descriptor
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError and a ValueError
        return False


@contextlib.contextmanager
def native_output(enabled: bool) -> Iterator[NativeOutput | None]:
    """A `NativeOutput` when `enabled` (the default console), else nothing is redirected."""
    if not enabled:
        yield None
        return
    with NativeOutput() as native:
        yield native

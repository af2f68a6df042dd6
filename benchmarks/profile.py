"""Where one benchmark row's cifarjax step spends its time, by XLA operation and by kind of layer.

    python -m benchmarks.profile ROW [--top N]

ROW is a `benchmarks.throughput` row name (e.g. resnet_all_224). The step is compiled and warmed up, then one
`rate()` (its usual number of steps) runs under `jax.profiler`; each XLA operation's time is summed over the
CPU runtime's threads (operations that run side by side both count, so the total exceeds the wall time) and
named by the model code it came from (the HLO metadata of the optimised program, dumped to a temporary folder).
It also splits the wall time by how many of the runtime's threads were inside an operation (an asynchronous one in
flight, such as XLA's own convolutions, counting as one): time with none is spent between operations, not in them.
"""
from __future__ import annotations

import argparse
import bisect
import collections
import os
import re
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks.throughput import ROWS, CifarjaxRow, schedule_row  # noqa: E402


def kind_of(op_name: str) -> tuple:
    """(forward or backward, layer kind) of an HLO op's metadata name."""
    phase = "backward" if "transpose(" in op_name else "forward"
    if "ResNet" not in op_name and "SimpleCNN" not in op_name:
        return phase, "optimizer and other"
    if re.search(r"/bn\d|_bn/|bn1/", op_name):
        return phase, "BatchNorm"
    if "conv" in op_name:
        return phase, "convolution"
    if "backbone/max" in op_name or "window_max_pool" in op_name or re.search(r"backbone/(select_n|eq|gt)$", op_name):
        return phase, "max pool"
    return phase, "ReLU, residual add, other"


def hlo_names(hlo: str) -> dict:
    """{operation: (shape, op_name metadata)} of one optimised HLO module's text."""
    return {m[1]: (m[2], m[3]) for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (\S+) .*?op_name=\"([^\"]+)\"", hlo, re.M)}


def trace_lines(trace_dir: Path) -> dict:
    """{runtime thread: [(event name, start ns, end ns)]} of the XLA CPU runtime's threads in a trace."""
    from jax._src.lib import _profile_data
    data = _profile_data.ProfileData.from_file(str(next(trace_dir.rglob("*.xplane.pb"))))
    return {line.name: [(e.name, e.start_ns, e.start_ns + e.duration_ns) for e in line.events]
            for plane in data.planes for line in plane.lines if line.name.startswith("tf_XLAEigen")}


def op_times(lines: dict) -> tuple:
    """({operation: ns summed over the runtime's threads}, {lane: [(start ns, end ns) of its operations]}).

    An operation XLA runs asynchronously (its own convolutions, matrix products outside YNNPACK) shows only as a
    short launch on one thread; the pool threads that compute it are not in the trace. It is done when its
    completion callback starts: the `ThunkExecutor::Execute` event that runs the operations that waited for it,
    just before its `end: NAME` marker on the same thread. Its time counts from launch to there (shared with the
    operations in flight alongside it), and while in flight it fills the lane 'in flight'. A synchronous
    operation's marker follows its own event, inside an Execute that began before it, so it keeps its own time."""
    executes, launches, ends = (collections.defaultdict(list) for _ in range(3))
    for thread, events in lines.items():
        for name, start, end in events:
            if name.startswith("end: "):
                ends[name[5:]].append((start, thread))
            elif name.startswith("ThunkExecutor::Execute"):
                executes[thread].append(start)
            elif not name.startswith(("ThunkExecutor", "Slinky", "ThreadpoolListener")):
                launches[name].append((start, end, thread))
    for intervals in executes.values():
        intervals.sort()
    times, spans, in_flight = collections.Counter(), collections.defaultdict(list), []
    for name, events in launches.items():
        for (start, end, thread), (marker, marker_thread) in zip(sorted(events), _padded(sorted(ends[name]), events)):
            done = _last_start(executes[marker_thread], marker) if marker is not None else None
            times[name] += end - start
            spans[thread].append((start, end))
            if done is not None and done > end:
                in_flight.append((end, done, name))
    times.update(shared_time(in_flight))
    spans["in flight"] = [(start, end) for start, end, _ in in_flight]
    return times, spans


def shared_time(intervals: list) -> collections.Counter:
    """{name: ns} of (start, end, name) intervals, each stretch of time split evenly among the intervals open
    then: operations in flight together share the pool threads, so their sum is the time any was in flight."""
    edges = sorted([(start, 1, i) for i, (start, _, _) in enumerate(intervals)] +
                   [(end, -1, i) for i, (_, end, _) in enumerate(intervals)])
    shares, open_, last = collections.Counter(), set(), None
    for t, step, i in edges:
        if open_ and t > last:
            for j in open_:
                shares[intervals[j][2]] += (t - last) / len(open_)
        (open_.add if step > 0 else open_.discard)(i)
        last = t
    return shares


def _last_start(starts: list, t: int):
    """The latest of the sorted times `starts` at or before t, or None."""
    i = bisect.bisect_right(starts, t)
    return starts[i - 1] if i else None


def _padded(ends: list, launches: list) -> list:
    """One completion marker per launch (a launch without one, at the trace's edge, gets None: its own time)."""
    return ends + [(None, None)] * (len(launches) - len(ends))


def threads_busy(spans: dict) -> collections.Counter:
    """{k: ns of wall time during which exactly k threads were inside an operation}, from the first operation's
    start to the last one's end. A thread's nested or overlapping spans count once."""
    edges = []
    for intervals in spans.values():
        merged = []
        for start, end in sorted(intervals):
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        edges += [(start, 1) for start, _ in merged] + [(end, -1) for _, end in merged]
    busy, count, last = collections.Counter(), 0, None
    for t, step in sorted(edges):
        if last is not None and t > last:
            busy[count] += t - last
        count, last = count + step, t
    return busy


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile", description=__doc__.splitlines()[0])
    p.add_argument("row", choices=list(ROWS))
    p.add_argument("--top", type=int, default=15, help="how many single operations to list")
    args = p.parse_args(argv)
    dump = Path(tempfile.mkdtemp(prefix="cifarjax-hlo-"))
    # Read when the CPU backend starts, which nothing has done yet in this process.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_dump_to={dump}"
    schedule_row(args.row)  # as the benchmark's child for this row
    try:
        report(args.row, args.top, dump)
    finally:  # the HLO dump and the trace are this run's own temporary files
        shutil.rmtree(dump, ignore_errors=True)


def report(name: str, top: int, dump: Path):
    _, kind, batch, changes, _ = ROWS[name]
    rng = np.random.default_rng(0)
    row = CifarjaxRow(kind, batch, changes, rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8),
                      rng.integers(0, 10, 512).astype(np.int32))
    with tempfile.TemporaryDirectory(prefix="cifarjax-trace-") as trace:
        jax.profiler.start_trace(trace)
        rate = row.rate()
        jax.profiler.stop_trace()
        times, spans = op_times(trace_lines(Path(trace)))
    names = max((hlo_names(f.read_text()) for f in dump.glob("*after_optimizations.txt")),
                key=lambda n: sum(ns for op, ns in times.items() if op in n))  # the program the trace ran
    steps = row.steps
    print(f"{name}: {rate:.1f} images/s under the profiler; operation time per step, ms (summed over threads)")
    by_kind = collections.Counter()
    for op, ns in times.items():
        by_kind[kind_of(names.get(op, ("", ""))[1])] += ns
    for (phase, kind_), ns in by_kind.most_common():
        print(f"{ns / 1e6 / steps:9.1f}  {kind_} ({phase})")
    print(f"{sum(times.values()) / 1e6 / steps:9.1f}  total")
    busy = threads_busy(spans)
    print("wall time per step, ms, by how many runtime threads were inside an operation (an asynchronous one in "
          "flight counting as one): " +
          ", ".join(f"{k}: {ns / 1e6 / steps:.1f}" for k, ns in sorted(busy.items())))
    print("largest operations:")
    for op, ns in times.most_common(top):
        shape, source = names.get(op, ("?", "?"))
        print(f"{ns / 1e6 / steps:9.1f}  {op[:28]:28s} {shape[:36]:36s} {source[-70:]}")


if __name__ == "__main__":
    main()

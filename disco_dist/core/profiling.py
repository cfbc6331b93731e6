"""`--profile FIRST:LAST`: torch.profiler over a window of a run's steps (training) or sentence groups (the cache pass),
written per rank as a Chrome trace (open it in https://ui.perfetto.dev or chrome://tracing) and a table of the ops
that took the most time (self time on the device on a GPU, on the host on a CPU).

Nothing is profiled, and nothing waits for the device, outside the window. Its edges synchronise the device once
each, so that the time a step takes in the window is the device's, not the host's queueing.
"""

import argparse
import time
from pathlib import Path

import torch


def profile_window(text: str) -> tuple:
    """argparse type of --profile: 'FIRST:LAST' -> (FIRST, LAST), the window FIRST+1 .. LAST."""
    first, _, last = text.partition(":")
    try:
        window = int(first), int(last)
    except ValueError:
        window = None
    if window is None or not 0 <= window[0] < window[1]:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give FIRST:LAST, 0 <= FIRST < LAST, e.g. 20:25 profiles steps 21-25 after 20 of warm-up"
        )
    return window


class WindowProfiler:
    """Profiles units FIRST+1 .. LAST of a run (`begin(n)` before unit n, `end(n)` after it; n counts from 1), then
    writes FOLDER/rank-R.trace.json.gz and FOLDER/rank-R.top.txt and says so in one line (rank 0). With no window
    it does nothing. A run resumed inside the window (or past it) profiles nothing."""

    def __init__(self, window: tuple | None, folder: Path, rank: int, device: torch.device, unit: str = "step"):
        self.window, self.folder, self.rank, self.device, self.unit = window, Path(folder), rank, device, unit
        self.profiler = None
        self.started = 0.0

    def begin(self, number: int) -> None:
        if self.window is None or self.profiler is not None or number != self.window[0] + 1:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._synchronize()
        self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
        self.profiler.start()
        self.started = time.perf_counter()

    def end(self, number: int, log=print) -> None:
        if self.profiler is None or number != self.window[1]:
            return
        self._synchronize()
        seconds = time.perf_counter() - self.started
        profiler, self.profiler = self.profiler, None
        profiler.stop()
        first, last = self.window[0] + 1, self.window[1]
        self.folder.mkdir(parents=True, exist_ok=True)
        trace, top = self.folder / f"rank-{self.rank}.trace.json.gz", self.folder / f"rank-{self.rank}.top.txt"
        profiler.export_chrome_trace(str(trace))
        on_device = self.device.type == "cuda"
        table = profiler.key_averages().table(
            sort_by="self_device_time_total" if on_device else "self_cpu_time_total", row_limit=25
        )
        each = f"{seconds / (last - first + 1) * 1e3:.2f} ms a {self.unit}"
        what = f"{self.unit}s {first}-{last} on rank {self.rank} ({self.device})"
        top.write_text(f"{what}: {each}; ops by self {'device' if on_device else 'host'} time\n{table}\n")
        if self.rank == 0:
            log(f"profiled {what}: {each}; trace {trace}, top ops {top}")

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

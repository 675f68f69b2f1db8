"""Live progress of a trainer run: tail verl's file-logger JSONL and print one line per finished step."""

from __future__ import annotations

import threading
import time

from verl_mtp_example import metrics_view as mv

# verl writes a step's rollout dump from a background thread: wait this long for it before printing the
# step's line without the exact-answer rate
ROLLOUT_DUMP_GRACE_S = 3.0
STARTUP_NOTICE_EVERY_S = 30.0


def log(msg: str) -> None:
    print(f"[launch] {msg}", flush=True)


class StepPrinter:
    """Prints each new step of ``metrics_file`` once, with the exact-answer rate from ``rollout_dir``."""

    def __init__(self, metrics_file: str, rollout_dir: str, total: int, heads: int):
        self.metrics_file, self.rollout_dir, self.total, self.heads = metrics_file, rollout_dir, total, heads
        self.printed: set[int] = set()
        self.stop = threading.Event()
        self.t0 = time.time()
        self.last_output = time.time()

    def poll(self, final: bool = False) -> None:
        metrics = mv.read_metrics(self.metrics_file)
        for step in sorted(metrics):
            if step in self.printed:
                continue
            rate = mv.exact_rate(self.rollout_dir, step)
            if rate is None and not final and time.time() - self.last_output < ROLLOUT_DUMP_GRACE_S:
                return
            data = dict(metrics[step], **({mv.EXACT: rate} if rate is not None else {}))
            print(mv.format_step_line(step, self.total, data, self.heads), flush=True)
            self.printed.add(step)
            self.last_output = time.time()

    def watch(self) -> None:
        """Poll until :attr:`stop` is set; say what is happening while no step has finished yet."""
        announced = 0.0
        while not self.stop.wait(0.5):
            self.poll()
            idle = time.time() - self.last_output
            if not self.printed and idle - announced >= STARTUP_NOTICE_EVERY_S:
                announced = idle
                log(f"... trainer starting (Ray workers, model build, first rollout): {time.time() - self.t0:.0f}s")

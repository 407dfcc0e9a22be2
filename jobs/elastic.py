"""llmos's elastic restart: the training driver follows the controller's books, attempt by attempt.

Ray Train V2 handles a lost worker by retrying on its own view of the cluster, which stays stale for
tens of seconds after a node goes (measured here: ~70 s by default, 39 s tuned), and it knows
nothing of llmos's bookings, priorities or preemptions. So under the controller, Ray Train runs
each attempt with no retries of its own (`max_failures=0`) and `run_elastic` decides what is next:

- a booked node left the cluster (the controller requeues the gang as soon as Ray's node table says
  so): a failure, counted against `restart_budget.failures`. The job is admitted again at the
  largest size that fits now (at least `workers.min`) and resumes from the newest checkpoint.
- a worker process died on a live node: a failure too; the next attempt runs on the same bookings.
  Which of the two it was, the books alone cannot say at once: a node that crashed is in Ray's node
  table until its health checks have failed for a while (~15 s by Ray's defaults). So after a
  failed attempt the driver asks every booked node to run a tiny task; one that answers is alive.
- the controller preempted a booking (a higher priority, a drained node): a preemption, counted
  against `restart_budget.preemptions`. The workers checkpoint and stop at their next reporting
  step, and the job waits in the queue to be admitted again.
- while the job runs below `workers.max`, a growth request for the missing workers waits in the
  queue at the job's priority; once the controller places it, the workers stop at the next
  checkpoint step and the next attempt runs on both bookings. Growth costs no budget.

The workers learn of a stop through the controller: the driver writes a directive into the running
request's details (`stop`: the attempt, when — "now" or at the next "checkpoint" — and why); rank 0
reads it at every reporting step and broadcasts the answer, so every rank stops at the same step.
The running request's details show `workers`, `attempt`, `restarts`, `failures`, `preemptions` and
the last `step`; a request the job gave up ends with the reason and the id that replaced it.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from cluster.admin import Admin, ProgressReporter
from cluster.console import UserError
from cluster.requests import RequestStatus
from jobs.admission import WorkerPlacement, admit, gang_request, placement_for
from jobs.spec import TrainingJob
from jobs.training_loop import StepReport, progress_details

# How often the driver looks at its bookings while an attempt runs.
WATCH_INTERVAL_S = 0.25
# After a failed attempt whose nodes do not all answer, the longest wait for the controller to see a
# node loss before taking the failure for a dead process on a live node. Ray declares a crashed node
# dead after ~15 s of failed health checks by default; the controller reads its node table every 0.5 s.
NODE_LOSS_WAIT_S = 60.0

# Runs one attempt on a placement and returns its last report; raises TrainingAttemptFailed.
AttemptRunner = Callable[[TrainingJob, WorkerPlacement, ProgressReporter, dict[str, Any]], StepReport]
# Given Ray node ids, asks each node to answer, and returns a check that is True once all of them have.
NodeProbe = Callable[[list[str]], Callable[[], bool]]


class StopWhen(StrEnum):
    NOW = "now"  # at the next reporting step
    CHECKPOINT = "checkpoint"  # at the next checkpoint step


class Outcome(StrEnum):
    FINISHED = "finished"
    STOPPED = "stopped"  # by a directive, with every booking held: resume, growing if placed
    PREEMPTED = "preempted"
    NODE_LOST = "node_lost"
    WORKER_FAILED = "worker_failed"


class TrainingAttemptFailed(RuntimeError):
    """An attempt ended with an error (a worker died, a node went, the code raised)."""


class RestartBudgetExhausted(RuntimeError):
    """More failures or preemptions than the job's `restart_budget` allows."""


def stop_directive(attempt: int, when: StopWhen, why: str) -> dict:
    return {"stop": {"attempt": attempt, "when": when.value, "why": why}}


def wants_stop(details: dict, attempt: int, checkpoint_step: bool) -> bool:
    """Whether the directive in a request's details stops `attempt` at this reporting step."""
    directive = details.get("stop") or {}
    if directive.get("attempt") != attempt:
        return False
    return directive.get("when") == StopWhen.NOW or checkpoint_step


def classify(
    failed: bool,
    final: StepReport | None,
    job: TrainingJob,
    bookings: list[RequestStatus],
    at_start: dict[str, RequestStatus],
) -> Outcome:
    """What ended an attempt, from how it ended and the controller's books afterwards.

    The controller counts a booking's node losses (`failures`) apart from its preemptions; `at_start`
    holds each booking as the attempt started. The counts, not the state, say whether the controller
    took a booking off its nodes: it may have placed it again before the driver looks.
    """
    if not failed and final is not None and final.step >= job.steps:
        return Outcome.FINISHED
    if _counted("failures", bookings, at_start):
        return Outcome.NODE_LOST
    if _counted("preemptions", bookings, at_start) or not all(status.state.holding for status in bookings):
        return Outcome.PREEMPTED
    return Outcome.WORKER_FAILED if failed else Outcome.STOPPED


def _counted(count: str, bookings: list[RequestStatus], at_start: dict[str, RequestStatus]) -> bool:
    """Whether the controller counted a node loss or a preemption (`count`) of a booking since `at_start`."""
    return any(getattr(status, count) > getattr(at_start.get(status.id, status), count) for status in bookings)


def _taken_off(bookings: list[RequestStatus], at_start: dict[str, RequestStatus]) -> bool:
    """Whether the controller took a booking off its nodes since `at_start`, even if it placed it again since."""
    return (
        not all(status.state.holding for status in bookings)
        or _counted("failures", bookings, at_start)
        or _counted("preemptions", bookings, at_start)
    )


def format_progress(details: dict[str, Any]) -> str:
    """A driver progress line from what rank 0 reported to the controller."""
    parts = [
        f"step {details['step']}/{details.get('steps', '?')}",
        f"loss {details['loss']:.3f}" if "loss" in details else "",
        f"held-out {details['heldout_loss']:.3f}" if "heldout_loss" in details else "",
        f"{details.get('tokens_per_s', 0):,.0f} tok/s",
        f"{details.get('world_size', '?')} workers",
        f"resumed from step {details['resumed_from_step']}" if details.get("resumed_from_step") else "",
        f"restarts {details['restarts']}" if details.get("restarts") else "",
    ]
    return "  ".join(part for part in parts if part)


@dataclass
class Counters:
    attempts: int = 0
    failures: int = 0
    preemptions: int = 0
    replaced: list[str] = field(default_factory=list)

    @property
    def restarts(self) -> int:
        return self.failures + self.preemptions


class AttemptWatcher(threading.Thread):
    """During one attempt: follows the bookings, keeps a growth request queued, prints progress.

    On a lost booking it tells the workers to stop now; once the growth request is placed, to stop at
    the next checkpoint step. Progress lines come from what rank 0 reported to the controller, since
    worker output is not forwarded to the driver.
    """

    def __init__(
        self,
        admin: Admin,
        job: TrainingJob,
        bookings: list[RequestStatus],
        growth: RequestStatus | None,
        attempt: int,
        on_progress: Callable[[str], None],
    ):
        super().__init__(daemon=True, name="llmos-train-watch")
        self.admin, self.job, self.attempt, self.on_progress = admin, job, attempt, on_progress
        self.bookings, self.growth = list(bookings), growth
        self.stopping = threading.Event()
        self.directive: StopWhen | None = None
        # What an earlier attempt reported last is no news for this one.
        self.last_step: int | None = bookings[0].details.get("step")

    @property
    def workers(self) -> int:
        return sum(len(status.bundles) for status in self.bookings)

    def poll(self) -> None:
        self.bookings = [self.admin.status(status.id) for status in self.bookings]
        lost = [status for status in self.bookings if not status.state.holding]
        if lost and self.directive is not StopWhen.NOW:
            self._direct(
                StopWhen.NOW, f"the controller took request(s) {', '.join(s.id for s in lost)} off their nodes"
            )
        if not lost:
            self._tend_growth()
        details = self.bookings[0].details
        if details.get("attempt") == self.attempt and details.get("step", self.last_step) != self.last_step:
            self.last_step = details["step"]
            self.on_progress(format_progress(details))

    def _tend_growth(self) -> None:
        missing = self.job.workers.max - self.workers
        if missing <= 0 or self.directive is not None:
            return
        if self.growth is None:
            pool = self.bookings[0].bundles[0].pool
            self.growth = self.admin.submit(gang_request(self.job, missing, name=f"{self.job.name}-grow", pool=pool))
            self.on_progress(
                f"running {self.workers} of {self.job.workers.max} workers: growth request {self.growth.id} queued"
            )
        else:
            self.growth = self.admin.status(self.growth.id)
        if self.growth.state.holding:
            placed = len(self.growth.bundles)
            self._direct(StopWhen.CHECKPOINT, f"growth request {self.growth.id} placed {placed} more worker(s)")
        elif self.growth.state.final:
            self.growth = None

    def _direct(self, when: StopWhen, why: str) -> None:
        # Recorded once the controller has it: a failed report leaves it to the next poll to send again.
        self.admin.report(self.bookings[0].id, stop_directive(self.attempt, when, why))
        self.directive = when
        where = "reporting" if when is StopWhen.NOW else "checkpoint"
        self.on_progress(f"stopping attempt {self.attempt} at its next {where} step: {why}")

    def run(self) -> None:
        while not self.stopping.wait(WATCH_INTERVAL_S):
            try:
                self.poll()
            except Exception:  # watching is best effort; the next poll makes up for a missed one
                continue

    def stop(self) -> None:
        self.stopping.set()
        self.join(WATCH_INTERVAL_S + 30)
        with contextlib.suppress(Exception):
            self.poll()  # the last progress line, and the books as they are now


class ElasticRun:
    """One TrainingJob under the controller, from admission to its last step, across attempts."""

    def __init__(
        self,
        job: TrainingJob,
        admin: Admin,
        run_attempt: AttemptRunner,
        *,
        probe_nodes: NodeProbe,
        on_progress: Callable[[str], None] = print,
        wait_timeout_s: float | None = None,
    ):
        self.job, self.admin, self.run_attempt, self.probe_nodes = job, admin, run_attempt, probe_nodes
        self.on_progress, self.wait_timeout_s = on_progress, wait_timeout_s
        self.counters = Counters()
        self.bookings: list[RequestStatus] = []
        self.growth: RequestStatus | None = None

    @property
    def request_id(self) -> str:
        return self.bookings[0].id

    def run(self) -> tuple[str, StepReport]:
        """Train to the last step; returns (the final request id, the last report).

        Raises TrainingAttemptFailed or RestartBudgetExhausted when it gives up; every booking is
        released either way, the running request finished or failed with the reason.
        """
        try:
            self._admit()
            while True:
                # As the books have it now: since it was placed, a booking may have been moved or taken back.
                self.bookings = [self.admin.status(status.id) for status in self.bookings]
                at_start = {status.id: status for status in self.bookings}
                failed, final = self._attempt()
                bookings = self._settle(failed is not None, at_start)
                outcome = classify(failed is not None, final, self.job, bookings, at_start)
                if outcome is Outcome.FINISHED:
                    self._report_last(final)
                    self._release(failed=False, reason="")
                    return self.request_id, final
                self._next_attempt(outcome, failed)
        except BaseException as error:
            self._release(failed=True, reason=one_line(error))
            raise

    def _admit(self) -> None:
        admission = admit(self.job, self.admin, on_progress=self.on_progress, wait_timeout_s=self.wait_timeout_s)
        self.bookings = [admission.status]
        placement = placement_for(self.bookings)
        self.on_progress(
            f"training {self.job.name}: request {self.request_id} placed {placement.max_workers} worker"
            f"{'s' if placement.max_workers > 1 else ''} on {', '.join(admission.status.nodes)}; "
            f"checkpoints in {self.job.checkpoint_directory}"
        )

    def _attempt(self) -> tuple[BaseException | None, StepReport | None]:
        counters = self.counters
        counters.attempts += 1
        placement = placement_for(self.bookings)
        details = {
            "workers": placement.max_workers,
            "nodes": [node for status in self.bookings for node in status.nodes],
            "attempt": counters.attempts,
            "restarts": counters.restarts,
            "failures": counters.failures,
            "preemptions": counters.preemptions,
            "requests": [status.id for status in self.bookings],
            "replaced": counters.replaced,
            "stop": None,
        }
        try:
            self.admin.mark_running(self.request_id, details)
            for extra in self.bookings[1:]:
                self.admin.mark_running(extra.id, {"part_of": self.request_id})
        except UserError as error:  # taken off its nodes since it was placed: the books say how
            return TrainingAttemptFailed(f"attempt {counters.attempts} could not start: {error}"), None
        watcher = AttemptWatcher(self.admin, self.job, self.bookings, self.growth, counters.attempts, self.on_progress)
        watcher.start()
        try:
            final = self.run_attempt(self.job, placement, self.admin.reporter(self.request_id), details)
            return None, final
        except TrainingAttemptFailed as error:
            return error, None
        finally:
            watcher.stop()
            self.growth = watcher.growth

    def _settle(self, failed: bool, at_start: dict[str, RequestStatus]) -> list[RequestStatus]:
        """The bookings now. After a failed attempt, once the controller took a booking off its nodes, or every
        booked node answered (so a process died on a live node), or `NODE_LOSS_WAIT_S` passed."""
        self.bookings = [self.admin.status(status.id) for status in self.bookings]
        if not failed:
            return self.bookings
        node_ids = sorted({bundle.node_id for status in self.bookings for bundle in status.bundles if bundle.node_id})
        answered = self.probe_nodes(node_ids)
        deadline = time.monotonic() + NODE_LOSS_WAIT_S
        while not (_taken_off(self.bookings, at_start) or answered() or time.monotonic() >= deadline):
            time.sleep(WATCH_INTERVAL_S)
            self.bookings = [self.admin.status(status.id) for status in self.bookings]
        return self.bookings

    def _next_attempt(self, outcome: Outcome, failed: BaseException | None) -> None:
        counters, budget = self.counters, self.job.restart_budget
        if outcome is Outcome.STOPPED:
            if self.growth is not None:
                # As the books have it now: a higher priority may have taken it back since it was placed.
                self.growth = self.admin.status(self.growth.id)
            if self.growth is not None and self.growth.state.holding:
                self.bookings.append(self.growth)
                self.growth = None
                self.on_progress(f"growing to {placement_for(self.bookings).max_workers} workers")
            return
        if outcome is Outcome.PREEMPTED:
            counters.preemptions += 1
            if counters.preemptions > budget.preemptions:
                raise RestartBudgetExhausted(
                    f"preempted {counters.preemptions} times; restart_budget.preemptions is {budget.preemptions}"
                )
        else:
            counters.failures += 1
            if counters.failures > budget.failures:
                raise RestartBudgetExhausted(
                    f"{counters.failures} failures, the last: {one_line(failed)}; "
                    f"restart_budget.failures is {budget.failures}"
                ) from failed
        if outcome is Outcome.WORKER_FAILED:
            self.on_progress(f"attempt {counters.attempts} failed ({one_line(failed)}); restarting on the same nodes")
            return
        if outcome is Outcome.NODE_LOST:
            why = f"a booked node left the cluster (failure {counters.failures} of {budget.failures})"
        else:
            why = f"preempted (preemption {counters.preemptions} of {budget.preemptions})"
        if all(status.state.holding for status in self.bookings):
            nodes = ", ".join(node for status in self.bookings for node in status.nodes)
            self.on_progress(f"{why}; the controller has placed it again, on {nodes}: restarting there")
            return
        self.on_progress(f"{why}; admitting the job again at the size that fits now")
        replaced = [status.id for status in self.bookings]
        self._release(failed=False, reason=f"{why}; the job was admitted again")
        counters.replaced.extend(replaced)
        self._admit()

    def _report_last(self, final: StepReport) -> None:
        """The last step, as the driver knows it: rank 0 reports without a round trip, so what it sends while the
        controller restarts (with the head node, say) is lost, and a job may end before the controller is back.
        Best effort: the job is trained either way."""
        attempt = {"attempt": self.counters.attempts, "restarts": self.counters.restarts}
        with contextlib.suppress(Exception):
            self.admin.report(self.request_id, progress_details(final, attempt))

    def _release(self, *, failed: bool, reason: str) -> None:
        """Give back every booking and the growth request; best effort, so a failing controller call
        never hides the error that ended the run."""
        for status in self.bookings:
            with contextlib.suppress(Exception):
                self.admin.complete(status.id, failed=failed, reason=reason)
        if self.growth is not None:
            with contextlib.suppress(Exception):
                self.admin.cancel(self.growth.id)
            self.growth = None


def one_line(error: BaseException | None) -> str:
    """One line for a log or a request's reason: the summary, and the innermost error when there is one."""
    if error is None:
        return ""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return summary[:400]

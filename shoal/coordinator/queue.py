import heapq
import itertools
from collections.abc import Callable

from shoal.coordinator.jobs import Job


class JobQueue:
    """Jobs waiting for a worker: lower priority values first, then the requester's kudos (more first), then age."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, float, int, Job]] = []
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, job: Job) -> None:
        job.arrival = job.arrival or next(self._arrivals)
        heapq.heappush(self._heap, (job.priority, -job.kudos, job.arrival, job))
        job.mark("QUEUED")

    def ordered(self) -> list[Job]:
        return [entry[-1] for entry in sorted(self._heap)]

    def remove(self, job: Job) -> bool:
        kept = [entry for entry in self._heap if entry[-1] is not job]
        found = len(kept) < len(self._heap)
        self._heap = kept
        heapq.heapify(self._heap)
        return found

    def pop_for(self, models: set[str], accept: Callable[[Job], bool] = lambda job: True) -> Job | None:
        """The first job for any of these models that `accept` takes."""
        for job in self.ordered():
            if job.model in models and accept(job):
                self.remove(job)
                return job
        return None

import heapq
import itertools

from shoal.coordinator.jobs import Job


class JobQueue:
    """Jobs waiting for a worker, in (priority, arrival) order; lower priority values go first."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Job]] = []
        self._arrivals = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def push(self, job: Job) -> None:
        job.arrival = job.arrival or next(self._arrivals)
        heapq.heappush(self._heap, (job.priority, job.arrival, job))
        job.mark("QUEUED")

    def remove(self, job: Job) -> bool:
        kept = [entry for entry in self._heap if entry[2] is not job]
        found = len(kept) < len(self._heap)
        self._heap = kept
        heapq.heapify(self._heap)
        return found

    def pop_for(self, models: set[str]) -> Job | None:
        """The first job for any of these models."""
        for entry in sorted(self._heap):
            if entry[2].model in models:
                self.remove(entry[2])
                return entry[2]
        return None

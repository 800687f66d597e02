import heapq
import itertools

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

    def remove(self, job: Job) -> bool:
        kept = [entry for entry in self._heap if entry[-1] is not job]
        found = len(kept) < len(self._heap)
        self._heap = kept
        heapq.heapify(self._heap)
        return found

    def pop_for(self, models: set[str]) -> Job | None:
        """The first job for any of these models."""
        for entry in sorted(self._heap):
            if entry[-1].model in models:
                self.remove(entry[-1])
                return entry[-1]
        return None

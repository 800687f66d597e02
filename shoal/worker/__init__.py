"""A worker: connects out to the coordinator, advertises what it holds, pulls jobs, runs the engine."""

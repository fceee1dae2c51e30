"""The volunteer: join a run, sync its state, train locally, submit signed updates, apply the aggregates."""

"""Executors run a SchedulerOutput on one worker or on many."""

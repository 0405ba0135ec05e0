"""Accounting of runs: the run record now; resource samplers, step timers and communication counters next."""

"""Scheduling: where VMs may go and when a migration may start.

:mod:`.governor` is the anti-thrashing admission gate (limits, cooldowns, back-off, circuit breaker). Decision modules
here are pure: they take plain data and an injected clock value, and import no I/O package.
"""

"""Live migration: the protocol's phases (:mod:`.states`) and its pure step function (:mod:`.machine`).

``states`` and ``machine`` do no I/O and are importable anywhere; the runner that executes the machine's commands
against agents and the journal lives beside them and is the only part that touches the outside world.
"""

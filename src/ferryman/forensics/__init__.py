"""Forensic evidence that does not depend on where it is kept: the sealed (encrypted, authenticated) file format.

The agent captures evidence into this format (:mod:`ferryman.agent.forensics`); whoever holds the key (the
controller's evidence store) verifies and opens it. Nothing here captures, stores or wraps keys.
"""

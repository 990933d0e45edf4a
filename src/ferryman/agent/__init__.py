"""The host agent: executes what the controller decides on one hypervisor host. It decides nothing about placement."""

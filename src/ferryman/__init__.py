"""Ferryman: a control plane that moves virtual machines between hypervisor hosts safely."""

__version__ = "0.1.0"

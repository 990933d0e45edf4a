"""The local lab: a controller and several host agents on loopback addresses of one machine, with real QEMU guests."""

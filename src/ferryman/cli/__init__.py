"""The ``ferryman`` command line. It talks to the controller's REST API only."""

"""The controller: REST API, CMDB access, PKI, agents' reports and the reconciliation loop."""

"""Authentication of people, tools and hosts; secrets; the TLS-aware HTTP server both daemons run."""

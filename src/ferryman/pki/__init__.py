"""Ferryman's public-key infrastructure: the controller CA, host keys and CSRs, peer identities, TLS contexts.

Every connection between Ferryman processes, and every QEMU migration and NBD stream, is mutual TLS with certificates
from one CA that the controller owns (:mod:`ferryman.pki.ca`). A host makes its own key and sends only a CSR
(:mod:`ferryman.pki.csr`); the CA writes the certificate's subject ``CN=<name>, OU=<role>, O=Ferryman`` itself. A
handshake proves "certified by our CA"; :mod:`ferryman.pki.identity` then decides whether the peer is the one this
connection is for (role, name, validity, revocation), and spells the DN for QEMU's ``authz-simple``.
:mod:`ferryman.pki.tls` builds the ``ssl`` contexts, TLS 1.2 or newer, trusting our CA only.

These modules do no network I/O and decide nothing about placement or migration; the revocation list is consulted
through a callback, so the CMDB stays out of this package.
"""

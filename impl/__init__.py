"""execstream: stream container exec output over gRPC to any number of clients.

The packages:

* :mod:`execstream.wire` — the messages and grpc glue generated from ``spec/exec.proto``;
* :mod:`execstream.server` — the reference server and the executor API for embedding;
* :mod:`execstream.client` — the typed client library;
* :mod:`execstream.conformance` — the conformance suite.
"""

__version__ = "0.1.0"

"""The ``orders`` command line.

- :mod:`worker.cli.app`: the app, the verbs that run the service (``worker``,
  ``relay``, ``shim``) and set it up (``migrate``, ``topology``, ``products``, ``token``);
- :mod:`worker.cli.ops`: ``status`` and ``doctor``; :mod:`worker.cli.dlq`: ``dlq``;
- :mod:`worker.cli.tools`: ``audit`` and ``webhook replay``;
- :mod:`worker.cli.common`: options, settings and failing plainly, shared by all.
"""

from worker.cli.app import app, main

__all__ = ["app", "main"]

"""The chaos run: a mixed load through the real stack while processes die and dependencies go away.

``python -m scripts.chaos --help`` (from the repository's root) says what it does
(the docstring of :mod:`scripts.chaos.run`); docs/chaos.md says more.
The modules, in the order a run goes through them:

- ``config``: :class:`ChaosConfig`, the constants the modules share, :class:`ChaosError`;
- ``processes``: the processes a run starts, the TCP proxies' child process, a private Redis;
- ``stack``: the run's world (database, vhost, fakes, the service's processes) and its outages;
- ``plan``: the orders and malformed messages drawn from the seed;
- ``driver``: sends the load (bus and shim) and plays the buyers;
- ``injector``: the seeded kills and outages;
- ``observe``: quiescence, then a snapshot of the end state;
- ``checks``: what must hold of that end state;
- ``report``: the tables;
- ``run``: :func:`run` (one run, as the test suite calls it) and :func:`main` (the command line).
"""

from .config import ChaosConfig, ChaosError
from .run import main, run

__all__ = ["ChaosConfig", "ChaosError", "main", "run"]

"""Operator-side tooling: the processes fedplug's commands start, and Flower's Deployment Engine.

- :mod:`~fedplug.deployment.processes`: the one process supervisor, used by both engines
  (the Simulation Engine's process and Flower's SuperLink, SuperNode and ``flwr`` CLI);
- :mod:`~fedplug.deployment.network`: ``HOST:PORT`` addresses, probing and waiting;
- :mod:`~fedplug.deployment.flower_cli`: Flower's commands with fedplug's flags, run
  submission and its structured status lines;
- :mod:`~fedplug.deployment.serve`: ``fedplug superlink`` and ``fedplug supernode``;
- :mod:`~fedplug.deployment.certificates`: a test federation's CA, TLS certificate and keys.

Nothing that runs inside a federation (the ClientApp, the ServerApp, the node runtime)
imports this package: the layers contract in the root ``pyproject.toml`` enforces it.
"""

"""Every distribution's tests share fedplug's end-to-end helpers (the ``run_fedplug`` fixture)."""

pytest_plugins = ["fedplug.testing.runs"]

"""The conformance suite: what "supported backend" means, checked the same way everywhere.

A backend's tests run it with two lines::

    from fedplug.testing import BackendConformance

    class TestConformance(BackendConformance):
        backend_name = "mything"

Every check is a test method; each failure message says what to fix.
"""

from fedplug.testing.conformance import HEAVY_FRAMEWORKS, SPECS, BackendConformance

__all__ = ["HEAVY_FRAMEWORKS", "SPECS", "BackendConformance"]

"""The misbehaving plugins misbehave only when a test asks for it.

They live in the shared test environment, where other tools run ``fedplug`` too: by
default they register nothing and do nothing. A test sets ``FEDPLUG_TESTPLUGINS_MISBEHAVE=1``.
"""

import os

MISBEHAVE = os.environ.get("FEDPLUG_TESTPLUGINS_MISBEHAVE") == "1"

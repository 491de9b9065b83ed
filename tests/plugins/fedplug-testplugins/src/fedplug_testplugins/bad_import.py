"""A plugin whose import fails, as when its framework is missing."""

import fedplug_framework_that_does_not_exist  # noqa: F401

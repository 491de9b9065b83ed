"""A plugin with a misspelled hook name, caught by check_pending()."""

import fedplug


@fedplug.hookimpl
def fedplug_register_backend(register):  # missing the final "s"
    pass

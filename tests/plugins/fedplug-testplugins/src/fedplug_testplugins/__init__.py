"""Test plugins for fedplug discovery: one module per behaviour."""

"""Shipped recipes (YAML), loadable by name: ``edgemt pipeline demo``."""

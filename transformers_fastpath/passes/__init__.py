"""Optimization passes: reversible conversions of a loaded model (see :class:`base.Pass`)."""

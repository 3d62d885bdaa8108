"""How fastpath reaches transformers: the start-up bootstrap, the wrappers, and the on/off switches.

Kept import-light: the ``.pth`` bootstrap imports this package at every interpreter start-up.
"""

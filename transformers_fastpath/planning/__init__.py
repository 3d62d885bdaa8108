"""Planning: what fastpath will do to a model, decided before any weight is loaded.

``policy/`` (the declarative settings and their validation), ``hardware`` (what the machine has),
``model_info`` (what the config says, counted on the meta device), ``tasks`` (pipeline task
names), ``resolution`` (``resolve``: request x policy x hardware -> plan) and ``plan`` (the
immutable result). Nothing here imports torch or transformers at module import: ``explain`` and
the start-up bootstrap stay cheap.
"""

"""The pipeline runtime: what a fastpath pipeline does around transformers' own per call.

``batching`` (length-sorted batches, results in the caller's order), ``resilience`` (out of
memory and failing inputs), ``outputs`` (each input's own tokens at any batch size), and
``replicas`` / ``replica_workers`` (one replica per GPU, in threads or worker processes).
"""

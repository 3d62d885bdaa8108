"""Load-time settings: where the weights go and in which form, as ``from_pretrained`` arguments.

``placement`` (one device, balanced shards, replicas, tensor parallel, and the memory arithmetic
that decides between them) and ``quantization`` (policy methods -> ``quantization_config``).
"""

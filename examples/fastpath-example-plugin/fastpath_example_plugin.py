"""An example transformers-fastpath plugin.

It contributes one policy rule (small pipeline batches for BERT-family models, say because
this team's inputs are long) and leaves a note on every plan it sees.
"""

from __future__ import annotations

from transformers_fastpath import hookimpl


@hookimpl
def fastpath_policy_rules(hardware):
    """BERT-family pipelines use batch size 8 on this team's machines."""
    return [{"name": "example-small-bert-batches", "match": {"model_type": ["bert", "roberta"]}, "batch_size": 8}]


@hookimpl
def fastpath_resolve_plan(plan):
    """Runs after the built-in plugins resolved 'auto': values here are concrete."""
    plan.note(f"fastpath-example-plugin saw {plan.model.model_type} with batch_size={plan.get('batch_size')}")

"""The contract every optimization pass (built-in or third-party) fulfils."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

    from ..planning.model_info import ModelInfo
    from ..planning.plan import Plan, PlanBuilder

__all__ = ["Pass"]


@runtime_checkable
class Pass(Protocol):
    """A reversible change to a loaded model.

    Attributes:
        name: unique name, shown in plans (``"fused_encoder"``).
        setting: the policy key that turns it on (``True``/``"auto"``) or off (``False``).
        changes_state_dict: True when, while applied, ``model.state_dict()`` differs from the
            canonical one (keys or tensors). Such passes are reverted around every save and
            re-applied after; passes that keep the state_dict canonical are left in place.
        mutates_weights: optional, False when absent. True when ``apply`` writes into existing
            weight tensors in place (folding a norm into a linear...): the runner then keeps a
            host-memory copy of the weights while the pass applies, so a failure can restore
            them bit for bit. Without it, a failed apply that wrote in place raises
            :class:`~transformers_fastpath.errors.RollbackError`.

    Applying is transactional (see :func:`~transformers_fastpath.passes.runner.apply_plan`):
    whatever ``apply`` changed before raising is undone by the runner even when ``revert`` misses
    it -- modules, parameters, buffers, hooks, instance attributes and method overrides.
    """

    name: str
    setting: str
    changes_state_dict: bool

    def supports(self, info: ModelInfo, plan: PlanBuilder | Plan) -> str | None:
        """From the config alone (no weights): None when the pass can run, else the reason it cannot."""

    def apply(self, model: nn.Module, plan: Plan) -> None:
        """Convert ``model`` in place. Raise :class:`~transformers_fastpath.errors.PassSkipped` to
        decline with a reason after looking at the real modules; any other exception is a failure
        and the runner rolls the model back."""

    def revert(self, model: nn.Module) -> None:
        """Undo :meth:`apply` exactly: afterwards the state_dict (keys and tensors) and module types
        are those from before ``apply``. Must be safe to call on a model ``apply`` left half-done."""

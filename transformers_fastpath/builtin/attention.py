"""Built-in plugin: the attention kernel family and the SDPA backend chain, per model and hardware.

Resolves ``attn_implementation`` (``builtin.defaults`` only acts on values still ``auto``, and
this plugin runs before it: pluggy calls later-registered ``tryfirst`` implementations first)
and ``sdpa_backends``, and registers the ``sdpa_backends`` pass.

``attn_implementation = auto``:

1. ``flash_attention_3`` on Hopper (sm90) and ``flash_attention_2`` on sm80+ when flash-attn is
   installed, the dtype is half precision and the architecture has a flash-attn path -- except
   when ``generate`` is compiled (``compile = true``): flash-attn breaks the compiled graph of a
   static-cache decode step, so ``sdpa`` is chosen there;
2. ``sdpa`` where the architecture has it;
3. ``flex_attention`` on a GPU when the architecture has flex but no SDPA path;
4. ``eager``.

An explicit ``flash_attention_2/3`` from a policy that cannot run here (no flash-attn, no GPU,
float32) becomes ``sdpa`` with the reason, unless ``strict = true`` (then it is kept and loading
fails with transformers' own error). Arguments the caller passed are never changed.

``sdpa_backends = auto`` (measured on an H100 with torch 2.11: cuDNN ran prefill and masked
decode attention about 2x faster than flash / efficient, and is the only fast kernel taking
masks *and* grouped KV heads):

- Hopper (sm90): ``[cudnn, flash, efficient, math]``;
- sm80-sm89: ``[flash, efficient, math]``;
- Blackwell (sm100+): ``[flash, efficient, math]``: cuDNN attention gives wrong greedy output
  there with few KV heads (pytorch#193893);
- older GPUs: ``[efficient, math]`` (no flash kernel before sm80);
- float32 on CUDA: ``[efficient, math]`` (flash and cuDNN take half precision only);
- CPU: ``[flash, math]`` (torch's CPU flash kernel takes masks and grouped heads);
- other devices: torch's own choice (the pass is skipped).
"""

from __future__ import annotations

import importlib.util
from typing import NamedTuple

from ..hookspecs import hookimpl
from ..passes.base import Pass
from ..passes.generation import is_generative
from ..passes.sdpa_backends import SdpaBackendsPass
from ..planning.plan import SOURCE_ARGUMENT, PlanBuilder
from .defaults import _resolve_dtype

__all__ = ["auto_sdpa_chain", "choose_attention", "flash_problem"]

PASS_NAME = SdpaBackendsPass.name
HALF = ("float16", "bfloat16")
# flash-attn packages: version -> (module transformers imports, pip name)
FLASH_PACKAGES = {2: ("flash_attn", "flash-attn"), 3: ("flash_attn_interface", "flash-attn-3")}


@hookimpl(tryfirst=True)
def fastpath_resolve_plan(plan: PlanBuilder) -> None:
    _resolve_dtype(plan)  # the attention choice depends on it; a no-op unless dtype is still auto
    _resolve_attention(plan)
    _resolve_sdpa_backends(plan)


@hookimpl
def fastpath_register_passes() -> list[Pass]:
    return [SdpaBackendsPass()]


# -- attention implementation ---------------------------------------------------------

class _Support(NamedTuple):
    sdpa: bool
    flash: bool
    flex: bool


def _model_support(plan: PlanBuilder) -> _Support:
    """What the architecture's class says it has; everything but flex when the class is unknown."""
    import transformers

    for arch in plan.model.architectures:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return _Support(bool(getattr(cls, "_supports_sdpa", False)),
                            bool(getattr(cls, "_supports_flash_attn", False)),
                            bool(getattr(cls, "_supports_flex_attn", False)))
    return _Support(True, True, False)


def flash_problem(plan: PlanBuilder, version: int) -> str | None:
    """Why ``flash_attention_<version>`` cannot run for this plan, or None.

    The installed check looks at this machine, also when the plan is for a hardware profile.
    """
    hw = plan.hardware
    if hw.device != "cuda":
        return f"flash-attn runs on CUDA GPUs only (device is {hw.device})"
    cap = hw.capability
    if version == 3 and (cap is None or cap[0] != 9):
        return "flash-attn 3 runs on Hopper (sm90) only"
    if version == 2 and (cap is None or cap < (8, 0)):
        return "flash-attn 2 needs an sm80+ GPU"
    dtype = plan.get("dtype")
    if dtype not in (*HALF, "keep", "auto", None):
        return f"flash-attn needs float16 or bfloat16 (dtype is {dtype})"
    module, dist = FLASH_PACKAGES[version]
    if importlib.util.find_spec(module) is None:
        return f"{dist} is not installed"
    if not _model_support(plan).flash:
        return f"{', '.join(plan.model.architectures) or plan.model.model_type} has no flash-attn path"
    return None


def choose_attention(plan: PlanBuilder) -> tuple[str, str]:
    """The ``auto`` attention implementation for this plan, with its reason."""
    support = _model_support(plan)
    compiled_generate = plan.get("compile") is True and is_generative(plan.model)
    first_problem = None
    for version in (3, 2):
        problem = flash_problem(plan, version)
        if problem is None:
            if compiled_generate and support.sdpa:
                return "sdpa", (f"auto: sdpa rather than flash_attention_{version}: generate is compiled with a "
                                "static cache, where flash-attn breaks the graph")
            major, minor = plan.hardware.capability or (0, 0)  # flash_problem checked it is set
            return f"flash_attention_{version}", (f"auto: flash-attn {version} is installed, the GPU is "
                                                  f"sm{major}{minor} and the dtype is half precision")
        first_problem = first_problem or (problem if version == 2 else None)
    if support.sdpa:
        if plan.hardware.device == "cuda":
            why = f"no flash-attn: {first_problem}" if first_problem else "fastest kernel family here"
        else:
            why = f"the fastest attention on {plan.hardware.device}"
        return "sdpa", f"auto: torch scaled_dot_product_attention ({why})"
    if support.flex and plan.hardware.is_gpu:
        return "flex_attention", "auto: this architecture has no SDPA path; flex attention is its fastest kernel"
    return "eager", "auto: this architecture has no SDPA attention"


def _resolve_attention(plan: PlanBuilder) -> None:
    value = plan.get("attn_implementation")
    if value == "auto":
        choice, reason = choose_attention(plan)
        plan.set("attn_implementation", choice, reason=reason)
        return
    decision = plan.decision("attn_implementation")
    if value not in ("flash_attention_2", "flash_attention_3") or decision is None \
            or decision.source == SOURCE_ARGUMENT:
        return
    problem = flash_problem(plan, int(value[-1]))
    if problem is None:
        return
    if plan.strict:
        plan.note(f"attn_implementation = {value} cannot run here ({problem}); strict mode keeps it, "
                  "so loading will fail")
        return
    fallback = "sdpa" if _model_support(plan).sdpa else "eager"
    plan.set("attn_implementation", fallback, reason=f"{value} was asked for, but {problem}: {fallback} instead")


# -- SDPA backend chain -----------------------------------------------------------------

def auto_sdpa_chain(plan: PlanBuilder) -> tuple[tuple[str, ...] | None, str]:
    """The ``auto`` backend chain for this plan's hardware and dtype (None: leave it to torch), and why."""
    hw = plan.hardware
    dtype = plan.get("dtype")
    if hw.device == "cpu":
        return ("flash", "math"), "torch's CPU flash kernel (takes masks and grouped KV heads), then math"
    if hw.device != "cuda":
        return None, f"torch picks the SDPA kernel on {hw.device}; there is no backend chain to order"
    if dtype == "float32":
        return ("efficient", "math"), "float32 on CUDA: flash and cuDNN take half precision only"
    assumed = "" if dtype in HALF else " (assuming half precision)"
    cap = hw.capability or (0, 0)
    if cap >= (10, 0):
        return ("flash", "efficient", "math"), (
            "Blackwell: cuDNN attention is left out (wrong greedy output with few KV heads on sm100, "
            f"pytorch#193893){assumed}")
    if cap >= (9, 0):
        return ("cudnn", "flash", "efficient", "math"), (
            "Hopper: cuDNN attention is the fastest kernel and takes masks and grouped KV heads; flash, "
            f"efficient and math follow. Training calls skip cuDNN (NaN gradients, pytorch#196678){assumed}")
    if cap >= (8, 0):
        return ("flash", "efficient", "math"), f"sm80+: flash, then efficient for the masked calls{assumed}"
    return ("efficient", "math"), "GPUs before sm80 have no flash kernel in torch"


def _resolve_sdpa_backends(plan: PlanBuilder) -> None:
    attn = plan.get("attn_implementation")
    unused = attn not in ("sdpa", "keep")
    if plan.is_auto("sdpa_backends"):
        chain, why = auto_sdpa_chain(plan)
        if chain is None:
            plan.set("sdpa_backends", "keep", reason=f"auto: {why}")
            plan.skip(PASS_NAME, why)
            return
        plan.set("sdpa_backends", chain, reason=f"auto: {why}" + (f"; unused: attention is {attn}" if unused else ""))
    if unused:
        plan.skip(PASS_NAME, f"attn_implementation is {attn}, not sdpa: the backend chain applies to SDPA only")

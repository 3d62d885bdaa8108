"""Run the Python blocks of a documentation page the way a user would, and check each thing fastpath made.

Usage: ``python tests/journeys.py PAGES_JSON OUT_JSON`` (written by tests/test_user_journeys.py).

Each page's blocks run in order in one namespace, through the public entry points only (the page's
own code). After each block, every pipeline or model in the namespace that fastpath touched
(``plan_of`` is not None) and was not seen before is checked against plain transformers:

* a pipeline: the same task and model built with ``fastpath=False`` and called on the same texts;
  the outputs must have the same structure, types and shapes, and numbers within the tolerance;
* a model: a plain load of the same checkpoint (``fastpath=False``, float32, on the same device),
  on right- and left-padded batches; a model the page trained is compared with the same class
  holding its weights instead (the record says which reference was used);
  hidden states of real tokens and the pooler within the tolerance.

Tolerance: 1e-4 where the fastpath object runs in float32; in half precision (a GPU's bf16) the
outputs are compared by cosine similarity per token (>= 0.99), the precision's own error.
Each check is recorded with the device the object runs on (the GPU test asserts it is the GPU).
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

TEXTS = ["Fastpath keeps the code you have.", "Short one.",
         "A longer sentence pads the batch, and the fused encoder skips the padding entirely.", "ok"]


def _same(plain: Any, fast: Any, half: bool, where: str = "output") -> None:
    import numpy as np
    import torch

    if isinstance(plain, torch.Tensor):
        assert isinstance(fast, torch.Tensor) and fast.shape == plain.shape, (where, fast.shape, plain.shape)
        _close(plain.float().cpu(), fast.float().cpu(), half, where)
    elif isinstance(plain, dict):
        assert isinstance(fast, dict) and list(fast) == list(plain), (where, list(fast), list(plain))
        for key in plain:
            _same(plain[key], fast[key], half, f"{where}[{key!r}]")
    elif isinstance(plain, (list, tuple)):
        assert type(fast) is type(plain) and len(fast) == len(plain), (where, type(fast), len(fast), len(plain))
        if plain and all(isinstance(x, (int, float)) for x in plain):  # a vector of numbers
            _close(torch.tensor(plain, dtype=torch.float64), torch.tensor(fast, dtype=torch.float64), half, where)
            return
        for i, (a, b) in enumerate(zip(plain, fast)):
            _same(a, b, half, f"{where}[{i}]")
    elif isinstance(plain, (float, np.floating)):
        assert type(fast) is type(plain) and abs(fast - plain) <= (2e-2 if half else 1e-4), (where, fast, plain)
    else:
        assert type(fast) is type(plain) and fast == plain, (where, fast, plain)


def _close(plain: Any, fast: Any, half: bool, where: str) -> None:
    import torch

    if not half:
        torch.testing.assert_close(fast, plain, atol=1e-4, rtol=0, msg=where)
        return
    a, b = plain.reshape(-1, plain.shape[-1]) if plain.ndim else plain.reshape(1, 1), \
        fast.reshape(-1, fast.shape[-1]) if fast.ndim else fast.reshape(1, 1)
    cos = torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)
    assert bool((cos >= 0.99).all()), (where, float(cos.min()))


def _inputs_for(task: str) -> Any:
    if task == "fill-mask":
        return [t.replace(" ", " [MASK] ", 1) if " " in t else t + " [MASK]" for t in TEXTS]
    return TEXTS


def check_pipeline(pipe: Any) -> dict[str, Any]:
    import transformers

    half = pipe.model.dtype in (_torch().float16, _torch().bfloat16)
    plain = transformers.pipeline(pipe.task, model=pipe.model.name_or_path, **_off())
    inputs = _inputs_for(pipe.task)
    _same(plain(inputs), pipe(inputs), half)
    _same(plain(inputs[0]), pipe(inputs[0]), half)
    return {"kind": "pipeline", "task": pipe.task, "device": str(pipe.model.device), "dtype": str(pipe.model.dtype)}


def check_model(model: Any) -> dict[str, Any]:
    import transformers

    torch = _torch()
    half = model.dtype in (torch.float16, torch.bfloat16)
    plain = type(model).from_pretrained(model.name_or_path, dtype=torch.float32, **_off())
    # The checkpoint is the reference; a model the page trained (its weights moved) is compared
    # with the same class holding its weights instead, and the record says so.
    ours, theirs = model.state_dict(), plain.state_dict()
    from_checkpoint = ours.keys() == theirs.keys() and all(
        torch.equal(theirs[k].to(v.dtype).cpu(), v.detach().cpu()) for k, v in ours.items())
    if not from_checkpoint:
        plain.load_state_dict({k: v.float() for k, v in ours.items()})  # canonical keys
    plain.to(model.device).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model.name_or_path)
    was_training = model.training
    model.eval()
    try:
        for side in ("right", "left"):  # left: heads read position 0, a pad in the shorter rows
            tokenizer.padding_side = side
            batch = tokenizer(TEXTS, padding=True, return_tensors="pt").to(model.device)
            keep = batch["attention_mask"].bool()
            with torch.no_grad():
                ref, out = plain(**batch), model(**batch)
            first = "last_hidden_state" if "last_hidden_state" in ref else "logits"
            ref_first, out_first = ref[first], out[first]
            if ref_first.ndim == 3:
                ref_first, out_first = ref_first[keep], out_first[keep]
            _close(ref_first.float().cpu(), out_first.float().cpu(), half, f"{first} ({side} padding)")
            if ref.get("pooler_output") is not None:
                _close(ref["pooler_output"].float().cpu(), out["pooler_output"].float().cpu(), half,
                       f"pooler_output ({side} padding)")
    finally:
        model.train(was_training)
    return {"kind": "model", "class": type(model).__name__, "device": str(model.device), "dtype": str(model.dtype),
            "reference": "checkpoint" if from_checkpoint else "same weights (trained in the page)"}


def _off() -> dict[str, Any]:
    """``fastpath=False`` where transformers understands it (the page may have uninstalled fastpath)."""
    from transformers_fastpath.interception import patches

    return {"fastpath": False} if patches.is_patched() else {}


def _torch() -> Any:
    import torch

    return torch


def fastpath_objects(namespace: dict[str, Any], seen: set[int]) -> list[tuple[str, Any]]:
    """Pipelines and models in ``namespace`` that fastpath touched and that were not checked yet."""
    import transformers_fastpath as fp

    found = []
    for name, value in list(namespace.items()):
        if name.startswith("_") or id(value) in seen:
            continue
        try:
            touched = (hasattr(value, "config") or hasattr(value, "task")) and fp.plan_of(value) is not None
        except Exception:  # noqa: BLE001 - anything that is not a model or pipeline
            touched = False
        if touched:
            seen.add(id(value))
            found.append((name, value))
    return found


def check(name: str, value: Any) -> dict[str, Any]:
    try:
        record = check_pipeline(value) if hasattr(value, "task") and hasattr(value, "model") else check_model(value)
        record["result"] = "equal"
    except BaseException:  # noqa: BLE001 - recorded, the test reports it
        record = {"result": traceback.format_exc()}
    record["name"] = name
    return record


def run_page(page: dict[str, Any]) -> dict[str, Any]:
    os.chdir(page["workdir"])
    namespace: dict[str, Any] = {"__name__": "__main__"}
    seen: set[int] = set()
    journeys: list[dict[str, Any]] = []
    error = None
    try:
        for step in page["steps"]:
            if step["file"]:
                Path(step["file"]).write_text(step["code"])
                continue
            exec(compile("\n" * (step["line"] - 1) + step["code"], page["path"], "exec"), namespace)
            for name, value in fastpath_objects(namespace, seen):
                journeys.append({"line": step["line"], **check(name, value)})
    except BaseException:  # noqa: BLE001 - recorded, the test reports it
        error = traceback.format_exc()
    finally:
        import transformers_fastpath
        from transformers_fastpath.interception import patches

        transformers_fastpath.uninstall()
        patches.patch_all()
    return {"error": error, "journeys": journeys}


def run_script(path: str) -> dict[str, Any]:
    """A script run as a user runs it (``python my_script.py``), then its fastpath objects checked."""
    import runpy

    try:
        namespace = runpy.run_path(path, run_name="__main__")
    except BaseException:  # noqa: BLE001 - recorded, the test reports it
        return {"error": traceback.format_exc(), "journeys": []}
    seen: set[int] = set()
    return {"error": None, "journeys": [{"line": 0, **check(n, v)} for n, v in fastpath_objects(namespace, seen)]}


def main(argv: list[str]) -> None:
    pages = json.loads(Path(argv[1]).read_text())
    out = Path(argv[2])
    results: dict[str, Any] = {}
    for page in pages:
        results[page["name"]] = run_script(page["script"]) if "script" in page else run_page(page)
        out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv)

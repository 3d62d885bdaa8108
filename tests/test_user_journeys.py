"""The documented ways in, tried as a user would: every Python block of README.md,
docs/quickstart.md and docs/migration.md runs in order (one namespace per page, offline), and everything fastpath made in them gives plain transformers'
results (tests/journeys.py says how each is compared). The quickstart's environment-variable
script runs in a fresh interpreter with ``TRANSFORMERS_FASTPATH=1``, as the page says.

On a GPU machine tests/test_gpu.py runs the same journeys and also asserts that each model is on
the GPU.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO
from test_docs import hf_home, offline_env, page_steps  # noqa: F401 - hf_home is a fixture

JOURNEY_PAGES = ("README.md", "docs/quickstart.md", "docs/migration.md")
ENV_SCRIPT = "env: TRANSFORMERS_FASTPATH=1 python my_script.py"
# Pages' fastpath objects, by the name the page gives them: each must be found and checked.
EXPECTED = {
    "README.md": {"pipe", "model", "plain"},
    "docs/quickstart.md": {"pipe", "model", "plain", "classifier"},
    "docs/migration.md": {"pipe", "model"},
    ENV_SCRIPT: {"pipe"},
}


def run_journeys(root: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run tests/journeys.py over the pages and the env-var script; returns its report."""
    from test_docs import code_blocks

    pages: list[dict[str, Any]] = []
    for name in JOURNEY_PAGES:
        workdir = root / name.replace("/", "_").removesuffix(".md")
        workdir.mkdir(parents=True, exist_ok=True)
        pages.append({"name": name, "path": str(REPO / name), "workdir": str(workdir), "steps": page_steps(REPO / name)})
    script_dir = root / "env_var"
    script_dir.mkdir(exist_ok=True)
    script = next(b for b in code_blocks((REPO / "docs/quickstart.md").read_text()) if b.file_name == "my_script.py")
    (script_dir / "my_script.py").write_text(script.code)
    (root / "pages.json").write_text(json.dumps(pages))
    (root / "script.json").write_text(json.dumps([{"name": ENV_SCRIPT, "script": str(script_dir / "my_script.py")}]))
    driver = str(REPO / "tests" / "journeys.py")
    report: dict[str, Any] = {}
    for spec, out, extra in (("pages.json", "pages_out.json", {}),
                             ("script.json", "script_out.json", {"TRANSFORMERS_FASTPATH": "1"})):
        proc = subprocess.run([sys.executable, driver, str(root / spec), str(root / out)], cwd=script_dir,
                              env={**env, **extra}, capture_output=True, text=True, timeout=500)
        if (root / out).is_file():
            report.update(json.loads((root / out).read_text()))
        else:
            report[spec] = {"error": f"the driver died:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}", "journeys": []}
    return report


def assert_journey_passes(report: dict[str, Any], page: str) -> list[dict[str, Any]]:
    """Every fastpath object of ``page`` was found and equals plain transformers; returns the journeys."""
    result = report.get(page)
    assert result is not None, f"{page} did not run: {report}"
    assert result["error"] is None, f"{page} failed:\n{result['error']}"
    failed = [j for j in result["journeys"] if j["result"] != "equal"]
    assert not failed, "\n".join(f"{page} line {j['line']} {j['name']}:\n{j['result']}" for j in failed)
    names = {j["name"] for j in result["journeys"]}
    assert EXPECTED[page] <= names, f"{page}: fastpath objects not found/checked: {sorted(EXPECTED[page] - names)}"
    for journey in result["journeys"]:  # only the page's fine-tuned classifier may differ from its checkpoint
        if journey["kind"] == "model" and journey["name"] != "classifier":
            assert journey["reference"] == "checkpoint", (page, journey)
    return result["journeys"]


@pytest.fixture(scope="module")
def journeys(hf_home: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:  # noqa: F811
    return run_journeys(tmp_path_factory.mktemp("journeys"), offline_env(hf_home))


@pytest.mark.parametrize("page", sorted(EXPECTED))
def test_journey_gives_plain_transformers_results(page: str, journeys: dict[str, Any]) -> None:
    assert_journey_passes(journeys, page)


def test_the_env_var_example_is_the_command_the_quickstart_shows() -> None:
    assert "TRANSFORMERS_FASTPATH=1 python my_script.py" in (REPO / "docs/quickstart.md").read_text()

"""`python -m serval.demo_netns` (what `make demo` runs): every step must pass, and nothing may be
left behind. Migration may be reported as skipped only while servald cannot migrate."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from serval.topology import NETNS_DIR

pytestmark = [pytest.mark.netns]

REPO = Path(__file__).resolve().parents[1]
DEMO_TIMEOUT_S = 240.0


def test_demo_runs_every_step_and_leaves_nothing_behind(tmp_path: Path) -> None:
    results = tmp_path / "results"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-m", "serval.demo_netns", "--requests", "200",
         "--results-dir", str(results)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    out = result.stdout
    assert result.returncode == 0, "\n".join((out + result.stderr).splitlines()[-80:])

    steps = {step["name"]: step for step in json.loads((results / "demo-steps.json").read_text())}
    assert list(steps) == ["topology", "start", "curl", "migrate", "spread", "kill", "cleanup"]
    for name in ("topology", "start", "curl", "spread", "kill", "cleanup"):
        assert steps[name]["status"] == "PASS", steps[name]
    if steps["migrate"]["status"] == "SKIPPED":
        # Only ever because servald said so, never silently.
        summary = steps["migrate"]["summary"]
        assert summary.startswith("migration unavailable: ")
        assert "EOPNOTSUPP" in summary or "not watched" in summary, summary
    else:
        assert steps["migrate"]["status"] == "PASS", steps["migrate"]
        assert steps["migrate"]["details"]["sha256_ok"] is True

    # curl got a page that names its instance.
    assert re.search(r"X-Served-By: inst[123]", out)
    assert re.search(r"Hello from inst[123]: unmodified nginx", out)
    # The spread: 200 requests, all served, by all three instances, shares near 1:2:1.
    spread = json.loads((results / "demo-spread.json").read_text())
    assert spread["failed"] == 0
    served = {row["instance"]: row["requests"] for row in spread["instances"]}
    assert sum(served.values()) == 200 and all(count > 0 for count in served.values())
    assert served["inst2"] > max(served["inst1"], served["inst3"])
    assert (results / "demo-spread.png").stat().st_size > 1000
    assert f"chart: {results / 'demo-spread.png'}" in out
    # The kill: requests went on, none failed, the router forgot the dead instance.
    kill = steps["kill"]["details"]
    assert kill["after"] > 0 and kill["after_failed"] == 0
    assert kill["expiry_s"] is not None and kill["expiry_s"] < 10

    # Nothing left behind: none of this run's namespaces, no processes from its work dir.
    topology_id = re.search(r"namespaces (svdemo[0-9a-f]{6})-\*", out)
    assert topology_id is not None, out
    assert not [p for p in NETNS_DIR.iterdir() if p.name.startswith(topology_id.group(1))]
    assert "left behind: nothing" in out
    workdirs = set(re.findall(r"/tmp/serval-demo-\w+", out))
    assert not any(Path(w).exists() for w in workdirs)

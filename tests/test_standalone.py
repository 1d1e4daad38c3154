"""A clone stands on its own: the tests read only the repository, and no test may skip."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import conftest

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def test_the_official_layouts_are_read_from_the_repository():
    assert conftest.REFERENCE == ROOT / "reference" / "official_state_dicts.json"
    layouts = json.loads(conftest.REFERENCE.read_text())
    assert len(layouts) == 14 and layouts["xcit_small_12_p16"]["num_params"] == 26_253_304


def test_nothing_reads_outside_the_repository():
    """No test, source, script or benchmark names a ``shared`` folder beside or inside the clone."""
    pattern = re.compile(r"""["'](\.\./)*shared["'/]|/\s*["']shared["']""")
    files = [*TESTS.glob("*.py"), *(ROOT / "src").rglob("*.py"), *(ROOT / "scripts").glob("*"),
             *(ROOT / "benchmarks").glob("*.py"), ROOT / "hubconf.py"]
    found = [f"{f.relative_to(ROOT)}:{i}: {line.strip()}" for f in files if f.is_file() and f != Path(__file__)
             for i, line in enumerate(f.read_text(errors="replace").splitlines(), 1) if pattern.search(line)]
    assert not found, "paths outside the repository:\n" + "\n".join(found)


def _run_suite(tmp_path: Path, source: str, allow: bool = False) -> subprocess.CompletedProcess:
    """pytest in ``tmp_path`` on one test file, with this suite's skip policy as its conftest."""
    hooks = "from skip_policy import pytest_make_collect_report, pytest_runtest_makereport\n"
    (tmp_path / "conftest.py").write_text(hooks)
    (tmp_path / "test_it.py").write_text(textwrap.dedent(source))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("XCIT_ALLOW_SKIPS", None)
    if allow:
        env["XCIT_ALLOW_SKIPS"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_a_skip_fails_the_run_with_its_reason(tmp_path):
    result = _run_suite(tmp_path, """
        import pytest

        def test_runs():
            pass

        def test_skips():
            pytest.skip("the frobnicator is not installed")

        @pytest.mark.skipif(True, reason="never on this machine")
        def test_marked():
            pass

        @pytest.mark.xfail(reason="a known bug", strict=True)
        def test_expected_failure():
            assert False
    """)
    out = result.stdout
    assert result.returncode == 1, out
    # the marked skip happens at setup: an error
    assert out.splitlines()[-1].startswith("1 failed, 1 passed, 1 xfailed, 1 error in"), out
    assert "allows no skip" in out and "the frobnicator is not installed" in out and "never on this machine" in out


def test_a_skip_at_collection_fails_the_run(tmp_path):
    result = _run_suite(tmp_path, """
        import pytest

        pytest.importorskip("a_module_that_does_not_exist")

        def test_never_collected():
            pass
    """)
    assert result.returncode == 2 and "a_module_that_does_not_exist" in result.stdout, result.stdout  # interrupted
    assert "1 error" in result.stdout.splitlines()[-1], result.stdout


def test_skips_pass_when_allowed(tmp_path):
    result = _run_suite(tmp_path, """
        import pytest

        def test_skips():
            pytest.skip("allowed here")
    """, allow=True)
    assert result.returncode == 0 and "1 skipped" in result.stdout, result.stdout

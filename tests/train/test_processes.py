"""The processes of a run: a teardown that hangs once everything is written does not hold the job."""

import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT

RUN_END = textwrap.dedent("""
    import sys, time
    from cachetrain.train.processes import end_processes

    class Accelerator:  # the two calls end_processes makes, as a process of a 2-process run sees them
        num_processes = 2
        def wait_for_everyone(self):
            pass
        def end_training(self):
            if sys.argv[1] == "hangs":
                time.sleep(600)

    end_processes(Accelerator(), exit_status=4, grace_seconds=1)
    print("returned")
""")


def _end(teardown: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", RUN_END, teardown], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def test_a_teardown_that_hangs_leaves_with_the_runs_exit_status_after_the_grace_time():
    done = _end("hangs")
    assert done.returncode == 4, done.stderr
    assert "did not shut down together within 1 s; leaving with status 4" in done.stderr
    assert "returned" not in done.stdout


def test_a_teardown_that_returns_goes_on_as_usual():
    done = _end("returns")
    assert done.returncode == 0 and done.stdout.strip() == "returned", done.stderr

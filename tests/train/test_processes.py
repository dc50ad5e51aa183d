"""The processes of a run: a teardown that hangs once everything is written does not hold the job."""

import subprocess
import sys
import textwrap

from tests.conftest import REPO_ROOT

RUN_END = textwrap.dedent("""
    import sys, time
    from cachetrain.train.processes import end_processes

    class Accelerator:  # the calls end_processes makes, as a process of a 2-process run sees them
        num_processes = 2
        def wait_for_everyone(self):
            pass
        def free_memory(self):
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


def test_the_wrapped_model_is_released_before_the_process_group_is_torn_down():
    """A DDP reducer freed after the group is gone joins gloo's threads and has hung there past the
    watchdog: the run's references go first, while the group lives and the watchdog runs."""
    from cachetrain.train.processes import end_processes

    calls = []

    class Accelerator:
        num_processes = 2

        def wait_for_everyone(self):
            calls.append("wait")

        def free_memory(self):
            calls.append("free accelerate's references")

        def end_training(self):
            calls.append("tear down")

    end_processes(Accelerator(), exit_status=0, release=lambda: calls.append("release the run's references"))
    assert calls == ["wait", "release the run's references", "free accelerate's references", "tear down"]

"""Reads of a list of files handed to one bounded worker (call_bounded_each): an answer per file, in order; a
read that fails or never answers is that file's answer alone, and a stop ends the wait at once."""

from __future__ import annotations

import threading
import time

import pytest

from cachetrain import bounded_read


def _read_text(path) -> str:
    with open(path) as handle:
        return handle.read()


def test_each_file_gets_its_own_answer_in_order_and_a_failing_read_fails_that_file_only(tmp_path):
    paths = [tmp_path / f"{name}.txt" for name in ("c", "a", "b", "missing", "d")]
    for path in paths[:3] + paths[4:]:
        path.write_text(path.stem * 3)
    answers = bounded_read.call_bounded_each(paths, _read_text, timeout=30)
    assert [answer.path for answer in answers] == paths
    assert [answer.result() for answer in answers[:3]] == ["ccc", "aaa", "bbb"]
    assert answers[4].result() == "ddd"  # read after the one that failed
    with pytest.raises(FileNotFoundError) as raised:
        answers[3].result()
    assert raised.value.filename == str(paths[3])


def test_without_a_bound_the_reads_run_in_the_caller_with_the_same_answers(tmp_path):
    paths = [tmp_path / "a.txt", tmp_path / "missing.txt"]
    paths[0].write_text("read")
    readers = []
    answers = bounded_read.call_bounded_each(paths, lambda path: readers.append(threading.current_thread())
                                             or _read_text(path), timeout=0)
    assert answers[0].result() == "read" and isinstance(answers[1].error, FileNotFoundError)
    assert readers == [threading.current_thread()] * 2


def test_each_read_has_the_whole_bound_counted_from_the_answer_before_it(tmp_path):
    """Ten reads of 0.1 s under a bound of 0.5 s: the batch takes longer than the bound, no read does."""
    paths = [tmp_path / f"{number}.txt" for number in range(10)]
    for path in paths:
        path.write_text(path.stem)

    def slow_read(path):
        time.sleep(0.1)
        return _read_text(path)

    answers = bounded_read.call_bounded_each(paths, slow_read, timeout=0.5)
    assert [answer.result() for answer in answers] == [str(number) for number in range(10)]


def test_a_read_that_never_answers_is_named_and_the_reads_behind_it_go_on_on_a_fresh_worker(tmp_path):
    paths = [tmp_path / f"{name}.img_sdvae" for name in ("a", "stuck", "b", "c")]
    for path in paths:
        path.write_text(path.stem)
    never = threading.Event()
    readers = {}

    def read(path):
        readers[path.stem] = threading.current_thread()
        if path.stem == "stuck":
            never.wait()
        return _read_text(path)

    answers = bounded_read.call_bounded_each(paths, read, timeout=0.5)
    assert [answer.value for answer in answers] == ["a", None, "b", "c"]
    with pytest.raises(bounded_read.ReadTimedOut, match=r"stuck\.img_sdvae: did not answer within 0\.5 s"):
        answers[1].result()
    assert readers["b"] is readers["c"] is not readers["stuck"]
    # never waited for again: answered at once, without a read
    readers.clear()
    again = bounded_read.call_bounded_each([paths[1], paths[3]], read, timeout=30)
    assert isinstance(again[0].error, bounded_read.ReadTimedOut) and again[1].result() == "c"
    assert list(readers) == ["c"]
    never.set()


def test_abandon_waits_releases_a_caller_waiting_on_a_batch_at_once(tmp_path):
    paths = [tmp_path / f"{name}.img_sdvae" for name in ("a", "stuck", "b")]
    for path in paths:
        path.write_text(path.stem)
    stuck_started, never = threading.Event(), threading.Event()

    def read(path):
        if path.stem == "stuck":
            stuck_started.set()
            never.wait()
        return _read_text(path)

    answers = []
    caller = threading.Thread(target=lambda: answers.extend(bounded_read.call_bounded_each(paths, read, timeout=600)))
    caller.start()
    assert stuck_started.wait(30)
    bounded_read.abandon_waits()
    caller.join(30)  # the bound is 600 s: only the stop can have ended the wait
    assert not caller.is_alive()
    assert answers[0].result() == "a" and answers[2].result() == "b"
    assert isinstance(answers[1].error, bounded_read.ReadAbandoned)
    never.set()
    again = bounded_read.call_bounded_each([paths[1]], read, timeout=30)  # a stop is no verdict on the file
    assert again[0].result() == "stuck"

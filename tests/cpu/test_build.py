"""Building the backend's handler libraries: cached by content, started in the background, errors that say why."""

from pathlib import Path

import pytest

from jaxtrain.cpu import build

SOURCE = """
#include "xla/ffi/api/ffi.h"
extern "C" int jaxtrain_test_answer() { return 42; }
"""


def _source(tmp_path: Path, text: str = SOURCE) -> Path:
    path = tmp_path / "src" / "answer.cc"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    return path


def test_a_build_started_in_the_background_is_collected_once_and_then_cached(tmp_path, monkeypatch):
    import ctypes

    monkeypatch.setenv(build.EXT_CACHE_ENV, str(tmp_path / "ext"))
    source = _source(tmp_path)
    build.start(source, "answer", what="the test library")
    build.start(source, "answer", what="the test library")  # already running: not started twice
    assert len([p for p in build._running if p.name.startswith("answer-")]) == 1
    out = build.compile_library(source, "answer", what="the test library")
    assert ctypes.CDLL(str(out)).jaxtrain_test_answer() == 42
    assert [p.name for p in (tmp_path / "ext").iterdir()] == [out.name]  # no temporary file left
    mtime = out.stat().st_mtime_ns
    build.start(source, "answer", what="the test library")  # built: nothing to start
    assert build.compile_library(source, "answer", what="the test library") == out
    assert out.stat().st_mtime_ns == mtime
    # another source (or flag) is another library
    other = build.compile_library(_source(tmp_path, SOURCE.replace("42", "43")), "answer", what="the test library")
    assert other != out and ctypes.CDLL(str(other)).jaxtrain_test_answer() == 43


def test_a_failed_build_names_the_source_and_shows_the_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv(build.EXT_CACHE_ENV, str(tmp_path / "ext"))
    source = _source(tmp_path, "this is not C++\n")
    build.start(source, "broken", what="the test library")
    with pytest.raises(build.BuildError, match=r"(?s)compiling answer.cc failed .*error"):
        build.compile_library(source, "broken", what="the test library")
    assert list((tmp_path / "ext").iterdir()) == []  # the temporary file is removed


def test_no_compiler_and_an_unwritable_cache_are_errors_that_say_what_to_do(tmp_path, monkeypatch):
    source = _source(tmp_path)
    monkeypatch.setenv(build.EXT_CACHE_ENV, str(tmp_path / "ext"))
    monkeypatch.setenv("CXX", "")
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    build.start(source, "answer", what="the test library")  # nothing to run: left for compile_library
    with pytest.raises(build.BuildError, match="no C[+][+] compiler found .set CXX or install g[+][+]. to build "
                                                "the test library"):
        build.compile_library(source, "answer", what="the test library")
    monkeypatch.undo()
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(build.EXT_CACHE_ENV, str(blocker / "ext"))
    with pytest.raises(build.BuildError, match=f"cannot write the test library to {blocker / 'ext'}.*"
                                               f"{build.EXT_CACHE_ENV}"):
        build.compile_library(source, "answer", what="the test library")

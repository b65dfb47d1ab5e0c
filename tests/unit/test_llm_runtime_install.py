"""batos.runtime_install: the cached llama-cpp-python wheel, and a failed build that leaves a working system."""

import pytest

from batos import runtime_install as ri


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATOS_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(ri, "installed_version", lambda: None)
    monkeypatch.setattr(ri, "_key_file", lambda: tmp_path / ".batos_build_key")
    monkeypatch.setattr(ri, "_ensure_tools", lambda where: None)
    return tmp_path


def test_the_cache_is_keyed_by_version_python_and_build_options(cache):
    where = ri.cache_dir()
    assert where.parent == cache / "wheels"
    assert where.name.startswith(f"llama_cpp_python-{ri.VERSION}-cp3") and where.name.endswith(f"-{ri.build_key()}")
    assert len(ri.build_key()) == 10 and ri.build_key() == ri.build_key()


def test_a_failed_build_is_reported_remembered_and_not_retried(cache, monkeypatch, capsys):
    builds: list[int] = []

    def failing_build(where, log_path):
        builds.append(1)
        raise RuntimeError("pip wheel exited with 1")

    monkeypatch.setattr(ri, "_build", failing_build)
    ok, message = ri.install()
    assert not ok and "build FAILED (pip wheel exited with 1)" in message
    assert (ri.cache_dir() / "BUILD_FAILED").is_file()
    ok, message = ri.install()
    assert not ok and "an earlier build failed" in message and len(builds) == 1
    assert ri.main(["install"]) == 0  # make setup carries on: the system runs on transformers
    assert "WARNING: llama-cpp-python is not installed" in capsys.readouterr().out
    ri.install(rebuild=True)
    assert len(builds) == 2


def test_a_cached_wheel_is_installed_without_building(cache, monkeypatch):
    where = ri.cache_dir()
    where.mkdir(parents=True)
    wheel = where / f"llama_cpp_python-{ri.VERSION}-cp311-cp311-linux_x86_64.whl"
    wheel.write_bytes(b"")
    calls: list[tuple] = []
    monkeypatch.setattr(ri, "_build", lambda *a: pytest.fail("must not build"))
    monkeypatch.setattr(ri, "_pip", lambda *args, **kw: calls.append(args) or type("R", (), {"returncode": 0})())
    ok, message = ri.install()
    assert ok and "installed from the cached wheel" in message
    assert calls == [("install", "-q", "--no-deps", str(wheel))]


def test_progress_lines_are_recognised():
    ninja = "  [70/140] /usr/bin/g++ -DGGML_BUILD -O3 -o vendor/llama.cpp/ggml.cpp.o -c /tmp/x/ggml/src/ggml.cpp"
    assert ri.progress(ninja) == 50
    assert ri.progress("[ 42%] Building CXX object vendor/llama.cpp/src/CMakeFiles/llama.dir/llama.cpp.o") == 42
    assert ri.progress("-- Configuring done") is None
    assert ri.progress("  In function '__m256d _mm512_extractf64x4_pd(__m512d, int)',") is None


def test_cmake_args_follow_the_cpu_and_never_enable_amx():
    args = ri.cmake_args({"avx", "avx2", "fma", "f16c", "amx_tile", "amx_int8", "avx512f"})
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX2=ON" in args and "-DGGML_FMA=ON" in args
    assert "-DGGML_AVX512=OFF" in args  # avx512f alone is not the set ggml's AVX512 option compiles for
    assert "-DGGML_AMX_INT8=OFF" in args and "-DGGML_AMX_TILE=OFF" in args and "-DLLAVA_BUILD=OFF" in args
    assert ri.build_key(args) != ri.build_key(ri.cmake_args({"avx", "avx2"}))

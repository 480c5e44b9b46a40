"""Which BLAS runners are started with (exo_trio/blas.py), without depending on
what this machine has installed."""

from __future__ import annotations

from exo_trio.blas import (
    OPENBLAS_PATHS,
    BlasChoice,
    choose_blas,
    install_hint,
    loaded_blas,
    runner_env,
)

DEBIAN = 'PRETTY_NAME="Debian GNU/Linux 12"\nID=debian\n'
MINT = 'ID=linuxmint\nID_LIKE="ubuntu debian"\n'


def test_openblas_is_preferred_pthreads_first() -> None:
    present = {OPENBLAS_PATHS[2], OPENBLAS_PATHS[0]}
    choice = choose_blas(env={}, platform="linux", exists=present.__contains__)
    assert choice.path == OPENBLAS_PATHS[0] and choice.hint is None
    assert "openblas-pthread" in choice.path


def test_without_one_the_hint_says_how_to_get_it() -> None:
    choice = choose_blas(env={}, platform="linux", exists=lambda _: False, os_release=DEBIAN)
    assert choice.path is None
    assert choice.hint is not None and "apt-get install libopenblas0-pthread" in choice.hint
    assert install_hint("ID=fedora\n") == "dnf install openblas-threads"
    assert install_hint(MINT) == "apt-get install libopenblas0-pthread"
    assert "OpenBLAS" in install_hint("ID=plan9\n")


def test_the_environment_decides_first() -> None:
    exists = {"/opt/blas/libopenblas.so", *OPENBLAS_PATHS}.__contains__
    forced = choose_blas({"EXO_TRIO_BLAS": "/opt/blas/libopenblas.so"}, "linux", exists)
    assert forced.path == "/opt/blas/libopenblas.so"
    assert choose_blas({"EXO_TRIO_BLAS": "none"}, "linux", exists).path is None
    missing = choose_blas({"EXO_TRIO_BLAS": "/nope.so"}, "linux", exists)
    assert missing.path is None and missing.hint and "/nope.so" in missing.hint


def test_other_platforms_keep_mlx_default() -> None:
    choice = choose_blas(env={}, platform="darwin", exists=lambda _: True)
    assert choice == BlasChoice(None, "the platform's (MLX's default)")


def test_runner_environment() -> None:
    assert runner_env(BlasChoice(None, "x"), 4) == {}
    env = runner_env(BlasChoice("/lib/libopenblas.so.0", "x"), 3)
    assert env["OPENBLAS_NUM_THREADS"] == "3"
    assert env["LD_PRELOAD"].split(":")[0] == "/lib/libopenblas.so.0"


def test_what_a_process_really_loaded() -> None:
    maps = "\n".join(
        [
            "7f00-7f01 r-xp 0 08:01 1 /venv/numpy.libs/libscipy_openblas64_-32a4b2a6.so",
            "7f02-7f03 r-xp 0 08:01 2 /venv/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0",
        ]
    )
    # numpy's own OpenBLAS exports suffixed symbols MLX never calls: not counted.
    assert loaded_blas(maps) == "MLX's bundled reference BLAS"
    preloaded = (
        maps + "\n7f04-7f05 r-xp 0 08:01 3 /usr/lib/openblas-pthread/libopenblasp-r0.3.21.so"
    )
    assert loaded_blas(preloaded) == "/usr/lib/openblas-pthread/libopenblasp-r0.3.21.so"
    assert loaded_blas("") == "the platform's (MLX's default)"

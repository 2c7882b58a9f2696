"""ONNX Runtime sessions with explicit providers, for the backend and the export's self-check (torch-free).

Providers are explicit: ``--device cpu`` → CPU; ``cuda[:N]`` → CUDA, and an error when the CUDA provider cannot
run here (never a silent fallback); ``auto`` → CUDA when a CUDA driver is present and the provider starts, else
CPU. The CPU provider uses one intra-op thread per available core.

Install: vitca depends on ``onnxruntime-gpu`` on Linux x86-64 (it also runs on CPU-only machines there) and on
``onnxruntime`` elsewhere (environment markers in pyproject.toml). The two packages share one ``onnxruntime/``
folder and must never be installed together (a warning says so if they are). For CUDA, onnxruntime-gpu needs
CUDA and cuDNN libraries of the versions it was built for: system-wide, or ``pip install
"onnxruntime-gpu[cuda,cudnn]"``, which this module preloads.
"""

from __future__ import annotations

import contextlib
import os
import sys

from vitca_cli.errors import UsageError
from vitca_cli.log import log
from vitca_cli.log import verbosity as log_verbosity

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def cpu_threads() -> int:
    """Threads for a session: what ``--threads`` chose (``runtime.choose_threads``), else every usable core."""
    from vitca_cli.runtime import chosen_threads, usable_cores

    return chosen_threads() or usable_cores()


def _cuda_driver_present() -> bool:
    """Whether a CUDA driver library loads: without one, the CUDA provider cannot start (and says so loudly)."""
    import ctypes
    import ctypes.util

    for name in ("libcuda.so.1", ctypes.util.find_library("cuda"), "nvcuda.dll"):
        if not name:
            continue
        try:
            ctypes.CDLL(name)
            return True
        except OSError:
            continue
    return False


def _warn_if_both_runtimes() -> None:
    """``onnxruntime`` and ``onnxruntime-gpu`` share one ``onnxruntime/`` folder; with both installed, whichever was
    installed last wins, file by file. Say so, with the fix, rather than fail obscurely later."""
    from importlib import metadata

    installed = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            installed.append(f"{dist} {metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    if len(installed) == 2:
        log.warning(
            f"both {installed[0]} and {installed[1]} are installed and overwrite each other's files; keep one: "
            f"pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu (Linux x86-64) "
            f"or onnxruntime (elsewhere)"
        )


def _preload_cuda_libraries(ort) -> None:
    """Let onnxruntime-gpu find CUDA/cuDNN installed as pip packages (``pip install "onnxruntime-gpu[cuda,cudnn]"``)
    or shipped with a CUDA build of torch; system-wide libraries are found without this. Its notes go to stderr."""
    preload = getattr(ort, "preload_dlls", None)  # onnxruntime >= 1.21
    if preload is None:
        return
    try:
        with contextlib.redirect_stdout(sys.stderr):
            preload()
    except Exception as exc:  # noqa: BLE001 - best effort: the session check below reports what matters
        log.debug(f"onnxruntime.preload_dlls failed: {exc}")


def _parse_device(device: str) -> tuple[str, int]:
    from vitca_cli.runtime import parse_device

    kind, index = parse_device(device)
    return kind, index or 0


def session_options(threads: int | None = None, dims: dict[str, int] | None = None):
    """The ``SessionOptions`` of every ONNX Runtime session vitca creates (``dims``: see :func:`create_session`)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads or cpu_threads()
    options.inter_op_num_threads = 1  # one step is one chain of kernels; parallelism lives inside them
    # The exported attention masks each query's halo with -inf logits; on CPU, exp() of such values takes a
    # slow path through denormal floats unless they are flushed to zero, which makes the softmax and the step
    # markedly faster (bench/onnx_step.py). ONNX Runtime also sets this mode (flush-to-zero and
    # denormals-are-zero) on the thread that calls run(); it only changes values below 1.2e-38. Every session
    # must set it: a session created without it slows down the sessions created after it in the same process.
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    # Threads that wait sleep rather than spin, as torch's OpenMP threads do (``runtime.passive_openmp``), unless
    # the user asked OpenMP for an active wait.
    active = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "ACTIVE"
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if active else "0")
    for name, size in (dims or {}).items():
        options.add_free_dimension_override_by_name(name, size)
    return options


def create_session(source, device: str = "auto", threads: int | None = None, dims: dict[str, int] | None = None):
    """An ``InferenceSession`` for ``source`` (a path or serialized bytes) with explicit providers, and the
    provider it actually runs on. ``--device cuda`` without a working CUDA provider is a ``UsageError``.

    ``dims`` fixes named dynamic axes (``{"height": 256, ...}``): the session then runs only that shape, and
    ONNX Runtime folds what depends on the shape alone (position encoding, halo indices) into constants."""
    import onnxruntime as ort

    kind, index = _parse_device(device)
    _warn_if_both_runtimes()
    options = session_options(threads, dims)
    available = ort.get_available_providers()

    if kind == "cuda" and CUDA not in available:
        raise UsageError(
            f"--device {device}: this onnxruntime ({ort.__version__}) has no CUDA provider "
            f"(install onnxruntime-gpu on Linux x86-64, or use --device cpu)"
        )
    driver = CUDA in available and _cuda_driver_present()
    if kind == "cuda" and not driver:
        raise UsageError(f"--device {device}: no CUDA driver found (no GPU here?); use --device cpu")
    if kind == "cuda" or (kind == "auto" and driver):
        # ORT does not raise when CUDA cannot start: it logs errors and falls back to CPU. Keep its log quiet
        # (unless -v) and check which provider it chose.
        options.log_severity_level = 2 if log_verbosity() else 4
        _preload_cuda_libraries(ort)
        session = ort.InferenceSession(source, options, providers=[(CUDA, {"device_id": index}), CPU])
        if session.get_providers()[0] == CUDA:
            return session, f"{CUDA}:{index}"
        if kind == "cuda":
            raise UsageError(
                f"--device {device}: the ONNX Runtime CUDA provider failed to start (onnxruntime-gpu "
                f"{ort.__version__} needs matching CUDA and cuDNN libraries; -v shows its log); use --device cpu"
            )
        log.debug("CUDA provider unavailable; using the CPU provider")
        options.log_severity_level = 2
    session = ort.InferenceSession(source, options, providers=[CPU])
    return session, CPU

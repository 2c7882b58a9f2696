"""Process-level runtime choices shared by the CLI, training and benchmarks: device, allocator, CPU features."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from vitca_cli import log
from vitca_cli.errors import SettingError


def parse_device(spec: str | None) -> tuple[str, int | None]:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as (kind, index); anything else is a ``SettingError``. No torch."""
    text = (spec or "auto").strip().lower()
    if text in ("auto", "cpu", "cuda"):
        return text, None
    if text.startswith("cuda:") and text[5:].isdigit():
        return "cuda", int(text[5:])
    raise SettingError("device", f"{spec!r}: expected auto, cpu, cuda or cuda:N")


def resolve_device(spec: str = "auto"):
    """``auto`` → CUDA if available else CPU; ``cpu``; ``cuda`` or ``cuda:N`` (an error without a usable GPU)."""
    import torch

    kind, index = parse_device(spec)
    if kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        return torch.device("cpu")
    name = "cuda" if index is None else f"cuda:{index}"
    if not torch.cuda.is_available():
        raise SettingError("device", f"{name}: no CUDA GPU is available (use cpu or auto)")
    if index is not None and index >= torch.cuda.device_count():
        raise SettingError("device", f"{name}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device(name)


_chosen_threads: dict = {}


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask where the platform has one)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def choose_threads(requested: int | None = None) -> int:
    """Set the CPU threads of torch (and of ONNX Runtime sessions made later): ``requested``, else every usable
    core. Whether other work holds some of them is left to the OpenMP wait policy (:func:`passive_openmp`): a
    thread that waits at a barrier sleeps instead of spinning a core another process needs, so a default run
    on a busy machine loses little to a one-thread run, and one on an idle machine takes every core."""
    import torch

    if requested is None:
        n = usable_cores()
    else:
        if requested < 1:
            raise SettingError("threads", f"must be ≥ 1, got {requested}")
        n = requested
    torch.set_num_threads(n)
    _chosen_threads["n"] = n
    log.log.debug(f"{n} CPU thread(s), OpenMP wait policy {os.environ.get(WAIT_POLICY, 'not set')}")
    return n


WAIT_POLICY = "OMP_WAIT_POLICY"
# Variables that already say how OpenMP threads wait (GNU libgomp's spin count, Intel's block time): a user who set
# one chose, and it is left alone.
WAIT_SETTINGS = (WAIT_POLICY, "GOMP_SPINCOUNT", "KMP_BLOCKTIME")


def passive_openmp(environ=None) -> bool:
    """Ask OpenMP threads to sleep, not spin, while they wait at a barrier (``OMP_WAIT_POLICY=PASSIVE``), unless
    the environment already sets a wait policy. Spinning threads hold their cores between parallel regions: with
    another process on one of them, every barrier waits for a thread the scheduler has put aside.

    OpenMP reads its environment once, when torch loads it: call this before ``import torch`` (the ``vitca`` entry
    point and ``vitca_cli.api`` do). Returns whether it set the policy."""
    environ = os.environ if environ is None else environ
    if any(name in environ for name in WAIT_SETTINGS):
        return False
    if "torch" in sys.modules:
        log.log.debug("torch is already imported: its OpenMP wait policy stays as it was")
    environ[WAIT_POLICY] = "PASSIVE"
    return True


COMPILE_CACHE = "TORCHINDUCTOR_CACHE_DIR"


def persistent_compile_cache(environ=None) -> bool:
    """Keep ``torch.compile``'s generated kernels under vitca's cache folder (``$VITCA_HOME`` or the user cache
    folder: ``torch-compile/``) rather than in ``/tmp``, which many systems clear at boot, so that later processes
    load the fast step's kernels instead of generating them again. Left alone when the environment names a folder.
    Call it before ``import torch``. Returns whether it set the folder."""
    environ = os.environ if environ is None else environ
    if COMPILE_CACHE in environ:
        return False
    from vitca_cli.io.weights import home_dir

    environ[COMPILE_CACHE] = str(home_dir() / "torch-compile")
    return True


def has_cxx_compiler() -> bool:
    """Whether a C++ compiler is on the PATH (``$CXX``, g++, clang++ or c++): torch.compile needs one on CPU."""
    import shutil

    return any(shutil.which(c) for c in (os.environ.get("CXX", ""), "g++", "clang++", "c++") if c)


def chosen_threads() -> int | None:
    """What :func:`choose_threads` set, or None."""
    return _chosen_threads.get("n")


def cpu_has_native_bf16() -> bool | None:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX-BF16); None where we cannot tell.

    Without them oneDNN emulates bfloat16 products, and ``--precision bf16`` runs far slower than fp32.
    """
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), None)
    except OSError:
        return None
    return None if flags is None else bool({"avx512_bf16", "amx_bf16"} & set(flags))


_tuned = False


def tune_allocator(heap_below: int = 1 << 30) -> None:
    """Keep CPU buffers smaller than ``heap_below`` bytes in the heap instead of fresh mmaps (glibc only).

    A CA rollout allocates the same activations every step; glibc serves large blocks with mmap (and, once one is
    freed, shrinks the heap whenever its free top outgrows twice the largest such block), so each step pays page
    faults for memory it just released. Raising the mmap threshold to ``heap_below`` and the trim threshold to
    twice that lets the heap reuse them; buffers above it (a large image's cell grid) are still returned to the
    system when freed. Training and evaluation step whole batches (the default: up to 1 GB); the windowed
    restore's activations are a few MB, its grids hundreds (``vitca_cli.restore``: 64 MB).
    """
    global _tuned
    if _tuned or not sys.platform.startswith("linux"):
        return
    _tuned = True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        libc.mallopt(m_mmap_threshold, heap_below)
        libc.mallopt(m_trim_threshold, min(2 * heap_below, (1 << 31) - 1))
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.log.debug("allocator tuning unavailable")

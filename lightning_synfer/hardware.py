"""Settings chosen from the hardware a run finds: precision, memory format, processes and threads.

`trainer.precision: auto`, `model.channels_last: auto` and `pipeline.parallel` / `sweep.parallel: auto` are resolved
here, and nowhere else, so that a config tuned on one machine does not crawl on another. bf16 is native on CPUs with
AMX or AVX512-BF16 and on recent GPUs; elsewhere it is emulated: on an AVX2-only AMD EPYC a ResNet-18 step ran 26x
slower in bf16 than in fp32 (docs/BENCHMARKS.md). The choices are deterministic for one machine and config, so the
Trainer factory, the modules and the run's provenance all compute the same answer; the config keeps `auto`, so the
run hash (and resume=auto) does not depend on the machine.

Environment overrides (they replace a probe, not an explicit config value):
    SYNFER_CPU_BF16=1|0   the CPU has / lacks native bf16 matmul (skips the flag check and the measurement)
"""
from __future__ import annotations

import functools
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Any, Optional

import torch

from lightning_synfer.config.choices import AUTO
# CPU flags (/proc/cpuinfo) of native bf16 matmul on x86: AMX tiles or AVX512 with the BF16 extension.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# A stage process trains a tiny model: past this many threads it gains little, so many cores go to more processes.
MAX_THREADS_PER_STAGE = 4


@dataclass(frozen=True)
class CpuBf16:
    native: bool
    reason: str


@dataclass(frozen=True)
class Choice:
    """What `auto` resolved to for one run, and why (written into provenance.json)."""

    device: str  # cpu | cuda | mps
    precision: str  # a Lightning precision string
    precision_reason: str
    channels_last: bool
    channels_last_reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cpuinfo(field: str) -> Optional[str]:
    """The value of the first `field` line of /proc/cpuinfo (Linux), or None where there is none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags() -> Optional[frozenset[str]]:
    """The CPU feature flags of the first processor (x86 Linux), or None where unreadable."""
    flags = _cpuinfo("flags")
    return None if flags is None else frozenset(flags.split())


def cpu_model_name() -> str:
    """`lscpu`'s model name, read from /proc/cpuinfo (platform.processor() elsewhere)."""
    return _cpuinfo("model name") or platform.processor() or platform.machine() or "unknown"


def measure_bf16_matmul(size: int = 256, repeats: int = 5) -> tuple[float, float]:
    """Best-of-N seconds of one (size x size) matmul in fp32 and in bf16 on the CPU, one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = []
        for dtype in (torch.float32, torch.bfloat16):
            a = torch.randn(size, size).to(dtype)
            b = torch.randn(size, size).to(dtype)
            a @ b  # first call picks kernels
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                a @ b
                times.append(time.perf_counter() - t0)
            best.append(min(times))
        return best[0], best[1]
    finally:
        torch.set_num_threads(threads)


def decide_cpu_bf16(flags: Optional[frozenset[str]], env: Optional[str], measure=measure_bf16_matmul) -> CpuBf16:
    """Whether the CPU runs bf16 matmul natively: the override, else the x86 flags, else a measurement
    (ARM and other CPUs, where flags do not tell whether torch's kernels use the bf16 instructions)."""
    if env is not None and env.strip() != "":
        native = env.strip().lower() in ("1", "true", "yes")
        return CpuBf16(native, f"SYNFER_CPU_BF16={env.strip()}")
    if flags is not None and {"avx2", "avx", "sse2"} & flags:  # x86: the flags are authoritative
        found = [f for f in NATIVE_BF16_FLAGS if f in flags]
        if found:
            return CpuBf16(True, f"CPU flags {'+'.join(found)}")
        return CpuBf16(False, f"CPU flags lack {' and '.join(NATIVE_BF16_FLAGS)} (bf16 would be emulated)")
    fp32_s, bf16_s = measure()
    ratio = bf16_s / max(fp32_s, 1e-12)
    # Emulated bf16 is several times slower than fp32; native bf16 is at least as fast.
    return CpuBf16(ratio <= 1.0, f"measured bf16/fp32 matmul time {ratio:.2f}")


@functools.lru_cache(maxsize=1)
def cpu_bf16() -> CpuBf16:
    """decide_cpu_bf16 for this machine, once per process."""
    return decide_cpu_bf16(cpu_flags(), os.environ.get("SYNFER_CPU_BF16"))


def device_kind(accelerator: str) -> str:
    """The device a Trainer with `trainer.accelerator` will train on: cpu, cuda or mps."""
    acc = str(accelerator).lower()
    if acc == "cpu":
        return "cpu"
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return "cuda"
    if acc in ("auto", "gpu", "mps") and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def decide_precision(requested: str, device: str, cuda_bf16: bool, cpu: CpuBf16) -> tuple[str, str]:
    """(precision, reason) for `trainer.precision`; anything but `auto` is honoured as given."""
    if str(requested) != AUTO:
        return str(requested), "set in the config"
    if device == "cuda":
        if cuda_bf16:
            return "bf16-mixed", "CUDA device with bf16 support"
        return "32-true", "CUDA device without bf16 support (set trainer.precision=16-mixed to use fp16)"
    if device == "cpu":
        if cpu.native:
            return "bf16-mixed", f"CPU with native bf16 matmul ({cpu.reason})"
        return "32-true", f"CPU without native bf16 matmul ({cpu.reason})"
    return "32-true", f"{device}: fp32 is the safe default"


def decide_channels_last(requested: Any, device: str, precision: str) -> tuple[bool, str]:
    """(channels_last, reason) for `model.channels_last`: on with reduced-precision convolutions (oneDNN and
    cuDNN pick their fast NHWC kernels there), off in fp32 on CPUs, where it measured no faster."""
    if str(requested).lower() != AUTO:
        return bool(requested), "set in the config"
    if precision.startswith(("bf16", "16")) and device in ("cpu", "cuda"):
        return True, f"{precision} on {device}: NHWC kernels"
    return False, f"{precision} on {device}"


def choose(trainer_cfg: Any, model_cfg: Any = None) -> Choice:
    """Resolve `trainer.precision` and `model.channels_last` (either may be `auto`) for this machine.

    trainer_cfg / model_cfg: the config sections (DictConfig or plain dicts of the resolved config)."""
    device = device_kind(_get(trainer_cfg, "accelerator", "auto"))
    requested = str(_get(trainer_cfg, "precision", AUTO))
    cuda_bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
    cpu = cpu_bf16() if (device == "cpu" and requested == AUTO) else CpuBf16(False, "not probed")
    precision, why = decide_precision(requested, device, cuda_bf16, cpu)
    channels_last, cl_why = decide_channels_last(_get(model_cfg, "channels_last", False), device, precision)
    return Choice(device, precision, why, channels_last, cl_why)


def _get(section: Any, key: str, default: Any) -> Any:
    if section is None:
        return default
    value = section.get(key, default)
    return default if value is None else value


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask: a container's or a SLURM allocation's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def stage_parallelism(cpu_count: Optional[int] = None, max_threads: int = MAX_THREADS_PER_STAGE) -> tuple[int, int]:
    """(processes at once, OMP threads each) for CPU stage and sweep processes on `cpu_count` CPUs.

    Tiny models scale badly with threads: on a 2-vCPU box two 1-thread processes did 1.7x the work of one, one
    2-thread process 1.4x (docs/ARCHITECTURE.md). So every core first gets its own process, up to
    `max_threads`-thread processes on big machines (where the stage graph, not the cores, bounds parallelism)."""
    cpus = available_cpus() if cpu_count is None else max(1, int(cpu_count))
    processes = -(-cpus // max_threads) if cpus > 2 * max_threads else cpus
    return processes, max(1, cpus // processes)


def describe(trainer_cfg: Any, model_cfg: Any = None) -> dict[str, Any]:
    """The hardware block of provenance.json: what `auto` chose and what it was chosen from."""
    choice = choose(trainer_cfg, model_cfg)
    info: dict[str, Any] = {
        **choice.as_dict(),
        "cpu_model": cpu_model_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpus_available": available_cpus(),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    if choice.device == "cpu" and str(_get(trainer_cfg, "precision", AUTO)) == AUTO:
        info["cpu_bf16_native"] = cpu_bf16().native
    if choice.device == "cuda":
        info["cuda_device"] = torch.cuda.get_device_name(0)
    return info

"""`auto` precision, memory format and stage parallelism chosen from (faked) hardware probes."""
from __future__ import annotations

import json

import pytest
import torch

from lightning_synfer import hardware
from lightning_synfer.config.compose import compose
from lightning_synfer.hardware import CpuBf16, decide_channels_last, decide_cpu_bf16, decide_precision
from lightning_synfer.runs import prepare_run_dir
from lightning_synfer.trainer import build_trainer

AMX = frozenset({"sse2", "avx", "avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
AVX512_BF16 = frozenset({"sse2", "avx", "avx2", "avx512f", "avx512_bf16"})
AVX2_ONLY = frozenset({"sse2", "avx", "avx2", "fma"})  # the AMD EPYC (Zen 1) of the issue


def _no_measure():
    raise AssertionError("x86 flags decide; no measurement expected")


@pytest.mark.parametrize("flags, native", [(AMX, True), (AVX512_BF16, True), (AVX2_ONLY, False)])
def test_cpu_bf16_from_x86_flags(flags, native):
    got = decide_cpu_bf16(flags, None, measure=_no_measure)
    assert got.native is native
    assert ("amx_bf16" in got.reason or "avx512_bf16" in got.reason)


def test_cpu_bf16_measured_where_flags_do_not_tell():
    # ARM and others: no x86 flags, so a tiny matmul decides (emulated bf16 is several times slower).
    assert decide_cpu_bf16(None, None, measure=lambda: (1.0, 0.5)).native is True
    assert decide_cpu_bf16(frozenset({"fp", "asimd", "bf16"}), None, measure=lambda: (1.0, 7.0)).native is False
    assert "7.00" in decide_cpu_bf16(None, None, measure=lambda: (1.0, 7.0)).reason


@pytest.mark.parametrize("env, native", [("1", True), ("0", False), ("true", True)])
def test_cpu_bf16_environment_override_beats_flags(env, native):
    flags = AVX2_ONLY if native else AMX
    got = decide_cpu_bf16(flags, env, measure=_no_measure)
    assert got.native is native and "SYNFER_CPU_BF16" in got.reason


NATIVE, EMULATED = CpuBf16(True, "flags amx_bf16"), CpuBf16(False, "flags lack amx_bf16")


@pytest.mark.parametrize("device, cuda_bf16, cpu, expected", [
    ("cuda", True, EMULATED, "bf16-mixed"),
    ("cuda", False, EMULATED, "32-true"),
    ("cpu", False, NATIVE, "bf16-mixed"),
    ("cpu", False, EMULATED, "32-true"),
    ("mps", False, NATIVE, "32-true"),
])
def test_auto_precision_per_device(device, cuda_bf16, cpu, expected):
    precision, reason = decide_precision("auto", device, cuda_bf16, cpu)
    assert precision == expected
    assert reason and reason != "set in the config"


def test_explicit_precision_is_honoured_even_where_emulated():
    assert decide_precision("bf16-mixed", "cpu", False, EMULATED) == ("bf16-mixed", "set in the config")
    assert decide_precision("32-true", "cuda", True, NATIVE)[0] == "32-true"


def test_channels_last_follows_the_precision():
    assert decide_channels_last("auto", "cpu", "bf16-mixed")[0] is True
    assert decide_channels_last("auto", "cpu", "32-true")[0] is False
    assert decide_channels_last("auto", "cuda", "16-mixed")[0] is True
    assert decide_channels_last(True, "cpu", "32-true") == (True, "set in the config")
    assert decide_channels_last(False, "cuda", "bf16-mixed") == (False, "set in the config")


@pytest.mark.parametrize("cpus, expected", [(1, (1, 1)), (2, (2, 1)), (8, (8, 1)), (16, (4, 4)), (64, (16, 4))])
def test_stage_parallelism(cpus, expected):
    processes, threads = hardware.stage_parallelism(cpus)
    assert (processes, threads) == expected
    assert processes * threads <= cpus


@pytest.fixture
def fake_cpu(monkeypatch):
    """fake_cpu(native): the CPU probe answers `native`; no CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)

    def set_native(native: bool) -> None:
        monkeypatch.setattr(hardware, "cpu_bf16", lambda: NATIVE if native else EMULATED)
    return set_native


@pytest.mark.parametrize("native, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_trainer_resolves_auto(fake_cpu, tiny, native, expected, capsys):
    fake_cpu(native)
    cfg = compose("supervised/embedded", tiny("trainer.precision=auto"))
    trainer = build_trainer(cfg, None)
    assert trainer.precision == expected
    assert f"trainer.precision=auto -> {expected}" in capsys.readouterr().out


def test_trainer_honours_explicit_bf16_on_emulating_cpu(fake_cpu, tiny):
    fake_cpu(False)
    cfg = compose("supervised/embedded", tiny("trainer.precision=bf16-mixed"))
    assert build_trainer(cfg, None).precision == "bf16-mixed"


def test_supervised_module_memory_format_follows_auto(fake_cpu, tiny):
    from lightning_synfer.modules.supervised import SupervisedFER
    from lightning_synfer.config.compose import to_container

    for native, channels_last in ((True, True), (False, False)):
        fake_cpu(native)
        cfg = to_container(compose("supervised/embedded", tiny("trainer.precision=auto", "model.channels_last=auto")))
        module = SupervisedFER(cfg, ["a"] * cfg["data"]["num_classes"])
        # a conv with several input channels and a spatial kernel: there the two layouts differ
        weight = next(p for p in module.backbone.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1)
        assert weight.is_contiguous(memory_format=torch.channels_last) is channels_last
        if channels_last:
            assert not weight.is_contiguous()


def test_provenance_records_the_choice_and_its_reason(fake_cpu, tiny):
    fake_cpu(False)
    cfg = compose("supervised/embedded", tiny("trainer.precision=auto"))
    run = prepare_run_dir(cfg, argv=["fit"])
    info = json.loads((run.path / "provenance.json").read_text())["hardware"]
    assert info["precision"] == "32-true"
    assert "without native bf16" in info["precision_reason"]
    assert info["channels_last"] is False
    assert info["cpu_bf16_native"] is False
    assert info["cpu_model"] and info["cpus_available"] >= 1

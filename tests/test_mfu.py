"""MFU against a peak that means something: on a CPU, the matmul peak measured when the machine was quiet and kept in
the toolkit's cache, not a start-up race on a busy machine; the "sized for a GPU" advice never fires for the README's
CPU configs, however busy the machine."""
import pytest
from conftest import run_script

from gpt_toolkit.core import hardware
from gpt_toolkit.training.guards import Guard

FMA = (100e9, "2 cores x 1.56 GHz x 32 float32 FLOP per cycle")  # a slow 2-core AVX512 machine's FMA rate


@pytest.fixture
def machine(monkeypatch, tmp_path):
    """A CPU whose matmul measures `measured` FLOP/s, busy or not, with an empty cache of its own."""
    state = {"busy": False, "measured": 500e9, "measurements": 0}

    def measure(device, dtype):
        state["measurements"] += 1
        return state["measured"]
    monkeypatch.setenv(hardware.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(hardware, "measure_matmul_flops", measure)
    monkeypatch.setattr(hardware, "machine_is_busy", lambda: state["busy"])
    monkeypatch.setattr(hardware, "cpu_fma_flops", lambda: FMA)
    hardware.peak_flops.cache_clear()
    yield state
    hardware.peak_flops.cache_clear()


def test_a_quiet_measurement_is_kept_and_a_busy_run_uses_it(machine):
    assert hardware.peak_flops("cpu", "float32") == (500e9, "measured float32 matmul on cpu")
    assert hardware.peak_cache_path().exists()
    hardware.peak_flops.cache_clear()
    machine.update(busy=True, measured=3e9)  # another training shares the cores now
    peak, source = hardware.peak_flops("cpu", "float32")
    assert peak == 500e9 and "measured on this CPU when it was quiet, kept in" in source
    assert machine["measurements"] == 1  # no second race at start-up
    hardware.peak_flops.cache_clear()
    assert hardware.peak_flops("cpu", "bfloat16")[0] == FMA[0]  # another dtype has no quiet figure yet


def test_a_busy_machine_without_a_quiet_figure_keeps_nothing(machine):
    machine.update(busy=True, measured=30e9)
    peak, source = hardware.peak_flops("cpu", "float32")
    assert peak == FMA[0] and "the machine is busy" in source and "30.0 GFLOP/s" in source
    assert not hardware.peak_cache_path().exists()
    hardware.peak_flops.cache_clear()
    machine.update(busy=False, measured=400e9)
    assert hardware.peak_flops("cpu", "float32")[0] == 400e9 and hardware.peak_cache_path().exists()


def test_a_damaged_cache_is_measured_again(machine):
    hardware.peak_cache_path().parent.mkdir(parents=True)
    hardware.peak_cache_path().write_text("{not json", encoding="utf-8")
    assert hardware.peak_flops("cpu", "float32")[0] == 500e9
    assert '"' in hardware.peak_cache_path().read_text(encoding="utf-8")  # rewritten whole


class StopBeforeTraining(Guard):
    def start(self, run, state):
        raise KeyboardInterrupt  # the run's start-up lines are out; its steps are not needed


@pytest.mark.parametrize("config", ["train_shakespeare_char_cpu", "train_shakespeare_char_fast", "quick_experiment",
                                    "train_shakespeare_char_speedrun"])
def test_the_readmes_cpu_configs_are_never_called_sized_for_a_gpu(machine, config, data_dir, tmp_path):
    """On a busy machine with no quiet figure kept, whose matmul measures 20 GFLOP/s now (the speedrun's 14 TFLOP
    would take 12 minutes at that pace)."""
    machine.update(busy=True, measured=20e9)
    r = run_script("train.py", f"config/{config}.py", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}",
                   "--device=cpu", "--compile=False", guard=StopBeforeTraining())
    assert "MFU is measured against 100.0 GFLOP/s (2 cores x 1.56 GHz" in r.stdout, r.stdout + r.stderr
    assert "sized for a GPU" not in r.stdout


def test_the_tutorials_gpu_config_is_still_told(machine, data_dir, tmp_path):
    r = run_script("train.py", "config/train_shakespeare_char.py", f"--data_dir={data_dir}",
                   f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--compile=False", guard=StopBeforeTraining())
    assert "note: this config is sized for a GPU" in r.stdout, r.stdout + r.stderr

"""Where a training step's time goes: train.py's own steps under torch.profiler (a StepClock that starts it after the
warm-up steps), each op's own time (self CPU time; on a GPU its self device time) summed by what the op does and by
the phase of the step it ran in: the forward pass (with the loss and the loop's own ops: the batch, clipping), the
backward pass, or the optimizer's step.
What the ops do not account for (Python: the loop's, the batch's, the log's) is the step's wall time minus theirs.
tools/bench.py --profile prints the table; docs/performance.md keeps the figures."""
import dataclasses
import time

import torch

from gpt_toolkit.core import hardware
from gpt_toolkit.training.timing import StepClock

# What an op does: the nearest of it and the ops that called it whose name matches (an aten::mul that RMSNorm's
# fallback calls is RMSNorm's; a copy_ that autocast makes inside a Linear is a cast). Anything else is "other ops",
# the time of a scope itself (Optimizer.step#Muon.step, the autograd engine's evaluate_function) included: Python and
# dispatch inside it. A compiled CPU step's fused kernels are FUSED when named (name_compiled_kernels), else other
# ops. bf16 attention on a CPU runs as explicit batched matmuls (model.explicit_attention): their time is in matmuls,
# its softmax in attention.
KINDS = [
    ("matmuls", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_weight_int")),
    ("attention (SDPA, softmax)", ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product", "aten::_softmax",
                                   "aten::_safe_softmax")),
    ("casts and copies", ("aten::copy_", "aten::_to_copy", "aten::clone", "aten::contiguous", "aten::cat",
                          "aten::stack")),
    ("activation (GELU, ReLU)", ("aten::gelu", "aten::relu", "aten::threshold", "aten::square")),
    ("norms (LayerNorm, RMSNorm)", ("aten::native_layer_norm", "aten::_fused_rms_norm", "aten::rms_norm",
                                    "aten::layer_norm")),
    ("loss (log-softmax, NLL)", ("aten::_log_softmax", "aten::nll_loss")),
    ("embeddings", ("aten::embedding", "aten::index_select", "aten::index_add")),
    ("vector norms (clip, Muon)", ("aten::linalg_vector_norm", "aten::_foreach_norm")),
]
PHASES = ("forward", "backward", "optimizer")
KERNELS_SHOWN = 8  # the largest fused kernels format_split lists
FUSED = "fused kernels (compiled)"


def fused_kernel(name):
    """The ops a kernel of torch.compile's CPU code fuses ('gelu_gelu_backward_view_2'), or None for any other event.
    Inductor names its kernels in the profiler only when asked (name_compiled_kernels); else their time is the
    compiled graph's call, an "other op"."""
    head, _, fused = name.partition("_cpp_fused_")
    return fused if fused and head.startswith("graph_") else None


def name_compiled_kernels():
    """A context in which torch.compile's CPU kernels show in the profiler under their own names (for what compiles
    inside it)."""
    import torch._inductor.config

    return torch._inductor.config.patch({"cpp.enable_kernel_profile": True})


def kind_of(event):
    """What the op of a profiler event does, by its own name or else the nearest caller's that says (KINDS)."""
    if fused_kernel(event.name):
        return FUSED
    while event is not None:
        for kind, prefixes in KINDS:
            if event.name.startswith(prefixes):
                return kind
        event = event.cpu_parent
    return "other ops"


def phase_of(event):
    """The phase an event ran in: under an Optimizer.step# scope, the optimizer; under the autograd engine, backward."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step#"):
            return "optimizer"
        if parent.name.startswith(("autograd::engine", "torch::autograd")) or parent.name.endswith("Backward0"):
            return "backward"
        parent = parent.cpu_parent
    return "forward"


@dataclasses.dataclass
class StepSplit:
    """Milliseconds per step: ms[kind][phase] of the ops' own time, `outside` the step's wall time not in any op."""
    steps: int
    step_ms: float
    ms: dict
    outside: float
    kernels: list = dataclasses.field(default_factory=list)  # (ms, calls, phase, fused ops) per step, largest first

    def rows(self):
        """(kind, {phase: ms}, total ms) by total, largest first."""
        rows = [(kind, phases, sum(phases.values())) for kind, phases in self.ms.items()]
        return sorted(rows, key=lambda row: -row[2])


class ProfiledClock(StepClock):
    """A StepClock whose steps after the first `warmup` run under torch.profiler."""

    def __init__(self, warmup):
        super().__init__()
        self.warmup, self.profiler = warmup, None

    def after_step(self, step, loss, norm, lr):
        super().after_step(step, loss, norm, lr)  # raises Enough after the last step (never at the warm-up's last)
        if len(self.seconds) == self.warmup:  # the profiled steps begin: start it, then the next step's clock
            activities = [torch.profiler.ProfilerActivity.CPU]
            if hardware.device_type(self.device) == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.start()  # its start-up (up to a second in a fresh process) is no step's time
            self.clock = time.perf_counter()

    def close(self):
        if self.profiler is not None:
            self.profiler.stop()

    def split(self):
        """The profiled steps' time per step, by kind and phase."""
        steps = len(self.seconds) - self.warmup
        gpu = hardware.device_type(self.device) == "cuda"
        ms, kernels = {}, {}
        own = 0.0
        for event in self.profiler.events():
            if event.device_type != torch.autograd.DeviceType.CPU:  # a kernel: counted in the op that launched it
                continue
            us = event.self_device_time_total if gpu else event.self_cpu_time_total
            if us <= 0:
                continue
            phase = phase_of(event)
            phases = ms.setdefault(kind_of(event), dict.fromkeys(PHASES, 0.0))
            phases[phase] += us / 1000 / steps
            own += us / 1000 / steps
            fused = fused_kernel(event.name)
            if fused:
                kernel = kernels.setdefault((fused, phase), [0.0, 0])
                kernel[0] += us / 1000 / steps
                kernel[1] += 1
        step_ms = 1000 * sum(self.seconds[self.warmup:]) / steps
        largest = sorted(((t, n / steps, phase, name) for (name, phase), (t, n) in kernels.items()), reverse=True)
        return StepSplit(steps=steps, step_ms=step_ms, ms=ms, outside=max(0.0, step_ms - own), kernels=largest)


def format_split(split, gpu=False):
    """The table tools/bench.py --profile prints."""
    measure = "GPU time" if gpu else "CPU time"
    lines = [f"where a step's {split.step_ms:.1f} ms go ({split.steps} profiled steps; each op's own {measure}, ms per "
             f"step; the profiler's own cost included; forward: the loss and the loop's own ops too):",
             f"{'':<28}{'forward':>9}{'backward':>10}{'optimizer':>11}{'total':>9}{'share':>8}"]
    for kind, phases, total in split.rows():
        lines.append(f"{kind:<28}" + "".join(f"{phases[p]:{w}.1f}" for p, w in zip(PHASES, (9, 10, 11)))
                     + f"{total:9.1f}{total / split.step_ms:8.0%}")
    if not gpu:
        lines.append(f"{'outside torch ops (Python)':<28}{'':>30}{split.outside:9.1f}{split.outside / split.step_ms:8.0%}")
    if split.kernels:
        lines.append("the largest fused kernels (ms per step, calls per step, phase: the ops each fuses):")
        for t, calls, phase, name in split.kernels[:KERNELS_SHOWN]:
            lines.append(f"{t:9.2f} ms {calls:4g}x  {phase:<9}  {name[:90]}")
    return "\n".join(lines)

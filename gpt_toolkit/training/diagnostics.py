"""Training diagnostics from the tutorial's debugging chapters (ch03 part 5, ch04 part 4), built in:
a data check, an initial-loss check, a gradient monitor and the NaN/Inf diagnosis."""
import math

import torch

from gpt_toolkit.core.errors import UserError

# the tutorial's thresholds (ch03 5, ch04 4.2)
GRAD_NORM_HIGH, GRAD_NORM_LOW, GRAD_MAX_HIGH = 10.0, 1e-3, 100.0
UPDATE_RATIO_LOW, UPDATE_RATIO_HIGH = 1e-3, 1e-2
HIST_EDGES = torch.linspace(-10, 2, 49)  # log10 |gradient| bins for the gradient histograms
# float16: the GradScaler halves its scale and skips the step at each inf/NaN gradient. A few skips are normal
# (the scale starts at 2**16 and finds its level); this many in a row mean the gradients themselves are broken.
MAX_SKIPPED_STEPS = 25

NAN_DIAGNOSIS = """Likely causes (tutorial ch03/ch04, "Loss变成NaN"):
  - learning rate too high (NaN within the first steps): lower learning_rate to a tenth
  - exploding gradients (NaN after a while): clip them, e.g. --grad_clip=1.0
  - float16 overflow (NaN at random): use --dtype=bfloat16 or --dtype=float32
  - bad data (NaN on particular batches): check the dataset with --debug_data=True"""


class NonFiniteGuard:
    """The NaN/Inf guard. Every step records whether its loss and gradient norm are finite in a flag on the device
    (no host sync); the flag is read only where the run looks anyway (log steps, evaluations, a stop), and a raised
    flag stops the run before anything broken is evaluated or saved. float16: the GradScaler's skipped steps are
    counted instead, and only MAX_SKIPPED_STEPS in a row are fatal."""

    def __init__(self, device, scaler):
        self.scaler = scaler
        self.flag = torch.zeros((), dtype=torch.bool, device=device)
        self.skipped_in_a_row = torch.zeros((), dtype=torch.long, device=device)

    def record(self, loss, norm, skipped):
        """One step's mean loss, gradient norm (None without clipping) and GradScaler skip (None without a scaler)."""
        finite = torch.isfinite(loss)
        if skipped is not None:
            self.skipped_in_a_row = (self.skipped_in_a_row + 1) * skipped
            finite &= self.skipped_in_a_row < MAX_SKIPPED_STEPS
        elif norm is not None:
            finite &= torch.isfinite(norm)
        self.flag |= ~finite

    def check(self, step, kept, report):
        """Stop (UserError) if any step so far was not finite; kept says what is on disk."""
        if self.flag.item():
            self.stop(step, kept, report)

    def stop(self, step, kept, report):
        report(f"training stopped: the loss or the gradients became NaN/Inf by step {step}")
        if self.scaler.is_enabled() and self.skipped_in_a_row.item():
            report(f"float16: the GradScaler skipped the last {self.skipped_in_a_row.item()} steps for inf/NaN gradients")
        report(NAN_DIAGNOSIS)
        raise UserError(f"loss or gradients became NaN/Inf by step {step}: {kept}; see the likely causes above "
                        f"(lower learning_rate, set grad_clip, avoid float16)")


def check_batch(X, Y, decode=None, report=print):
    """The tutorial's data check: shapes, dtypes, device, id range, sample 0 decoded, and that Y is X shifted
    by one. A broken shift raises UserError: training on it would learn nothing useful."""
    report(f"data check: X {tuple(X.shape)} {X.dtype} on {X.device}, Y {tuple(Y.shape)} {Y.dtype}")
    report(f"data check: X ids in [{X.min().item()}, {X.max().item()}], Y ids in [{Y.min().item()}, {Y.max().item()}]")
    if decode is not None:
        report(f"data check: X[0] = {decode(X[0].tolist())!r}")
        report(f"data check: Y[0] = {decode([t for t in Y[0].tolist() if t >= 0])!r}")
    targets = Y[:, :-1] >= 0  # -1: padding, or a chat dataset's untrained target
    if X.shape != Y.shape or not torch.equal(X[:, 1:][targets], Y[:, :-1][targets]):
        raise UserError("data check failed: Y is not X shifted by one token, so the model would not learn to predict "
                        "the next token; check get_batch and the .bin files")
    report("data check: passed, Y is X shifted by one")


@torch.no_grad()
def check_init(model, X, Y, vocab_size, ctx, report=print):
    """The tutorial's model-output check on a fresh model: loss near ln(vocab_size), logits range, no NaN/Inf.
    Returns the loss."""
    was_training = model.training
    model.eval()
    with ctx:
        logits, loss = model(X, Y)
    model.train(was_training)
    expected = math.log(vocab_size)
    loss = loss.item()
    report(f"init check: loss {loss:.4f}, random guessing gives ln({vocab_size}) = {expected:.4f} "
           f"(difference {abs(loss - expected):.4f})")
    report(f"init check: logits in [{logits.min().item():.2f}, {logits.max().item():.2f}]")
    if not torch.isfinite(logits).all():
        raise UserError("init check failed: the fresh model's logits contain NaN or Inf; check the model code and dtype")
    if abs(loss - expected) > 0.5:
        report(f"init check: WARNING: initial loss is {abs(loss - expected):.2f} away from ln(vocab_size); "
               f"a healthy initialisation starts within 0.5 (check weight init and the data)")
    return loss


def layer_of(name):
    """Group parameter names into layers for the per-layer norms: 'h.3' for block 3, else the module name."""
    parts = name.split(".")
    if parts[0] == "transformer" and parts[1] == "h":
        return f"h.{parts[2]}"
    return parts[1] if parts[0] == "transformer" else parts[0]


class GradMonitor:
    """Every `interval` steps: total gradient norm, max |gradient|, per-layer norms, a histogram of
    log10|gradient|, and after the optimizer step the update/parameter ratio; warns on the tutorial's thresholds."""

    def __init__(self, model, interval):
        self.model, self.interval = model, interval
        self.before = None

    def due(self, step):
        return self.interval > 0 and step % self.interval == 0

    @torch.no_grad()
    def gradients(self, step, scale=1.0):
        """Statistics of the current gradients, divided by `scale` (float16's GradScaler multiplies them by it);
        call between backward and the optimizer step."""
        layers, total_sq, max_abs, grads = {}, 0.0, 0.0, []
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            g = p.grad.detach().float() / scale
            sq = g.pow(2).sum().item()
            total_sq += sq
            layers[layer_of(name)] = layers.get(layer_of(name), 0.0) + sq
            max_abs = max(max_abs, g.abs().max().item())
            grads.append(g.flatten())
        flat = torch.cat(grads).abs().cpu()
        hist = torch.histc(flat.clamp_min(1e-30).log10().clamp(-10, 2), bins=48, min=-10, max=2)
        self.before = [p.detach().clone() for p in self.model.parameters()]
        return {"type": "grad", "iter": step, "grad_norm": math.sqrt(total_sq), "grad_max": max_abs,
                "layer_norms": {k: math.sqrt(v) for k, v in layers.items()}, "hist": hist.tolist()}

    @torch.no_grad()
    def update_ratio(self):
        """||parameter change|| / ||parameter|| over the whole model for the step just taken."""
        change_sq = param_sq = 0.0
        for old, p in zip(self.before, self.model.parameters()):
            change_sq += (p.detach().float() - old.float()).pow(2).sum().item()
            param_sq += old.float().pow(2).sum().item()
        self.before = None
        return math.sqrt(change_sq) / max(math.sqrt(param_sq), 1e-12)


def grad_warnings(record):
    """The tutorial's warnings for one gradient-monitor record."""
    out = []
    if record["grad_norm"] > GRAD_NORM_HIGH:
        out.append(f"gradient norm {record['grad_norm']:.2f} > {GRAD_NORM_HIGH:g}: lower the learning rate or clip gradients")
    if record["grad_norm"] < GRAD_NORM_LOW:
        out.append(f"gradient norm {record['grad_norm']:.2e} < {GRAD_NORM_LOW:g}: gradients are vanishing; "
                   f"raise the learning rate")
    if record["grad_max"] > GRAD_MAX_HIGH:
        out.append(f"max |gradient| {record['grad_max']:.1f} > {GRAD_MAX_HIGH:g}: extreme gradients may lead to NaN")
    ratio = record.get("update_ratio")
    if ratio is not None and not UPDATE_RATIO_LOW <= ratio <= UPDATE_RATIO_HIGH:
        out.append(f"update/parameter ratio {ratio:.2e} outside {UPDATE_RATIO_LOW:g}..{UPDATE_RATIO_HIGH:g}: "
                   f"{'raise' if ratio < UPDATE_RATIO_LOW else 'lower'} the learning rate")
    return out


def grad_record_lines(record):
    """The log lines for one gradient-monitor record: its summary, then the tutorial's warnings."""
    layers = " ".join(f"{k} {v:.3g}" for k, v in record["layer_norms"].items())
    lines = [f"grad {record['iter']}: norm {record['grad_norm']:.4f}, max {record['grad_max']:.4g}, "
             f"update/param {record['update_ratio']:.2e}; layer norms: {layers}"]
    return lines + [f"WARNING: {warning}" for warning in grad_warnings(record)]

"""The tutorial's debugging tools and training features, built in: data/init checks, gradient monitor, NaN guard,
early stopping, WSD schedule, token masking, document packing and padding."""
import hashlib
import json
import math

import pytest
import torch
from conftest import TINY_TRAIN

import train
from gpt_toolkit.core.errors import UserError, run_main
from gpt_toolkit.data import dataset
from gpt_toolkit.data.dataset import BatchPlan, Dataset
from gpt_toolkit.training.diagnostics import MAX_SKIPPED_STEPS, GradMonitor, check_batch, grad_warnings
from gpt_toolkit.training.guards import Guard
from gpt_toolkit.training.schedule import Schedule
from model import GPT, GPTConfig, document_positions_and_mask


def step_batches(data, step, *, accum_steps, **plan):  # a BatchPlan's micro-batches of step `step`
    return BatchPlan(gradient_accumulation_steps=accum_steps, **plan).rows(data, step)


def get_lr(it, **settings):  # the schedule's learning rate at step it
    return Schedule(**settings).lr(it)


pytestmark = pytest.mark.precision  # its code path depends on the precision dtype=auto picks (.ci/run runs it in both)


def run_train(capsys, *argv, guard=None):
    with pytest.raises(SystemExit) as e:
        run_main(lambda args: train.main(args, guards=[guard] if guard else []), [str(a) for a in argv])
    out, err = capsys.readouterr()
    return e.value.code, out, err


def metrics(out_dir, kind):
    return [r for r in map(json.loads, (out_dir / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_debug_data_prints_and_checks_the_shift(data_dir, tmp_path, capsys):
    code, out, _ = run_train(capsys, *TINY_TRAIN, "--max_iters=0", "--debug_data=True", f"--data_dir={data_dir}",
                             f"--out_dir={tmp_path / 'o'}")
    assert code == 0
    assert "data check: X (8, 32) torch.int64 on cpu, Y (8, 32) torch.int64" in out
    assert "data check: passed, Y is X shifted by one" in out
    x_text = out.split("data check: X[0] = ")[1].splitlines()[0]
    y_text = out.split("data check: Y[0] = ")[1].splitlines()[0]
    assert eval(x_text)[1:] == eval(y_text)[:-1]  # the tutorial's own check on the decoded text


def test_data_check_catches_a_broken_shift(data_dir, tmp_path, capsys, monkeypatch):
    real = dataset.batch_at

    def unshifted(*args, **kw):
        X, Y = real(*args, **kw)
        return X, X.clone()  # the bug the check exists for: targets equal to inputs
    monkeypatch.setattr(dataset, "batch_at", unshifted)
    code, _, err = run_train(capsys, *TINY_TRAIN, "--debug_data=True", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}")
    assert code == 1 and "data check failed: Y is not X shifted by one token" in err
    with pytest.raises(UserError, match="not X shifted by one"):
        check_batch(torch.tensor([[1, 2, 3]]), torch.tensor([[1, 2, 3]]), report=lambda s: None)
    check_batch(torch.tensor([[1, 2, 3]]), torch.tensor([[2, 3, 7]]), report=lambda s: None)  # shifted: passes


def test_check_init_reports_loss_against_ln_vocab(data_dir, tmp_path, capsys):
    code, out, _ = run_train(capsys, *TINY_TRAIN, "--max_iters=0", "--check_init=True", f"--data_dir={data_dir}",
                             f"--out_dir={tmp_path / 'o'}")
    assert code == 0
    loss = float(out.split("init check: loss ")[1].split(",")[0])
    assert abs(loss - math.log(65)) < 0.3 and "ln(65) = 4.1744" in out and "WARNING" not in out


def test_grad_monitor_records_and_warns(data_dir, tmp_path, capsys):
    out_dir = tmp_path / "g"
    code, out, _ = run_train(capsys, *TINY_TRAIN, "--max_iters=21", "--grad_monitor_interval=10", f"--data_dir={data_dir}",
                             f"--out_dir={out_dir}")
    assert code == 0
    records = metrics(out_dir, "grad")
    assert [r["iter"] for r in records] == [0, 10, 20]
    r = records[0]
    assert set(r["layer_norms"]) == {"wte", "wpe", "h.0", "h.1", "ln_f"}
    assert r["grad_norm"] == pytest.approx(math.sqrt(sum(v * v for v in r["layer_norms"].values())), rel=1e-5)
    assert len(r["hist"]) == 48 and sum(r["hist"]) > 20_000 and 0 < r["update_ratio"] < 1
    assert "grad 10: norm" in out and "layer norms: wte" in out
    # the tutorial's thresholds
    assert grad_warnings({"grad_norm": 12.0, "grad_max": 150.0, "update_ratio": 0.05}) == [
        "gradient norm 12.00 > 10: lower the learning rate or clip gradients",
        "max |gradient| 150.0 > 100: extreme gradients may lead to NaN",
        "update/parameter ratio 5.00e-02 outside 0.001..0.01: lower the learning rate"]
    low = grad_warnings({"grad_norm": 1e-4, "grad_max": 1.0, "update_ratio": 1e-4})
    assert low[0].startswith("gradient norm 1.00e-04 < 0.001") and "raise the learning rate" in low[1]
    assert grad_warnings({"grad_norm": 1.0, "grad_max": 1.0, "update_ratio": 5e-3}) == []


def test_grad_monitor_update_ratio_matches_a_manual_step():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8)))[1].backward()
    monitor = GradMonitor(model, 1)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    record = monitor.gradients(0)
    opt.step()
    assert record["grad_norm"] == pytest.approx(grads.norm().item(), rel=1e-5)
    assert monitor.update_ratio() == pytest.approx((0.1 * grads).norm().item() / before.norm().item(), rel=1e-4)


def test_nan_guard_stops_and_keeps_the_checkpoint(data_dir, tmp_path, capsys):
    out_dir = tmp_path / "nan"
    assert run_train(capsys, *TINY_TRAIN, "--max_iters=20", f"--data_dir={data_dir}", f"--out_dir={out_dir}")[0] == 0
    saved = {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in out_dir.glob("*.pt")}
    guard = inf_gradients(at_steps={23})  # the 4th step after the resume
    code, out, err = run_train(capsys, *TINY_TRAIN, "--max_iters=40", "--log_interval=1", "--init_from=resume",
                               f"--data_dir={data_dir}", f"--out_dir={out_dir}", guard=guard)
    assert code == 1
    assert "loss or gradients became NaN/Inf by step 23" in err and "step 20) is from before and untouched" in err
    assert "learning rate too high" in out and "--grad_clip=1.0" in out and "--dtype=bfloat16" in out
    assert {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in out_dir.glob("*.pt")} == saved


def test_early_stopping_stops_at_the_right_eval(data_dir, tmp_path, capsys):
    out_dir = tmp_path / "early"
    # 2000 training tokens: the model overfits, val loss turns up, and patience runs out
    code, out, _ = run_train(capsys, *TINY_TRAIN, "--max_iters=400", "--lr_decay_iters=400", "--eval_interval=10",
                             "--max_train_tokens=2000", "--learning_rate=1e-2", "--early_stop_patience=3",
                             f"--data_dir={data_dir}", f"--out_dir={out_dir}")
    assert code == 0
    evals = [(r["step"], r["val_loss"]) for r in metrics(out_dir, "eval")]
    best_step, best_val = min(evals, key=lambda e: e[1])
    assert evals[-1][0] == best_step + 3 * 10 < 400, evals  # stopped at the third evaluation without improvement
    assert f"early stopping at step {best_step + 30}: val loss has not improved by more than 0.0 for 3 evaluations" in out
    assert f"(best {best_val:.4f} at step {best_step})" in out
    best = torch.load(out_dir / "ckpt.pt", weights_only=True)
    assert best["iter_num"] == best_step and torch.load(out_dir / "latest.pt", weights_only=True)["iter_num"] == best_step + 30


def test_early_stopping_min_delta(data_dir, tmp_path, capsys):
    # with min_delta 10 no evaluation after the first counts as an improvement: patience 2 ends the run at step 20
    code, out, _ = run_train(capsys, *TINY_TRAIN, "--max_iters=60", "--eval_interval=10", "--early_stop_patience=2",
                             "--early_stop_min_delta=10", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'd'}")
    assert code == 0 and "early stopping at step 20" in out
    assert [r["step"] for r in metrics(tmp_path / "d", "eval")] == [0, 10, 20]


def test_wsd_schedule_phase_boundaries():
    def wsd(it):
        return get_lr(it, learning_rate=1e-3, warmup_iters=100, lr_decay_iters=0, min_lr=1e-4, schedule="wsd", max_iters=1000,
                      decay_frac=0.2)
    assert wsd(0) == pytest.approx(1e-3 / 101)            # warmup as always
    assert wsd(99) == pytest.approx(1e-3 * 100 / 101)
    assert wsd(100) == 1e-3 and wsd(799) == 1e-3          # stable: held at the peak until the last 20%
    assert wsd(800) == pytest.approx(1e-3)                # decay starts at max_iters * (1 - decay_frac)
    assert wsd(900) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert wsd(1000) == pytest.approx(1e-4) and wsd(1200) == pytest.approx(1e-4)
    assert get_lr(500, learning_rate=1e-3, warmup_iters=100, lr_decay_iters=0, min_lr=1e-4, schedule="constant",
                  max_iters=1000) == 1e-3


def test_masking_touches_inputs_only(data_dir):
    data = Dataset(data_dir, "shakespeare_char").splits["train"]
    rows = dict(batch_size=16, accum_steps=2, block_size=32, seed=1337, device="cpu", vocab_size=65)
    plain = step_batches(data, 5, **rows)
    masked = step_batches(data, 5, **rows, mask_prob=0.3, mask_token=0)
    for (x0, y0), (x1, y1) in zip(plain, masked):
        assert torch.equal(y0, y1)  # targets untouched
        changed = x0 != x1
        assert torch.all(x1[changed] == 0)
        assert 0.2 < (x1 == 0).float().mean().item() < 0.4
    again = step_batches(data, 5, **rows, mask_prob=0.3)
    assert torch.equal(again[0][1], plain[0][1]) and not torch.equal(again[0][0], plain[0][0])
    assert torch.equal(again[0][0], step_batches(data, 5, **rows, mask_prob=0.3)[0][0])


def test_masking_leaves_evaluation_alone(data_dir, tmp_path, capsys):
    first_eval = []
    for name, extra in (("plain", []), ("masked", ["--mask_prob=0.5"])):
        out_dir = tmp_path / name
        assert run_train(capsys, *TINY_TRAIN, "--max_iters=0", f"--data_dir={data_dir}", f"--out_dir={out_dir}", *extra)[0] == 0
        first_eval.append(metrics(out_dir, "eval")[0])
    assert first_eval[0]["val_loss"] == first_eval[1]["val_loss"] and first_eval[0]["train_loss"] == first_eval[1]["train_loss"]


def test_document_positions_and_mask():
    eot = 9
    idx = torch.tensor([[1, 2, eot, 3, 4, 5, eot, 6]])
    pos, mask = document_positions_and_mask(idx, eot)
    assert pos.tolist() == [[0, 1, 2, 0, 1, 2, 3, 0]]
    assert mask.shape == (1, 1, 8, 8)
    assert mask[0, 0, 4].tolist() == [False, False, False, True, True, False, False, False]
    assert mask[0, 0, 2].tolist() == [True, True, True, False, False, False, False, False]


def test_packing_equals_each_document_alone():
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=20, n_layer=2, n_head=2, n_embd=16, bias=True)).eval()
    eot = 19
    docs = [torch.tensor([3, 4, 5, 6, eot]), torch.tensor([7, 1, 2, eot]), torch.tensor([8, 8, 9, 10, 11, 12])]
    packed = torch.cat(docs)[None]
    dummy = torch.zeros_like(packed)
    with torch.no_grad():
        logits, _ = model(packed, dummy, doc_sep=eot)
        alone = torch.cat([model(d[None], torch.zeros_like(d)[None])[0] for d in docs], dim=1)
        unpacked, _ = model(packed, dummy)
    torch.testing.assert_close(logits, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(unpacked, alone, atol=1e-3)  # without packing the later documents see the earlier ones


def test_packing_needs_an_end_of_text_token(data_dir, tmp_path, capsys):
    code, _, err = run_train(capsys, *TINY_TRAIN, "--packing=True", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}")
    assert code == 1 and "packing=True needs documents separated by an end-of-text token" in err


def test_packing_trains_on_a_gpt2_dataset(tmp_path, capsys):
    from conftest import build_dataset
    docs = ["The cat sat on the mat. " * 30, "A dog ran in the park. " * 30, "Birds fly over the sea. " * 30] * 4
    build_dataset("<|endoftext|>".join(docs), tmp_path / "data" / "docs", "gpt2", progress=False)
    ids = torch.from_numpy(__import__("numpy").fromfile(tmp_path / "data" / "docs" / "train.bin", dtype="uint16").astype("int64"))
    assert (ids == 50256).sum().item() >= 8  # the separators made it into the data
    code, out, err = run_train(capsys, *TINY_TRAIN, "--dataset=docs", "--packing=True", "--max_iters=10", "--eval_iters=2",
                               f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'o'}")
    assert code == 0, err
    evals = metrics(tmp_path / "o", "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]


def test_document_segments_cover_every_target_once():
    import numpy as np
    data = np.array([1, 2, 9, 3, 9, 9, 4, 5, 6, 7, 8, 9, 1, 2], dtype=np.uint16)
    for chunk in (1 << 26, 4):  # scanned whole, or in chunks that cut documents
        starts, lengths = dataset.document_segments(data, 9, block_size=3, chunk=chunk)
        # [1 2 9] [3 9], a lone 9 dropped, [4 5 6 7 8 9] cut into [4 5 6 7] and [7 8 9], the unterminated [1 2]
        assert starts.tolist() == [0, 3, 6, 9, 12] and lengths.tolist() == [3, 2, 4, 3, 2]


def test_padded_batch_equals_each_document_alone():
    import numpy as np
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=16, bias=True)).eval()
    eot = 19
    data = np.array([3, 4, 5, 6, eot, 7, 1, eot, 8, 8, 9, 10, 11, 12, 13, 2, 5, eot], dtype=np.uint16)
    starts, lengths = dataset.document_segments(data, eot, block_size=8)
    assert lengths.tolist() == [5, 3, 9, 2]  # the third document is cut at block_size
    X, Y = dataset.padded_batch(data, starts, lengths, pad=eot)
    assert X.shape == (4, 8) and (Y == -1).sum().item() == 4 * 8 - (5 + 3 + 9 + 2 - 4)
    with torch.no_grad():
        logits, loss = model(X, Y)
        total, count = 0.0, 0
        for i, (s, n) in enumerate(zip(starts, lengths)):
            doc = torch.from_numpy(data[s:s + n].astype(np.int64))[None]
            alone_logits, alone_loss = model(doc[:, :-1], doc[:, 1:])
            torch.testing.assert_close(logits[i, :n - 1], alone_logits[0], rtol=1e-5, atol=1e-5)
            total, count = total + alone_loss.item() * (n - 1), count + n - 1
    assert loss.item() == pytest.approx(total / count, abs=1e-6)  # each real target once, padding ignored


def test_padding_trains_on_whole_documents(tmp_path, capsys, monkeypatch):
    from conftest import build_dataset
    docs = ["The cat sat on the mat. " * (2 + i % 5) for i in range(40)]
    build_dataset("<|endoftext|>".join(docs), tmp_path / "data" / "docs", "gpt2", progress=False)
    widths = []
    real = dataset.padded_batch

    def spy(*args, **kwargs):
        X, Y = real(*args, **kwargs)
        widths.append(X.shape[1])
        return X, Y

    monkeypatch.setattr(dataset, "padded_batch", spy)
    code, out, err = run_train(capsys, *TINY_TRAIN, "--dataset=docs", "--padding=True", "--max_iters=6", "--block_size=64",
                               "--eval_iters=2",
                               "--eval_interval=3", f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'o'}")
    assert code == 0, err
    train_ids = Dataset(tmp_path / "data", "docs").splits["train"]
    longest = dataset.document_segments(train_ids, 50256, block_size=64)[1].max() - 1
    assert max(widths) <= longest < 50 and min(widths) < longest  # padded to the batch's longest, never to 64
    evals = metrics(tmp_path / "o", "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    code, _, err = run_train(capsys, *TINY_TRAIN, "--dataset=docs", "--padding=True", "--packing=True",
                             f"--data_dir={tmp_path / 'data'}", f"--out_dir={tmp_path / 'p'}")
    assert code == 2 and "packing=True and padding=True are two ways of batching documents: choose one" in err


def test_padding_needs_an_end_of_text_token(data_dir, tmp_path, capsys):
    code, _, err = run_train(capsys, *TINY_TRAIN, "--padding=True", f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}")
    assert code == 1 and "padding=True needs documents separated by an end-of-text token" in err
    assert not (tmp_path / "o").exists()


def inf_gradients(at_steps):
    """A Guard whose steps in at_steps end with an inf gradient in the first parameter."""
    class InfGradients(Guard):
        def after_backward(self, step, module):
            if step in at_steps:
                next(module.parameters()).grad[0, 0] = float("inf")
    return InfGradients()


def test_float16_scaler_skips_an_inf_step_and_training_goes_on(data_dir, tmp_path, capsys):
    """float16's GradScaler skips a step whose gradients overflowed and halves its scale: that is normal, not a NaN."""
    args = [*TINY_TRAIN, "--dtype=float16", "--max_iters=20", "--log_interval=1", f"--data_dir={data_dir}"]
    assert run_train(capsys, *args, f"--out_dir={tmp_path / 'plain'}")[0] == 0
    code, out, err = run_train(capsys, *args, f"--out_dir={tmp_path / 'skipped'}", guard=inf_gradients(at_steps={5}))
    assert code == 0, err
    assert "NaN/Inf" not in out and "step 20: train loss" in out
    assert "note: dtype=float16 on a CPU trains as on a T4 or V100: float16 autocast with a GradScaler" in out  # said
    plain = torch.load(tmp_path / "plain" / "latest.pt", weights_only=True)["scaler"]
    skipped = torch.load(tmp_path / "skipped" / "latest.pt", weights_only=True)["scaler"]
    assert skipped["scale"] == plain["scale"] / 2  # exactly one step was skipped


def test_float16_guard_stops_a_run_of_skipped_steps(data_dir, tmp_path, capsys):
    out_dir = tmp_path / "fp16"
    args = [*TINY_TRAIN, "--dtype=float16", f"--data_dir={data_dir}", f"--out_dir={out_dir}"]
    assert run_train(capsys, *args, "--max_iters=20")[0] == 0
    saved = {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in out_dir.glob("*.pt")}
    code, out, err = run_train(capsys, *args, "--max_iters=100", "--lr_decay_iters=100", "--log_interval=1",
                               "--eval_interval=100", "--init_from=resume",
                               guard=inf_gradients(at_steps=range(23, 10_000)))  # broken from step 23 on
    assert code == 1
    assert f"the GradScaler skipped the last {MAX_SKIPPED_STEPS} steps for inf/NaN gradients" in out
    assert f"loss or gradients became NaN/Inf by step {23 + MAX_SKIPPED_STEPS - 1}" in err
    assert "step 20) is from before and untouched" in err
    assert {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in out_dir.glob("*.pt")} == saved


def test_eval_only_evaluates_once_and_writes_no_checkpoint(data_dir, tmp_path, capsys):
    """The eval_gpt2* configs' mode: one evaluation of the loaded model, nothing trained or saved."""
    out_dir = tmp_path / "ev"
    assert run_train(capsys, *TINY_TRAIN, "--max_iters=20", f"--data_dir={data_dir}", f"--out_dir={out_dir}")[0] == 0
    saved = {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in out_dir.glob("*.pt")}
    last = metrics(out_dir, "eval")[-1]
    code, out, _ = run_train(capsys, *TINY_TRAIN, "--eval_only=True", "--init_from=resume", f"--data_dir={data_dir}",
                             f"--out_dir={out_dir}")
    assert code == 0
    evals = [line for line in out.splitlines() if line.startswith("step ")]
    assert evals == [f"step 20: train loss {last['train_loss']:.4f}, val loss {last['val_loss']:.4f}"]
    assert "iter " not in out and "saving checkpoint" not in out
    assert {p.name: hashlib.sha1(p.read_bytes()).hexdigest() for p in out_dir.glob("*.pt")} == saved


@pytest.mark.parametrize("schedule", ["wsd", "constant"])
def test_lr_schedule_from_the_config_reaches_training(data_dir, tmp_path, capsys, schedule):
    out_dir = tmp_path / schedule
    code, _, _ = run_train(capsys, *TINY_TRAIN, f"--lr_schedule={schedule}", "--max_iters=50", "--warmup_iters=5",
                           "--learning_rate=1e-3", "--min_lr=1e-4", "--decay_frac=0.4", "--log_interval=1",
                           f"--data_dir={data_dir}", f"--out_dir={out_dir}")
    assert code == 0
    lr = {r["iter"]: r["lr"] for r in metrics(out_dir, "train")}
    assert lr[0] == pytest.approx(1e-3 / 6) and lr[5] == lr[29] == 1e-3
    if schedule == "wsd":  # held until the last 40% (step 30), then a cosine to min_lr at step 50
        assert lr[30] == 1e-3 and lr[40] == pytest.approx(1e-4 + 0.5 * 9e-4) and lr[49] < 1.1e-4
    else:
        assert lr[49] == 1e-3

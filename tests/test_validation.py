"""Impossible settings are refused before any work, each with one line naming the key and the fix."""
import os

import pytest
from conftest import TINY_TRAIN, assert_one_line_error, run_script

import train
from gpt_toolkit.core.errors import ConfigError, UserError
from gpt_toolkit.data.dataset import Dataset


def run(data_dir, tmp_path, *extra):
    return train.main([*TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'out'}", *extra])


@pytest.mark.parametrize("args, message", [
    (["--n_embd=384", "--n_head=5"], "n_embd=384 is not divisible by n_head=5"),
    (["--batch_size=0"], "batch_size=0 must be positive"),
    (["--n_layer=-1"], "n_layer=-1 must be positive"),
    (["--block_size=0"], "block_size=0 must be positive"),
    (["--dropout=1.0"], "dropout=1.0 must be in [0, 1)"),
    (["--dropout=-0.1"], "dropout=-0.1 must be in [0, 1)"),
    (["--learning_rate=0"], "learning_rate=0.0 must be positive"),
    (["--max_iters=-5"], "max_iters=-5 must not be negative"),
    (["--beta2=1.0"], "beta2=1.0 must be in [0, 1)"),
])
def test_bad_values(data_dir, tmp_path, args, message):
    with pytest.raises(ConfigError) as e:
        run(data_dir, tmp_path, *args)
    assert message in str(e.value)
    assert not (tmp_path / "out").exists(), "nothing is created before validation passes"


def test_divisibility_error_suggests_heads(data_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"use an n_head from \[1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64\]"):
        run(data_dir, tmp_path, "--n_embd=384", "--n_head=5")


def test_block_size_longer_than_a_split(data_dir, tmp_path):
    with pytest.raises(UserError, match=r"block_size=2000000 is too long for the train split .*use --block_size=1003853 or less"):
        run(data_dir, tmp_path, "--block_size=2000000")
    with pytest.raises(UserError, match=r"block_size=120000 is too long for the val split of 'shakespeare_char' "
                                        r"\(111540 tokens\): use --block_size=111539 or less"):
        run(data_dir, tmp_path, "--block_size=120000")


def test_missing_dataset_names_prepare_script(tmp_path):
    r = run_script("train.py", "config/train_shakespeare_char.py", f"--data_dir={tmp_path}", f"--out_dir={tmp_path / 'o'}",
                   "--device=cpu")
    assert_one_line_error(r, "dataset 'shakespeare_char' is not prepared",
                          f"run python data/shakespeare_char/prepare.py --out_dir={tmp_path / 'shakespeare_char'} first")


def test_missing_dataset_with_its_own_prepare_script(tmp_path):
    (tmp_path / "mytext").mkdir()
    (tmp_path / "mytext" / "prepare.py").write_text("")
    with pytest.raises(UserError, match=r"dataset 'mytext' is not prepared .*run python .*mytext/prepare.py first"):
        Dataset(tmp_path, "mytext")
    with pytest.raises(UserError, match=r"run python data/prepare_text.py --input=YOUR.txt --name=other first"):
        Dataset(tmp_path, "other")


def test_unknown_device_and_dtype(data_dir, tmp_path):
    with pytest.raises(UserError, match="unknown device 'gpu': use auto, cpu, cuda, cuda:N or mps"):
        run(data_dir, tmp_path, "--device=gpu")
    with pytest.raises(ConfigError, match="dtype must be one of auto, float32, bfloat16, float16"):
        run(data_dir, tmp_path, "--dtype=fp8")


def test_cuda_requested_without_cuda(data_dir, tmp_path):
    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    r = run_script("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--device=cuda")
    assert_one_line_error(r, "device=cuda but this machine has no usable CUDA GPU", "--device=cpu")
    assert not (tmp_path / "o").exists()


def test_resume_without_checkpoint(data_dir, tmp_path):
    with pytest.raises(UserError, match=r"no checkpoint in .*out \(looked for latest.pt and ckpt.pt\)"):
        run(data_dir, tmp_path, "--init_from=resume")


def test_wandb_without_the_package_fails_before_any_work(data_dir, tmp_path):
    try:  # wandb is not a dependency; where someone installed it this check does not apply
        import wandb  # noqa: F401
        pytest.skip("wandb is installed here")
    except ImportError:
        pass
    r = run_script("train.py", *TINY_TRAIN, f"--data_dir={data_dir}", f"--out_dir={tmp_path / 'o'}", "--wandb_log=True")
    assert_one_line_error(r, "wandb_log=True needs the wandb package: pip install wandb")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_gpt2_weights_offline_is_a_clear_error(data_dir, tmp_path):
    pytest.importorskip("transformers")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty_hf_cache")}
    r = run_script("sample.py", "--init_from=gpt2", "--num_samples=1", "--max_new_tokens=5", "--device=cpu", env=env)
    assert_one_line_error(r, "could not load gpt2 weights from Hugging Face", "the first use needs internet")


# Loaded by the Python of a script a test runs (PYTHONPATH): every connection it tries, one line each in CONNECTIONS
COUNT_CONNECTIONS = """import os, socket
connect = socket.socket.connect
def counted(self, address):
    with open(os.environ["CONNECTIONS"], "a") as f:
        f.write(repr(address) + "\\n")
    return connect(self, address)
socket.socket.connect = counted
"""


@pytest.mark.slow
def test_gpt2_weights_with_the_hub_unreachable_are_a_clear_error_at_once(tmp_path):
    """No HF_HUB_OFFLINE, as a user who is offline has: the Hub's host does not answer. huggingface_hub retried for
    30-72 s, printing 'Retrying in 8s' lines, before the error. Now one connection is tried, and no retry: counted,
    not timed, so that a busy machine cannot fail it."""
    pytest.importorskip("transformers")
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sitecustomize.py").write_text(COUNT_CONNECTIONS)
    connections = tmp_path / "connections"
    env = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "empty_hf_cache"), "HF_HUB_OFFLINE": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "hooks"), os.environ.get("PYTHONPATH")])),
           "CONNECTIONS": str(connections)}
    r = run_script("sample.py", "--init_from=gpt2", "--num_samples=1", "--max_new_tokens=5", "--device=cpu", env=env)
    assert_one_line_error(r, "could not load gpt2 weights from Hugging Face (cannot reach http://127.0.0.1:9, and "
                          "they are not in the Hugging Face cache)", "the first use needs internet")
    tried = connections.read_text().splitlines() if connections.exists() else []
    assert [a for a in tried if a.endswith(", 9)")] == ["('127.0.0.1', 9)"], tried  # the one look: no retry
    assert "Retrying" not in r.stdout + r.stderr

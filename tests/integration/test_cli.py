"""The `msmedcap` CLI's train and evaluate subcommands and their launch/ shims (issue 12, item 4): options
and overrides in any order, one ConfigError handler, the packaged DeepSpeed configs equal to the
checkout's, and the benchmark's loader and generation parts run in this process (no launch/ script)."""
import configparser
import importlib.util
from pathlib import Path

import pytest

from msmedcap import cli
from helpers.model_kit import one_thread

REPO = Path(__file__).resolve().parents[2]

_threads = pytest.fixture(autouse=True, scope="module")(one_thread)


def load_shim(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_packaged_ds_configs_are_the_checkouts_and_ship_as_package_data():
    packaged = sorted(p.name for p in (REPO / "msmedcap" / "ds_configs").glob("*.json"))
    assert packaged == sorted(p.name for p in (REPO / "ds_configs").glob("*.json")) and "zero2.json" in packaged
    for name in packaged:  # copies (no links): an installed wheel has no checkout
        assert (REPO / "msmedcap/ds_configs" / name).read_bytes() == (REPO / "ds_configs" / name).read_bytes(), \
            f"msmedcap/ds_configs/{name} differs from ds_configs/{name}: copy the edited one over the other"
    setup = configparser.ConfigParser()
    setup.read(REPO / "setup.cfg")
    assert "ds_configs/*.json" in setup["options.package_data"]["msmedcap"]


def test_train_takes_options_and_overrides_in_any_order():
    a = cli.parse_args(["train", "train.stage=1", "--config", "paper", "train.seed=3", "--resume", "auto",
                        "--deepspeed", "pkg://ds_configs/zero2_offload.json", "--local_rank=1", "train.keep_last=1"])
    assert a.command == "train" and a.config == "paper" and a.resume == "auto" and a.local_rank == 1
    assert a.overrides == ["train.stage=1", "train.seed=3", "train.keep_last=1"]
    from msmedcap.train.cli import finish_args

    assert finish_args(a).ds_config == REPO / "msmedcap/ds_configs/zero2_offload.json"
    assert finish_args(cli.parse_args(["train"])).ds_config == REPO / "msmedcap/ds_configs/zero2.json"
    # the shim keeps the checkout's file as its default, as before
    assert load_shim("pretrain").parse_args([]).ds_config == REPO / "ds_configs/zero2.json"


def test_evaluate_takes_options_and_overrides_in_any_order():
    a = cli.parse_args(["evaluate", "eval.num_beams=1", "--checkpoint", "runs/x", "eval.max_samples=4",
                        "--data", "a.tar", "--out", "o"])
    assert a.command == "evaluate" and a.checkpoint == "runs/x" and a.data == ["a.tar"] and a.out == "o"
    assert a.overrides == ["eval.num_beams=1", "eval.max_samples=4"]


def test_one_config_error_handler_for_train_and_evaluate(tmp_path, capsys):
    assert cli.main(["train", "train.stage1.lr=oops"]) == 2
    assert "msmedcap: config error: train.stage1.lr: expected a number" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert load_shim("pretrain").main(["--deepspeed", str(bad)]) == 2  # before any work
    assert "bad.json: invalid JSON" in capsys.readouterr().err
    assert load_shim("evaluate").main(["--checkpoint", str(tmp_path / "none")]) == 2
    assert "msmedcap evaluate: error:" in capsys.readouterr().err


def test_bench_loader_and_generate_parts_run_in_process():
    from msmedcap.bench.generate import generate_bench
    from msmedcap.bench.loader import loader_bench

    loader = loader_bench("demo", ["train.stage1.micro_batch_size=2"], workers=0, batches=2)
    assert set(loader["samples_per_s"]) == {"msmedcap", "msmedcap device resize", "plain decode", "plain + transforms"}
    assert loader["device_resize_s_per_batch"]["cpu"] > 0 and loader["device_resize_ratio_vs_plain_decode"] > 0
    gen = generate_bench(None, "demo", ["eval.num_beams=1", "eval.max_len=4", "eval.min_len=1"], samples=2,
                         batch_size=2)
    assert gen["samples"] == 2 and gen["batched_captions_per_s"] > 0

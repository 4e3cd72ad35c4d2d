"""Validation during training (issue 25, item 3): the config keys are checked before any work, the
best-so-far rule, and the batches a rank validates on. The training runs are in
tests/integration/test_validation.py."""
import pytest
import torch

from msmedcap.cli import main
from msmedcap.config import ConfigError, load_config
from msmedcap.train.validation import Validator, _limited
from msmedcap.train.validation_settings import KeepBest

VAL = ["train.eval_every=2", "data.val=[shards/demo/medical-eval-000.tar]"]


def cfg(*overrides, check_files=False):
    return load_config("demo", [*VAL, *overrides], check_files=check_files)


@pytest.mark.parametrize("overrides, message", [
    (["train.keep_best_by=val/bleu:max"], r"train.keep_best_by: unknown metric 'val/bleu' \(known: .*val/cider"),
    (["train.keep_best_by=val/findings/nope:max"], r"unknown metric 'val/findings/nope'"),
    (["train.keep_best_by=val/cider"], r"train.keep_best_by must be METRIC:max or METRIC:min"),
    (["train.keep_best_by=val/loss:lowest"], r"train.keep_best_by must be METRIC:max or METRIC:min"),
    (["train.keep_best_by=val/cider:max"], r"val/cider is scored on generated captions: set train.eval_generate_every"),
    (["train.keep_best_by=val/cider:max", "train.eval_generate_every=4", "train.stage=1"],
     r"val/cider is measured in stage 2 only, and train.stage=1"),
    (["train.keep_best_by=val/loss_itc:min", "train.stage=2"], r"val/loss_itc is measured in stage 1 only"),
    (["train.eval_generate_every=3"], r"train.eval_generate_every must be a multiple of train.eval_every \(2\)"),
    (["train.early_stop_patience=2"], r"train.early_stop_patience counts validations without a new best: set "
                                      r"train.keep_best_by"),
    (["data.val=[]"], r"train.eval_every=2: data.val must be set"),
])
def test_inconsistent_validation_keys_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        cfg(*overrides)


def test_consistent_validation_keys_load():
    c = cfg("train.eval_generate_every=4", "train.keep_best_by=val/findings/lesion_present:max",
            "train.early_stop_patience=3", "eval.val_max_samples=10", check_files=True)
    assert (c.train.eval_every, c.train.eval_generate_every, c.train.keep_best_by) == \
        (2, 4, "val/findings/lesion_present:max")
    assert cfg("train.keep_best_by=val/loss_sam/itm:min").train.keep_best_by == "val/loss_sam/itm:min"


def test_a_missing_val_shard_is_named():
    with pytest.raises(ConfigError, match="data.val: shard file not found: shards/demo/nope.tar"):
        cfg("data.val=[shards/demo/nope.tar]", check_files=True)


def test_the_train_command_refuses_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["train", f"train.output_dir={out}", *VAL, "train.keep_best_by=val/bleu:max"])
    assert rc == 2
    assert "unknown metric 'val/bleu'" in capsys.readouterr().err
    rc = main(["train", f"train.output_dir={out}", "train.eval_every=5"])
    assert rc == 2
    assert "data.val must be set" in capsys.readouterr().err
    assert not out.exists()  # nothing written, nothing trained


def test_best_so_far_and_patience():
    v = Validator(cfg("train.keep_best_by=val/loss:min", "train.early_stop_patience=2"), 2, None, None, None, None)
    assert v.record == {"metric": "val/loss", "mode": "min", "value": None, "step": None, "stale": 0}
    assert [v.update(s, x) for s, x in ((2, 1.0), (4, 1.0), (6, 0.5), (8, None), (10, float("nan")), (12, 0.7))] == \
        [True, False, True, False, False, False]
    assert (v.record["value"], v.record["step"], v.record["stale"]) == (0.5, 6, 2)  # None is not measured; NaN is
    v.restore({"metric": "val/cider", "mode": "max", "value": 9.0, "step": 2, "stale": 0})  # another metric: ignored
    assert v.record["step"] == 6
    assert KeepBest("val/cider", "max").better(0.2, 0.1) and not KeepBest("val/cider", "max").better(0.1, 0.1)
    # the metric of stage 1 only is not kept in stage 2, and stage 1 has no generation
    s1 = Validator(cfg("train.keep_best_by=val/loss_itc:min", "train.eval_generate_every=4"), 2, None, None, None, None)
    assert s1.keep is None and s1.record is None
    s1 = Validator(cfg("train.keep_best_by=val/loss_itc:min", "train.eval_generate_every=4"), 1, None, None, None, None)
    assert s1.keep == KeepBest("val/loss_itc", "min") and not s1.generates(4, 10)
    assert [s for s in range(1, 11) if s1.due(s, 9)] == [2, 4, 6, 8, 9, 10]


def test_limited_cuts_the_last_batch_and_counts_skips():
    def batch(keys, skipped=None):
        n = len(keys)
        return {"key": keys, "domain": torch.arange(n), "pixels": torch.zeros(n, 2, 2), "skipped": skipped or {},
                "truncated": {"lm_caption": 0}}

    skipped = {}
    got = list(_limited([batch([], {"bad_image": 2}), batch(["a", "b", "c"]), batch(["d", "e", "f"], {"bad_image": 1}),
                         batch(["g"])], 5, skipped))
    assert [b["key"] for b in got] == [["a", "b", "c"], ["d", "e"]]
    assert got[1]["domain"].tolist() == [0, 1] and got[1]["pixels"].shape == (2, 2, 2)
    assert skipped == {"bad_image": 3}
    assert sum(len(b["key"]) for b in _limited([batch(["a"]), batch(["b", "c"])], 0, {})) == 3  # 0: all


def test_the_gathered_shares_are_checked_exactly_once_against_the_manifest():
    """As the evaluation checks its records (msmedcap.eval.evaluate.merge_parts): with no cap, the
    validated samples must be the manifest's 150 of shards/demo/medical-eval-000.tar, none twice."""
    from msmedcap.eval.gather import CoverageError

    v = Validator(cfg(), 2, None, None, None, None)

    def part(keys, loss=1.0):
        return {"records": [{"key": str(k)} for k in keys], "skipped": {},
                "sums": {"loss_lm": [loss * len(keys), len(keys)]}}

    out = v.summarize([part(range(0, 150, 2), 1.0), part(range(1, 150, 2), 2.0)], generate=False)
    assert out["val/samples"] == 150 and out["val/loss"] == out["val/loss_lm"] == pytest.approx(1.5)
    with pytest.raises(CoverageError, match="149 samples evaluated but 150 expected"):
        v.summarize([part(range(0, 150, 2)), part(range(1, 149, 2))], generate=False)
    with pytest.raises(CoverageError, match="evaluated more than once"):
        v.summarize([part(range(0, 150, 2)), part(range(0, 150, 2))], generate=False)

"""Pure decision logic: save policy, mode inference, best ranking, retention keep-sets. No I/O."""

from __future__ import annotations

import math

import pytest
import torch

from ckptman.errors import InvalidMetricError, PolicyConfigError
from ckptman.policy import build_policy, decide, infer_mode, resolve_metrics
from ckptman.policy.best import Metric, coerce_metrics, enters_top_k, rank
from ckptman.policy.retention import KeepBest, KeepEvery, KeepLast, KeepLatest, KeepSteps
from ckptman.policy.save import AnyOf, EveryCall, EveryNEpochs, EveryNSeconds, EveryNSteps, Progress
from ckptman.record import CheckpointRecord


def records(**losses: float) -> list[CheckpointRecord]:
    """records(s10=0.5, s20=0.3) -> checkpoints at steps 10 and 20 with those losses."""
    return [CheckpointRecord(int(k[1:]), k, {"loss": v}) for k, v in losses.items()]


def policy(**overrides: object):
    args = dict(save_interval_steps=None, save_begin=0, keep_last=None, keep_every=None, best=None, mode=None, keep_best=1)
    args.update(overrides)
    return build_policy(**args)  # type: ignore[arg-type]


class TestSavePolicy:
    def test_interval_is_due_at_positive_multiples_from_begin(self) -> None:
        every = EveryNSteps(10, begin=25)
        assert [s for s in range(0, 61) if every.should_save(s)] == [30, 40, 50, 60]

    def test_step_zero_is_never_due_by_interval(self) -> None:
        assert not EveryNSteps(5).should_save(0)
        assert EveryNSteps(5).should_save(5)

    def test_every_call_and_any_of(self) -> None:
        assert EveryCall().should_save(3)
        combined = AnyOf((EveryNSteps(7), EveryNSteps(5)))
        assert [s for s in range(1, 16) if combined.should_save(s)] == [5, 7, 10, 14, 15]

    @pytest.mark.parametrize("interval", [0, -3, 2.5, True, "10", None])
    def test_invalid_interval_is_rejected(self, interval: object) -> None:
        with pytest.raises(PolicyConfigError, match="save_interval_steps"):
            EveryNSteps(interval)  # type: ignore[arg-type]

    def test_epochs_are_due_once_per_interval_of_completed_epochs(self) -> None:
        every2 = EveryNEpochs(2)
        assert [e for e in range(0, 7) if every2.should_save(100, epoch=e)] == [2, 4, 6]
        assert not every2.should_save(100)  # no epoch given: never due by epochs
        assert not every2.should_save(100, epoch=4, saved_epoch=4), "a checkpoint already records epoch 4"
        assert every2.should_save(100, epoch=4, saved_epoch=2)

    def test_seconds_are_due_after_the_interval_since_the_last_save(self) -> None:
        every = EveryNSeconds(30)
        assert not every.should_save(1) and not every.should_save(1, seconds_since_save=29.9)
        assert every.should_save(1, seconds_since_save=30.0)

    def test_triggers_combine_as_a_union(self) -> None:
        pol = policy(save_interval_steps=100, save_interval_epochs=1, save_interval_seconds=60)
        assert isinstance(pol.save, AnyOf)
        assert pol.save.due(Progress(200))
        assert pol.save.due(Progress(7, epoch=1))
        assert pol.save.due(Progress(7, seconds_since_save=61))
        assert not pol.save.due(Progress(7, epoch=1, seconds_since_save=1, saved_epoch=1))
        assert policy(save_interval_epochs=1).save == EveryNEpochs(1), "one trigger set: just that trigger"

    @pytest.mark.parametrize("name, bad", [("save_interval_epochs", v) for v in (0, -1, 1.5, True, "2")]
                             + [("save_interval_seconds", v) for v in (0, -5, True, "60", float("inf"), float("nan"))])
    def test_invalid_trigger_settings_are_rejected(self, name: str, bad: object) -> None:
        with pytest.raises(PolicyConfigError, match=name):
            policy(**{name: bad})

    def test_triggers_are_stored_only_when_set(self) -> None:
        assert "save_interval_epochs" not in policy(save_interval_steps=5).config
        assert policy(save_interval_epochs=2, save_interval_seconds=1.5).config["save_interval_seconds"] == 1.5

    def test_negative_begin_is_rejected(self) -> None:
        with pytest.raises(PolicyConfigError, match="save_begin"):
            policy(save_interval_steps=5, save_begin=-1)


class TestModeInference:
    @pytest.mark.parametrize(
        "name, mode",
        [
            ("loss", "min"),
            ("val/Loss", "min"),
            ("heatmap_loss", "min"),  # contains "map" but is a loss
            ("acc", "max"),
            ("val/ACCURACY", "max"),
            ("top1", "max"),
            ("AR@100", "max"),
            ("auc", "max"),
            ("precision", "max"),
            ("coco/bbox_mAP", "max"),
            ("mDice", "max"),
            ("mIoU", "max"),
            ("mAcc", "max"),
            ("aAcc", "max"),
        ],
    )
    def test_inferred_from_name_case_insensitively(self, name: str, mode: str) -> None:
        assert infer_mode(name) == mode

    def test_unknown_name_without_mode_fails_at_construction(self) -> None:
        with pytest.raises(PolicyConfigError, match="perplexity"):
            resolve_metrics("perplexity", None)
        assert resolve_metrics("perplexity", "min") == (Metric("perplexity", "min"),)

    def test_dict_mode_overrides_and_infers_the_rest(self) -> None:
        assert resolve_metrics(["acc", "loss", "ppl"], {"ppl": "min", "acc": "min"}) == (
            Metric("acc", "min"),
            Metric("loss", "min"),
            Metric("ppl", "min"),
        )

    @pytest.mark.parametrize(
        "best, mode, match",
        [
            (None, "min", "without best"),
            ([], None, "empty"),
            (["acc", "acc"], None, "twice"),
            (["acc", "loss"], "max", "ambiguous"),
            ("acc", {"loss": "min"}, "does not track"),
            ("acc", "biggest", "'min' or 'max'"),
            ("", None, "non-empty"),
        ],
    )
    def test_bad_best_or_mode(self, best: object, mode: object, match: str) -> None:
        with pytest.raises((PolicyConfigError, InvalidMetricError), match=match):
            resolve_metrics(best, mode)  # type: ignore[arg-type]


class TestBestRanking:
    def test_nan_inf_and_missing_never_rank(self) -> None:
        found = [
            CheckpointRecord(1, "a", {"loss": math.nan}),
            CheckpointRecord(2, "b", {"loss": -math.inf}),
            CheckpointRecord(3, "c", {}),
            CheckpointRecord(4, "d", {"loss": 0.5}),
            CheckpointRecord(5, "e", {"loss": math.inf}),
        ]
        assert [r.step for r in rank(found, Metric("loss", "min"))] == [4]
        assert [r.step for r in rank(found, Metric("loss", "max"))] == [4]

    def test_ties_keep_the_earlier_step(self) -> None:
        found = records(s30=0.1, s10=0.1, s20=0.1)
        assert [r.step for r in rank(found, Metric("loss", "min"))] == [10, 20, 30]
        candidate = CheckpointRecord(40, "s40", {"loss": 0.1})
        assert not enters_top_k(found, Metric("loss", "min"), 1, candidate)
        assert enters_top_k(found, Metric("loss", "min"), 4, candidate)

    def test_max_mode_ranks_largest_first(self) -> None:
        found = [CheckpointRecord(s, str(s), {"acc": a}) for s, a in [(1, 0.2), (2, 0.9), (3, 0.5)]]
        assert [r.step for r in rank(found, Metric("acc", "max"))] == [2, 3, 1]

    def test_candidate_enters_top_k_only_when_strictly_better_than_kth(self) -> None:
        found = records(s10=0.5, s20=0.3)
        metric = Metric("loss", "min")
        assert enters_top_k(found, metric, 1, CheckpointRecord(30, "x", {"loss": 0.2}))
        assert not enters_top_k(found, metric, 1, CheckpointRecord(30, "x", {"loss": 0.4}))
        assert enters_top_k(found, metric, 2, CheckpointRecord(30, "x", {"loss": 0.4}))
        assert not enters_top_k(found, metric, 2, CheckpointRecord(30, "x", {"loss": math.nan}))


class TestMetricValues:
    def test_tensors_and_numpy_scalars_are_unwrapped(self) -> None:
        import numpy as np

        assert coerce_metrics({"a": torch.tensor(0.5), "b": np.float32(2.0), "c": 3}) == {"a": 0.5, "b": 2.0, "c": 3.0}

    @pytest.mark.parametrize("value", ["0.5", None, True, torch.ones(2), [1.0], object()])
    def test_non_numbers_are_rejected_with_the_name(self, value: object) -> None:
        with pytest.raises(InvalidMetricError, match="'val/x'"):
            coerce_metrics({"val/x": value})

    def test_nan_is_accepted_and_recorded(self) -> None:
        assert math.isnan(coerce_metrics({"loss": float("nan")})["loss"])

    def test_metrics_must_be_a_mapping_with_string_names(self) -> None:
        with pytest.raises(InvalidMetricError):
            coerce_metrics([("loss", 1.0)])  # type: ignore[arg-type]
        with pytest.raises(InvalidMetricError):
            coerce_metrics({1: 1.0})  # type: ignore[dict-item]


class TestRetention:
    def test_union_of_rules_with_reasons(self) -> None:
        found = records(s10=0.9, s20=0.1, s30=0.5, s40=0.7, s50=0.8, s60=0.6)
        kept = decide(found, [KeepLatest(), KeepLast(2), KeepEvery(30), KeepBest(Metric("loss", "min"), 2)])
        assert kept == {
            20: ("best loss #1",),
            30: ("every 30", "best loss #2"),
            50: ("last 2",),
            60: ("latest", "last 2", "every 30"),
        }

    def test_latest_is_kept_even_when_other_rules_would_drop_it(self) -> None:
        found = records(s1=0.1, s2=0.2, s3=0.3)
        assert set(decide(found, [KeepLatest(), KeepBest(Metric("loss", "min"), 1)])) == {1, 3}

    def test_best_per_metric_for_several_metrics(self) -> None:
        found = [
            CheckpointRecord(1, "a", {"acc": 0.9, "loss": 0.9}),
            CheckpointRecord(2, "b", {"acc": 0.1, "loss": 0.1}),
            CheckpointRecord(3, "c", {"acc": 0.5, "loss": 0.5}),
            CheckpointRecord(4, "d", {}),
        ]
        pol = policy(best=["acc", "loss"], keep_last=1)
        assert pol.retain(found) == {1: ("best acc #1",), 2: ("best loss #1",), 4: ("latest", "last 1")}

    def test_pinned_steps_are_kept(self) -> None:
        found = records(s1=0.1, s2=0.2, s3=0.3)
        assert decide(found, [KeepLast(1), KeepSteps(frozenset({1}), "resumed from")]) == {
            1: ("resumed from",),
            3: ("last 1",),
        }

    def test_keep_last_none_keeps_everything(self) -> None:
        found = records(s1=0.1, s2=0.2, s3=0.3)
        assert set(policy().retain(found)) == {1, 2, 3}

    def test_empty_history_keeps_nothing(self) -> None:
        assert policy(keep_last=2).retain([]) == {}

    @pytest.mark.parametrize(
        "overrides, match",
        [
            ({"keep_last": 0}, "keep_last"),
            ({"keep_last": 1.5}, "keep_last"),
            ({"keep_every": 0}, "keep_every"),
            ({"keep_best": 0, "best": "loss"}, "keep_best"),
            ({"keep_last": True}, "keep_last"),
        ],
    )
    def test_invalid_numbers(self, overrides: dict[str, object], match: str) -> None:
        with pytest.raises(PolicyConfigError, match=match):
            policy(**overrides)


class TestPolicyDecisions:
    def test_save_when_due_or_new_best(self) -> None:
        pol = policy(save_interval_steps=100, best="val/loss")
        history = [CheckpointRecord(100, "a", {"val/loss": 0.5})]
        assert pol.wants(history, CheckpointRecord(200, "b", {}))
        assert pol.wants(history, CheckpointRecord(150, "b", {"val/loss": 0.4}))
        assert not pol.wants(history, CheckpointRecord(150, "b", {"val/loss": 0.6}))
        assert not pol.wants(history, CheckpointRecord(150, "b", {"other": 0.1}))

    def test_best_lookup_by_name(self) -> None:
        pol = policy(best=["acc", "loss"])
        found = [CheckpointRecord(1, "a", {"acc": 0.5, "loss": 0.1}), CheckpointRecord(2, "b", {"acc": 0.9, "loss": 0.2})]
        assert pol.best(found).step == 2  # type: ignore[union-attr]
        assert pol.best(found, "loss").step == 1  # type: ignore[union-attr]
        with pytest.raises(PolicyConfigError, match="not tracked"):
            pol.best(found, "f1")
        with pytest.raises(PolicyConfigError, match="no metric is tracked"):
            policy().best(found)

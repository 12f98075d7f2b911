"""``einfuse autotune --workers N``: N processes share one study on a real PostgreSQL server."""

from __future__ import annotations

from optuna.trial import TrialState

from einfuse.autotune.shares import claimed_elsewhere, dealt
from einfuse.autotune.store import TuningStore
from einfuse.cli.autotune import main as cli
from tests.test_autotune_store import small_attention, tune_model


def test_four_workers_share_the_screening_and_one_best_is_stored(tmp_path, pg_url, capsys):
    spec = tmp_path / "attention.ein"
    spec.write_text(str(small_attention(256)))
    args = [str(spec), "--objective", "model", "--no-calibrate", "--quiet", "--storage", pg_url]
    assert cli([*args, "--workers", "4"]) == 0
    assert "tuned" in capsys.readouterr().out
    alone = tune_model(small_attention(256), "memory")
    store = TuningStore(pg_url)
    (row,) = store.studies()
    study = store.find_study(row["study"])
    # every point scored exactly once, by one of the four; each kept all of its share
    assert study.user_attrs["evaluated"] == alone.space_size == 46
    shares = [study.user_attrs[f"evaluated_{i}_of_4"] for i in range(4)]
    assert shares == [12, 12, 11, 11]
    points = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(points) == len(set(points)) == 46
    assert {t.state for t in study.trials} == {TrialState.COMPLETE}
    assert len({t.user_attrs["worker"] for t in study.trials}) == 4
    best = row["best"]  # the same choice one process makes alone
    assert (best["pipeline"], best["params"]) == (alone.pipeline, alone.params)
    assert best["predicted_s"] == alone.predicted_s


def test_a_candidate_another_worker_is_measuring_is_not_claimed_twice(pg_url):
    study = TuningStore(pg_url).study("claims")
    first, second, third = study.ask(), study.ask(), study.ask()
    assert claimed_elsewhere(study, second, "fuse{tile=64}|") is None
    assert claimed_elsewhere(study, third, "fuse{tile=64}|").number == second.number
    assert claimed_elsewhere(study, first, "|") is None
    study.tell(second, 1.0)  # measured: a later ask of it is a duplicate of that trial
    assert claimed_elsewhere(study, study.ask(), "fuse{tile=64}|").number == second.number
    study.tell(first, state=TrialState.FAIL)  # its worker died (no reason): measure it again
    assert claimed_elsewhere(study, study.ask(), "|") is None
    assert dealt(list(range(7)), (1, 3)) == [1, 4] and dealt([1, 2], None) == [1, 2]


def test_workers_need_a_store_they_can_share(tmp_path, capsys):
    spec = tmp_path / "attention.ein"
    spec.write_text(str(small_attention(64)))
    assert cli([str(spec), "--workers", "2", "--storage", "memory"]) == 2
    assert "cannot be shared" in capsys.readouterr().err
    assert cli([str(spec), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err

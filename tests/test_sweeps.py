"""Sweeps: specs checked before anything is queued, trials as jobs, trial numbers made once even
when workers race, early stopping by the workers (ASHA, median), a sweep outliving a killed
worker, and the client's views (status, compare, sweep best, cancel)."""

from __future__ import annotations

import contextlib
import json
import threading

import pytest
import yaml

from cherry_train import sweepspace
from cherry_train.cli import main
from cherry_train.jobqueue.claims import WorkerIdentity
from cherry_train.jobqueue.clock import FakeClock
from cherry_train.jobqueue.layout import JobPaths, SweepPaths
from cherry_train.jobqueue.lifecycle import JobQueue
from cherry_train.jobqueue.sweeps import ORPHAN_SECONDS, Sweeps
from cherry_train.jobqueue.views import job_view
from cherry_train.schemas import (
    ConfigError,
    JobState,
    Result,
    TrialRecord,
    validate_config,
)
from cherry_train.storage import LocalStorage
from cherry_train.worker.loop import Worker, WorkerOptions
from cherry_train.worker.training.train import Seams, Training


def sweep_config(tiny_config, **sweep) -> dict:
    return {**tiny_config, "sweep": {"parameters": {
        "training.learning_rate": {"values": [0.003, 0.001]},
        "training.weight_decay": {"values": [0, 0.01]}}, **sweep}}


def asha_sweep(tiny_config, learning_rates: list[float]):
    """Nine epochs, two trials at a time, ASHA with its first rung after epoch 1, halving."""
    return validate_config({**tiny_config, "training": {**tiny_config["training"], "epochs": 9},
                            "sweep": {"parallel": 2, "parameters": {
                                "training.learning_rate": {"values": learning_rates}},
                                "early_stop": {"method": "asha", "grace_epochs": 1,
                                               "reduction": 2}}})


# -- the space -----------------------------------------------------------------------------------

def test_every_combination_of_a_shortened_shuffled_grid_is_validated(tiny_config):
    """With `trials` below the combinations and early stopping, the trials made are a seeded
    sample; a value that cannot run is refused even where the sample leaves it out (seed 2
    makes trials 4 and 1 here: combination 3 holds batch_size 0)."""
    config = validate_config({**tiny_config, "seed": 2, "sweep": {
        "trials": 2, "early_stop": {"method": "asha"},
        "parameters": {"training.batch_size": {"values": [8, 16, 0, 32]}}}})
    assert 3 not in sweepspace.run_order(config.sweep, config.seed)
    with pytest.raises(ConfigError, match=r"sweep trial 3 \(training.batch_size=0\)"):
        sweepspace.check_space(config)



def test_a_grid_makes_every_combination_and_random_draws_are_the_same_everywhere(tiny_config):
    config = validate_config(sweep_config(tiny_config))
    assert sweepspace.total_trials(config.sweep) == 4
    assert sweepspace.grid_points(config.sweep)[1] == {"training.learning_rate": 0.003,
                                                       "training.weight_decay": 0.01}
    # With early stopping the grid runs in a seeded shuffle, the same on every worker; trial n
    # is still the n-th combination as written.
    stopping = validate_config(sweep_config(tiny_config, early_stop={"method": "asha"})).sweep
    order = [sweepspace.run_order(stopping, seed=7) for _ in range(2)]
    assert order[0] == order[1] != [1, 2, 3, 4] and sorted(order[0]) == [1, 2, 3, 4]
    assert sweepspace.run_order(config.sweep, seed=7) == [1, 2, 3, 4]
    assert sweepspace.grid_points(stopping) == sweepspace.grid_points(config.sweep)
    random_spec = validate_config({**tiny_config, "sweep": {
        "method": "random", "trials": 5, "parameters": {
            "training.learning_rate": {"min": 1e-5, "max": 1e-2, "log": True},
            "training.batch_size": {"min": 8, "max": 32, "integer": True}}}}).sweep
    draws = [sweepspace.random_point(random_spec, 3, n) for n in range(1, 6)]
    assert draws == [sweepspace.random_point(random_spec, 3, n) for n in range(1, 6)]
    assert len({d["training.learning_rate"] for d in draws}) == 5
    assert all(1e-5 <= d["training.learning_rate"] <= 1e-2 for d in draws)
    assert all(isinstance(d["training.batch_size"], int) for d in draws)
    trial = sweepspace.trial_config(validate_config(sweep_config(tiny_config)), draws[0], 2)
    assert trial.name == "tiny-t2" and trial.sweep is None
    assert trial.training.learning_rate == draws[0]["training.learning_rate"]


@pytest.mark.parametrize(("sweep", "says"), [
    ({"parameters": {"training.learning_rate": {"min": 1e-4, "max": 1e-2}}},
     "grid needs values"),
    ({"method": "random", "parameters": {"training.learning_rate": {"values": [1e-3]}}},
     "sweep.trials: required for method: random"),
    ({"parameters": {"training.learning_rate": {"values": [1e-3], "min": 1}}},
     "exactly one of"),
    ({"parameters": {"training.learning_rate": {"min": 0, "max": 1, "log": True}},
      "method": "tpe", "trials": 3}, "a log range needs min > 0"),
    ({"parameters": {"name": {"values": ["a", "b"]}}}, "cannot be swept"),
])
def test_bad_sweep_specs_say_what_is_wrong(tiny_config, sweep, says):
    with pytest.raises(ConfigError) as e:
        validate_config({**tiny_config, "sweep": sweep})
    assert says in str(e.value)


def test_a_bad_trial_names_its_trial_and_field_and_nothing_is_queued(root_with_data,
                                                                     tiny_config, capsys):
    cfg = {**tiny_config, "sweep": {"parameters": {
        "training.learning_rate": {"values": [0.003, -1.0]},
        "training.learnig_rate": {"values": [1]}}}}
    path = root_with_data / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["submit", str(path), "--root", str(root_with_data), "--no-preflight"]) == 2
    err = capsys.readouterr().err
    assert "sweep trial 2 (training.learning_rate=-1.0, training.learnig_rate=1): " \
           "training.learning_rate:" in err
    assert "sweep (every trial): training.learnig_rate: unknown key; did you mean " \
           "'learning_rate'?" in err
    assert not (root_with_data / "queue").exists() or not list((root_with_data / "queue").iterdir())
    assert not (root_with_data / "sweeps").exists()


@pytest.mark.parametrize("preflight", [False, True])
def test_every_swept_model_name_is_checked_before_anything_is_queued(root_with_data, tiny_config,
                                                                     capsys, preflight):
    """Only trial 1's model was checked: resnet500 in trial 2 was queued (issue 25, item 8)."""
    cfg = {**tiny_config, "sweep": {"parameters": {
        "model.name": {"values": [tiny_config["model"]["name"], "resnet500"]}}}}
    path = root_with_data / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    args = ["submit", str(path), "--root", str(root_with_data)]
    assert main(args + ([] if preflight else ["--no-preflight"])) == 2
    err = capsys.readouterr().err
    assert "model.name: 'resnet500' is not a torchvision classification model" in err
    assert "Traceback" not in err
    assert not (root_with_data / "queue").exists() or not list((root_with_data / "queue").iterdir())
    assert not (root_with_data / "sweeps").exists()


def test_random_and_tpe_sweeps_check_every_listed_value_and_both_ends_of_each_range(tiny_config):
    """A random sweep's draws may miss a value (one trial here): every choice and both ends of
    every range are validated all the same, and named with their field."""
    for method in ("random", "tpe"):
        config = validate_config({**tiny_config, "sweep": {"method": method, "trials": 1,
                                                           "parameters": {
            "training.batch_size": {"min": 0, "max": 16, "integer": True},
            "training.optimizer": {"choices": ["adam", "rmsprop"]}}}})
        with pytest.raises(ConfigError) as e:
            sweepspace.check_space(config)
        said = e.value.problems
        assert any("training.batch_size=0" in line and ": training.batch_size:" in line
                   for line in said), said
        assert any(line.startswith("sweep value training.optimizer='rmsprop': training."
                                   "optimizer: 'rmsprop' is not allowed") for line in said), said
    good = validate_config({**tiny_config, "sweep": {"method": "random", "trials": 2,
                                                     "parameters": {
        "training.batch_size": {"min": 4, "max": 16, "integer": True},
        "model.name": {"choices": ["resnet18", "mobilenet_v3_small"]}}}})
    names = {c.model.name for c in sweepspace.check_space(good)}
    assert names == {"resnet18", "mobilenet_v3_small"}


def test_sweep_flags_make_a_grid(root_with_data, tiny_config, capsys):
    path = root_with_data / "base.yaml"
    path.write_text(yaml.safe_dump(tiny_config))
    assert main(["submit", str(path), "--root", str(root_with_data), "--no-preflight",
                 "--sweep", "training.learning_rate=1e-3,3e-4",
                 "--sweep", "training.optimizer=sgd,adam"]) == 0
    out = capsys.readouterr().out
    assert "grid, 4 trials, 4 at once" in out and "training.optimizer=sgd" in out
    assert len(list((root_with_data / "queue").iterdir())) == 4
    assert main(["submit", str(path), "--root", str(root_with_data), "--sweep",
                 "training.learning_rate"]) == 2
    assert "--sweep: expected PATH=V1,V2" in capsys.readouterr().err


# -- the rules -----------------------------------------------------------------------------------

def test_asha_promotes_the_top_share_pauses_the_rest_and_prunes_once_the_rung_is_complete():
    assert sweepspace.rungs(1, 3, 9) == [1, 3] and sweepspace.rungs(2, 2, 20) == [2, 4, 8, 16]
    verdict = sweepspace.asha_verdict
    assert verdict(0.5, [], 3, True, complete=False) == ("pause", None)  # first: nothing to beat
    assert verdict(0.5, [], 3, True, complete=True) == ("go", 0.5)  # the best always goes on
    assert verdict(0.9, [0.7, 0.6], 3, True, complete=False) == ("go", 0.9)
    assert verdict(0.6, [0.7, 0.9], 3, True, complete=False) == ("pause", 0.9)
    assert verdict(0.6, [0.7, 0.9], 3, True, complete=True) == ("prune", 0.9)
    # the best of three, but one of the others went on already: the rung's one place is spent
    # until more trials arrive, or until the rung is complete
    assert verdict(0.9, [0.8, 0.7], 3, True, complete=False, promoted=1) == ("pause", 0.9)
    assert verdict(0.9, [0.8, 0.7], 3, True, complete=True, promoted=1) == ("go", 0.9)
    # six at the rung, reduction 3: the top two go on
    assert verdict(0.8, [0.9, 0.85, 0.1, 0.2, 0.3], 3, True, complete=False) == ("pause", 0.85)
    assert verdict(0.2, [0.9, 0.5], 2, maximize=False, complete=False) == ("go", 0.2)  # a loss
    # a rung compares each trial's best so far, not one noisy epoch
    assert sweepspace.best_until({1: 0.5, 2: 0.4, 3: 0.7}, 2, maximize=True) == 0.5
    assert sweepspace.best_until({1: 0.5, 2: 0.4}, 2, maximize=False) == 0.4
    assert sweepspace.best_until({1: 0.5}, 2, maximize=True) is None  # not there yet
    assert sweepspace.median_stops(0.5, [0.6, 0.7, 0.4], maximize=True) == (True, 0.6)
    assert sweepspace.median_stops(0.3, [0.6, 0.7, 0.4], maximize=False)[0] is False


# -- trials on the queue -------------------------------------------------------------------------

def finish(queue: JobQueue, job_id: str, state=JobState.succeeded) -> None:
    manifest = queue.manifest(job_id)
    claim = queue.try_claim(manifest, WorkerIdentity("w"))
    queue.commit(queue.owner(claim), Result(job_id=job_id, state=state, attempts=1,
                                            finished_at=queue.clock.now()))


def test_a_shuffled_grid_numbers_its_trials_in_written_order(tmp_path, tiny_config, capsys):
    """Trial n is the n-th combination as the values are written, whatever order early
    stopping runs them in; a grid cut short by `trials` runs the first of that order."""
    cfg = sweep_config(tiny_config, parallel=4, early_stop={"method": "asha"})
    cfg["sweep"]["parameters"]["training.learning_rate"]["values"] = [0.003, 0.001, 0.0003]
    config = validate_config(cfg)
    queue = JobQueue(LocalStorage(tmp_path))
    record, first = Sweeps(queue).submit(config)
    grid = sweepspace.grid_points(config.sweep)
    assert grid[0] == {"training.learning_rate": 0.003, "training.weight_decay": 0}
    order = sweepspace.run_order(config.sweep, config.seed)
    assert [m.sweep.trial for m in first] == order[:4] != [1, 2, 3, 4]
    for m in first:
        assert m.sweep.params == grid[m.sweep.trial - 1]
        assert m.config.name == f"tiny-t{m.sweep.trial}"
    for m in first:  # the rest as trials end, in the same order
        finish(queue, m.job_id)
        Sweeps(queue).top_up(record.sweep_id)
    trials = Sweeps(queue).trials(record.sweep_id)
    assert [t.record.n for t in trials] == [1, 2, 3, 4, 5, 6]
    assert all(t.record.params == grid[t.record.n - 1] for t in trials)
    cut = validate_config({**cfg, "sweep": {**cfg["sweep"], "trials": 3}})
    _, made = Sweeps(queue).submit(cut)
    assert [m.sweep.trial for m in made] == sweepspace.run_order(cut.sweep, cut.seed) == order[:3]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["submit", str(path), "--root", str(tmp_path), "--no-preflight"]) == 0
    assert "trial n is the n-th combination as the values are written" in capsys.readouterr().out


def test_an_unreadable_trial_file_is_passed_over_not_waited_on(tmp_path, tiny_config):
    queue = JobQueue(LocalStorage(tmp_path))
    record, _ = Sweeps(queue).submit(validate_config(sweep_config(tiny_config, parallel=1)))
    queue.storage.create_exclusive(SweepPaths(record.sweep_id).trial(2), b"{not a record")
    finish(queue, Sweeps(queue).trials(record.sweep_id)[0].record.job_id)
    queued = []
    topping = threading.Thread(target=lambda: queued.extend(Sweeps(queue).top_up(
        record.sweep_id)), daemon=True)  # it once spun forever on trial 2
    topping.start()
    topping.join(timeout=30)
    assert not topping.is_alive() and [m.sweep.trial for m in queued] == [3]


def test_racing_workers_make_each_trial_once(tmp_path, tiny_config):
    """Two workers top the sweep up at the same moment, every time: each trial number is made
    once, each trial's job queued once, and never more than `parallel` in flight."""
    barrier = threading.Barrier(2, timeout=2)

    class Racing(LocalStorage):
        def create_exclusive(self, path, data):
            if "/trials/" in path:
                # Both try the same trial number together (unless the other stopped making
                # trials: then the barrier breaks, and this one goes on alone).
                with contextlib.suppress(threading.BrokenBarrierError):
                    barrier.wait()
            return super().create_exclusive(path, data)

    client = JobQueue(LocalStorage(tmp_path))
    record, first = Sweeps(client).submit(validate_config(sweep_config(tiny_config, parallel=2)))
    assert [m.sweep.trial for m in first] == [1, 2]
    workers = [Sweeps(JobQueue(Racing(tmp_path))) for _ in range(2)]
    for job_id in [m.job_id for m in first]:
        finish(client, job_id)
        barrier.reset()
        threads = [threading.Thread(target=w.top_up, args=(record.sweep_id,)) for w in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    trials = Sweeps(client).trials(record.sweep_id)
    assert [t.record.n for t in trials] == [1, 2, 3, 4]
    assert len({t.record.job_id for t in trials}) == 4
    assert sorted(p.name for p in (tmp_path / "queue").iterdir()) == \
        sorted(f"{t.record.job_id}.json" for t in trials if t.in_flight)
    assert sum(t.in_flight for t in trials) == 2


def test_a_trial_whose_creator_died_before_queueing_it_is_queued_by_the_next(tmp_path,
                                                                              tiny_config):
    clock = FakeClock()
    queue = JobQueue(LocalStorage(tmp_path), clock)
    record, _ = Sweeps(queue).submit(validate_config(sweep_config(tiny_config, parallel=1)))
    orphan = TrialRecord(sweep_id=record.sweep_id, n=2, job_id="20261126-100000-tiny-t2-dead",
                         params={"training.learning_rate": 0.003,
                                 "training.weight_decay": 0.01}, created_at=clock.now())
    queue.storage.create_exclusive(SweepPaths(record.sweep_id).trial(2), orphan.to_json())
    assert Sweeps(queue).top_up(record.sweep_id) == []  # its creator may still be writing
    clock.advance(ORPHAN_SECONDS + 1)
    queued = Sweeps(queue).top_up(record.sweep_id)
    assert [m.job_id for m in queued] == [orphan.job_id]
    assert queued[0].config.training.weight_decay == 0.01 and queued[0].sweep.trial == 2


def test_tpe_asks_optuna_from_the_trials_so_far(tmp_path, tiny_config):
    pytest.importorskip("optuna")
    queue = JobQueue(LocalStorage(tmp_path))
    cfg = {**tiny_config, "sweep": {"method": "tpe", "trials": 4, "parallel": 1, "parameters": {
        "training.learning_rate": {"min": 1e-4, "max": 1e-2, "log": True}}}}
    record, (first,) = Sweeps(queue).submit(validate_config(cfg))
    for _ in range(3):
        job_id = Sweeps(queue).trials(record.sweep_id)[-1].record.job_id
        finish(queue, job_id)
        Sweeps(queue).top_up(record.sweep_id)
    trials = Sweeps(queue).trials(record.sweep_id)
    assert [t.record.n for t in trials] == [1, 2, 3, 4]
    rates = [t.record.params["training.learning_rate"] for t in trials]
    assert all(1e-4 <= r <= 1e-2 for r in rates) and len(set(rates)) == 4


# -- early stopping, end to end ------------------------------------------------------------------

def accuracy_by_learning_rate(job):
    """Validation that says how good a trial is from its learning rate alone: deterministic
    figures for the rule, on a real worker, a real trainer and real files."""
    lr = job.cfg.training.learning_rate
    return 0.5, {0.003: 0.9, 0.001: 0.6, 0.0003: 0.7}[lr] + 0.01 * job.state.epoch  # 0-based


def test_workers_prune_the_trials_behind_and_the_client_shows_the_sweep(root_with_data,
                                                                        tiny_config, capsys):
    tiny_config["training"]["epochs"] = 3
    cfg = {**tiny_config, "sweep": {"parallel": 1, "parameters": {
        "training.learning_rate": {"values": [0.003, 0.001, 0.0003]}},
        "early_stop": {"method": "asha", "grace_epochs": 1, "reduction": 2}}}
    queue = JobQueue(LocalStorage(root_with_data))
    record, _ = Sweeps(queue).submit(validate_config(cfg))
    worker = Worker(queue, WorkerIdentity("w1"), WorkerOptions(exit_when_idle=True),
                    trainer=Training(Seams(validate=accuracy_by_learning_rate)))
    worker.run()
    trials = Sweeps(queue).trials(record.sweep_id, values=True)
    assert [t.state for t in trials] == [JobState.succeeded, JobState.pruned, JobState.pruned]
    # Trial 1 paused at rung 1 (first there) and at rung 2 (trial 2 still paused below it),
    # promoted each time; trial 2 paused until trial 3 completed rung 1, then was pruned.
    attempts = [Result.from_json(queue.storage.read_bytes(JobPaths(t.record.job_id).result))
                .attempts for t in trials]
    assert attempts == [3, 2, 1]
    pruned = trials[1]
    result = Result.from_json(queue.storage.read_bytes(JobPaths(pruned.record.job_id).result))
    assert result.pruned["epoch"] == 1 and result.pruned["cutoff"] == pytest.approx(0.9)
    assert result.pruned["value"] == pytest.approx(0.6) and result.epochs_completed == 1
    job_dir = root_with_data / "done" / pruned.record.job_id
    assert (job_dir / "best.pt").exists() and (job_dir / "curves.png").exists()
    assert not (job_dir / "final.pt").exists() and not list((job_dir / "checkpoints").glob("*.pt"))
    assert trials[0].values == pytest.approx({1: 0.9, 2: 0.91, 3: 0.92})

    assert main(["status", "--root", str(root_with_data)]) == 0
    out = capsys.readouterr().out
    assert "grid, 3 trials: 2 pruned, 1 succeeded; best val_accuracy 0.9200 (trial 1: " \
           "training.learning_rate=0.003)" in out
    assert main(["compare", f"sweep:{record.sweep_id[-6:]}", "--root", str(root_with_data),
                 "--json", "--out", str(root_with_data / "sweep.png")]) == 0
    ranked = json.loads(capsys.readouterr().out.split("\nhyperparameters")[0])["trials"]
    assert [(r["trial"], r["state"]) for r in ranked] == [(1, "succeeded"), (2, "pruned"),
                                                          (3, "pruned")] or \
        [(r["trial"], r["state"]) for r in ranked] == [(1, "succeeded"), (3, "pruned"),
                                                       (2, "pruned")]
    assert (root_with_data / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["sweep", "best", record.sweep_id, "--root", str(root_with_data)]) == 0
    best = yaml.safe_load(capsys.readouterr().out)
    assert best["training"]["learning_rate"] == 0.003 and "sweep" not in best
    assert validate_config(best).name == "tiny-best"


@pytest.mark.parametrize("metric", ["val_accuracy", "val_loss"])
def test_compare_of_a_sweep_shows_each_figure_once(tmp_path, tiny_config, capsys, metric):
    """The ranking figure is best_val_accuracy itself (one column), or for val_loss the lowest
    of any epoch (beside best_val_loss, the loss at the most accurate epoch)."""
    queue = JobQueue(LocalStorage(tmp_path))
    _, made = Sweeps(queue).submit(validate_config(sweep_config(tiny_config, metric=metric)))
    for m, (acc, loss) in zip(made, [(0.9, 0.2), (0.8, 0.3), (0.7, 0.4), (0.6, 0.5)],
                              strict=True):
        claim = queue.try_claim(m, WorkerIdentity("w"))
        epochs = [{"kind": "epoch", "epoch": 1, "val_accuracy": acc, "val_loss": loss / 2},
                  {"kind": "epoch", "epoch": 2, "val_accuracy": acc + 0.05, "val_loss": loss}]
        queue.owner(claim).write(claim.paths.metrics,
                                 "".join(json.dumps(e) + "\n" for e in epochs).encode())
        queue.commit(queue.owner(claim), Result(
            job_id=m.job_id, state=JobState.succeeded, attempts=1, epochs_completed=2,
            finished_at=queue.clock.now(), final_metrics={"val_accuracy": acc + 0.05},
            best={"epoch": 2, "val_accuracy": acc + 0.05, "val_loss": loss}))
    capsys.readouterr()
    assert main(["compare", "sweep:" + made[0].sweep.id, "--root", str(tmp_path),
                 "--out", str(tmp_path / "s.png")]) == 0
    header, best = capsys.readouterr().out.splitlines()[1:3]
    columns = header.split()
    assert "val_accuracy" not in columns and columns.count("best_val_accuracy") == 1
    cells = dict(zip(columns, best.split(), strict=True))
    if metric == "val_accuracy":
        assert cells["best_val_accuracy"] == "0.95" and "lowest_val_loss" not in columns
    else:  # ranked by the lowest loss of any epoch: epoch 1's, not the best epoch's
        assert cells["lowest_val_loss"] == "0.1" and cells["best_val_loss"] == "0.2"


def test_cancelling_a_sweep_stops_its_trials_and_makes_no_more(tmp_path, tiny_config, capsys):
    queue = JobQueue(LocalStorage(tmp_path))
    record, first = Sweeps(queue).submit(validate_config(sweep_config(tiny_config, parallel=2)))
    assert main(["cancel", f"sweep:{record.sweep_id}", "--root", str(tmp_path)]) == 0
    assert "2 trial(s) asked to stop" in capsys.readouterr().out
    # The next worker to meet a cancelled trial ends it: not started, no successor made.
    assert queue.try_claim(queue.manifest(first[0].job_id), WorkerIdentity("w")) is None
    assert job_view(queue, first[0].job_id).state == JobState.cancelled
    assert Sweeps(queue).top_up(record.sweep_id) == []
    assert len(Sweeps(queue).trials(record.sweep_id)) == 2


@pytest.mark.slow
def test_a_sweep_outlives_a_killed_worker(tmp_path, cherry_images, tiny_config):
    """SIGKILL while trial 2 trains: a fresh worker resumes it, then makes and runs trial 3;
    every trial number is made once, and the sweep ends whole."""
    from tests.test_crash import heartbeat, killed_then_restarted, make_root

    root = make_root(tmp_path, cherry_images, "root")
    cfg = {**tiny_config, "lease_seconds": 3, "heartbeat_seconds": 0.2, "sweep": {
        "parallel": 1, "parameters": {"training.learning_rate": {"values": [3e-3, 1e-3, 3e-4]}}}}
    queue = JobQueue(LocalStorage(root))
    record, _ = Sweeps(queue).submit(validate_config(cfg))

    def second_trial_training():
        trials = Sweeps(queue).trials(record.sweep_id)
        if len(trials) < 2:
            return None
        hb = heartbeat(root, trials[1].record.job_id)
        return hb is not None and hb.trained and hb.step >= 2

    # The notebook started again: same worker id, its killed predecessor's job taken back.
    second = killed_then_restarted(root, tmp_path / "journal", second_trial_training,
                                   "trial 2 to train")
    assert second.wait(timeout=150) == 0
    trials = Sweeps(queue).trials(record.sweep_id)
    assert [t.record.n for t in trials] == [1, 2, 3]
    assert [t.state for t in trials] == [JobState.succeeded] * 3
    resumed = Result.from_json(queue.storage.read_bytes(JobPaths(trials[1].record.job_id).result))
    assert resumed.attempts == 2 and resumed.attempt_history[1].reason == "same-worker"


def test_a_paused_trial_is_claimed_once_promoted_or_once_its_rung_is_complete(tmp_path,
                                                                              tiny_config,
                                                                              capsys):
    """ASHA with reduction 2 over five trials, at the rung after epoch 1: the first trial
    pauses (nothing to beat) and frees its place for a new trial; it waits in queue/ unclaimed,
    is promoted when the fourth arrival moves the cut past it, and the worst ones are claimed
    (to be pruned) once all five reached the rung."""
    from cherry_train.schemas import Heartbeat, Phase
    from cherry_train.worker.training.pruning import GO, PAUSE, PRUNE, Promotions, judge

    queue = JobQueue(LocalStorage(tmp_path))
    record, (first, second) = Sweeps(queue).submit(asha_sweep(
        tiny_config, [0.005, 0.003, 0.002, 0.001, 0.0005]))
    trials = {}

    def reaches_rung(manifest, accuracy, worker):
        claim = queue.try_claim(manifest, WorkerIdentity(worker))
        queue.owner(claim).write(claim.paths.metrics, json.dumps(
            {"kind": "epoch", "epoch": 1, "val_accuracy": accuracy}).encode() + b"\n")
        trials[accuracy] = claim
        return judge(queue, manifest, 1)

    def pause(accuracy):
        claim = trials[accuracy]
        queue.release(queue.owner(claim), Heartbeat(
            job_id=claim.job_id, attempt=claim.attempt.n, worker_id=claim.attempt.worker_id,
            at=queue.clock.now(), phase=Phase.paused, released=True))

    def claimable(accuracy):
        promotions = Promotions(queue, recheck_seconds=30)
        return queue.try_claim(trials[accuracy].manifest, WorkerIdentity("w9"),
                               ready=promotions.ready) is not None

    verdict, figures = reaches_rung(first, 0.8, "w1")
    assert verdict == PAUSE and figures["cutoff"] is None and figures["trials_compared"] == 1
    pause(0.8)
    (third,) = Sweeps(queue).top_up(record.sweep_id)  # a paused trial holds no worker
    words = {t.record.job_id: t.word for t in Sweeps(queue).trials(record.sweep_id)}
    assert [words[m.job_id] for m in (first, second, third)] == ["paused", "queued", "queued"]
    assert main(["status", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "paused at a rung" in out and "handed back" not in out
    assert "grid, 5 trials: 1 paused, 2 queued, 2 to come" in out
    promotions = Promotions(queue, recheck_seconds=30)
    assert queue.try_claim(first, WorkerIdentity("w2"), ready=promotions.ready) is None
    assert promotions.waiting(first.job_id)  # the next poll costs no read
    assert reaches_rung(second, 0.9, "w2")[0] == GO  # the best of two
    assert reaches_rung(third, 0.5, "w2")[0] == PAUSE
    pause(0.5)
    assert not claimable(0.8)  # the top one of three: not it
    (fourth,) = Sweeps(queue).top_up(record.sweep_id)
    assert reaches_rung(fourth, 0.6, "w2")[0] == PAUSE
    pause(0.6)
    (fifth,) = Sweeps(queue).top_up(record.sweep_id)
    assert claimable(0.8)  # the top two of four: promoted, before the rung is complete
    assert not claimable(0.5)
    verdict, figures = reaches_rung(fifth, 0.3, "w2")
    assert verdict == PRUNE and figures["rung_complete"] and figures["cutoff"] == 0.8
    assert claimable(0.5) and claimable(0.6)  # complete: claimed to be pruned


def test_a_trial_promoted_but_not_yet_past_the_rung_holds_its_place(tmp_path, tiny_config):
    """ASHA with reduction 2: of three trials at a rung one goes on. The second went on when it
    led two; it now trains toward the next rung, with no later epoch in its metrics yet. The
    third, better than both, pauses: the rung's one place is taken until more trials arrive."""
    from cherry_train.schemas import Heartbeat, Phase
    from cherry_train.worker.training.pruning import GO, PAUSE, judge

    queue = JobQueue(LocalStorage(tmp_path))
    record, (first, second) = Sweeps(queue).submit(asha_sweep(
        tiny_config, [0.005, 0.003, 0.002, 0.001, 0.0005]))

    def reaches_rung(manifest, accuracy):
        claim = queue.try_claim(manifest, WorkerIdentity(f"w{accuracy}"))
        queue.owner(claim).write(claim.paths.metrics, json.dumps(
            {"kind": "epoch", "epoch": 1, "val_accuracy": accuracy}).encode() + b"\n")
        return claim, judge(queue, manifest, 1)

    claim, (verdict, _) = reaches_rung(first, 0.5)
    assert verdict == PAUSE  # alone at the rung: nothing to beat
    queue.release(queue.owner(claim), Heartbeat(
        job_id=claim.job_id, attempt=claim.attempt.n, worker_id=claim.attempt.worker_id,
        at=queue.clock.now(), phase=Phase.paused, released=True))
    assert reaches_rung(second, 0.6)[1][0] == GO  # top one of two; still training, epoch 1
    (third,) = Sweeps(queue).top_up(record.sweep_id)
    verdict, figures = reaches_rung(third, 0.9)[1]
    assert (verdict, figures["promoted_before"], figures["rung_complete"]) == (PAUSE, 1, False)


def test_at_a_rung_equal_accuracies_are_told_apart_by_the_loss(tmp_path, tiny_config):
    """Early on trials share chance-level accuracy: the lower validation loss ranks first."""
    from cherry_train.worker.training.pruning import GO, PRUNE, judge

    queue = JobQueue(LocalStorage(tmp_path))
    _, trials = Sweeps(queue).submit(asha_sweep(tiny_config, [0.003, 0.001]))
    for manifest, loss in zip(trials, (0.9, 0.6), strict=True):
        claim = queue.try_claim(manifest, WorkerIdentity("w"))
        queue.owner(claim).write(claim.paths.metrics, json.dumps(
            {"kind": "epoch", "epoch": 1, "val_accuracy": 0.5, "val_loss": loss}).encode())
    # both trials at the rung, which is complete: the one with the higher loss stops
    assert judge(queue, trials[0], 1)[0] == PRUNE and judge(queue, trials[1], 1)[0] == GO


def test_an_unreadable_sweep_record_leaves_status_and_the_other_sweeps_alone(tmp_path,
                                                                             tiny_config,
                                                                             capsys):
    """sweeps/<id>/sweep.json is written by whoever can write the folder: `{"x": 1}` there made
    `cherry status` exit 1 with a traceback, and stopped workers topping up older sweeps."""
    queue = JobQueue(LocalStorage(tmp_path))
    good, _ = Sweeps(queue).submit(validate_config(sweep_config(
        {**tiny_config, "name": "good"}, parallel=1)))
    bad, _ = Sweeps(queue).submit(validate_config(sweep_config(
        {**tiny_config, "name": "bad"}, parallel=1)))
    queue.storage.write_atomic(SweepPaths(bad.sweep_id).record, b'{"x": 1}')
    capsys.readouterr()
    assert main(["status", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert good.sweep_id in out.split("sweeps:")[1]
    assert main(["compare", f"sweep:{bad.sweep_id}", "--root", str(tmp_path)]) == 2
    assert "no readable sweep.json" in capsys.readouterr().err


def test_status_json_names_each_trials_sweep_and_a_state_filter_shows_only_what_matches(
        tmp_path, tiny_config, capsys):
    """Issue 25: `status --json` rows say which sweep and trial a job is (null for a job of its
    own). Issue 28: `status --state cancelled` showed every sweep and the storage of 'jobs';
    filtered, it shows the sweeps of the trials shown and what the shown jobs hold."""
    queue = JobQueue(LocalStorage(tmp_path))
    kept, _ = Sweeps(queue).submit(validate_config(sweep_config(
        {**tiny_config, "name": "kept"}, parallel=2)))
    hit, (first, _) = Sweeps(queue).submit(validate_config(sweep_config(
        {**tiny_config, "name": "hit"}, parallel=2)))
    plain = queue.submit(validate_config({**tiny_config, "name": "plain"}))
    queue.request_cancel(first.job_id)
    queue.request_cancel(plain.job_id)
    root = ["--root", str(tmp_path)]
    capsys.readouterr()  # the log lines of the trials queued
    assert main(["status", *root, "--json"]) == 0
    rows = {r["job_id"]: r for r in json.loads(capsys.readouterr().out)}
    assert (rows[plain.job_id]["sweep_id"], rows[plain.job_id]["trial"]) == (None, None)
    assert (rows[first.job_id]["sweep_id"], rows[first.job_id]["trial"]) == (hit.sweep_id, 1)
    assert sorted((r["sweep_id"], r["trial"]) for r in rows.values() if r["sweep_id"]) == \
        sorted([(kept.sweep_id, 1), (kept.sweep_id, 2), (hit.sweep_id, 1), (hit.sweep_id, 2)])

    assert main(["status", *root, "--state", "cancelled"]) == 0
    out = capsys.readouterr().out
    assert first.job_id in out and plain.job_id in out and out.count("-t2-") == 0
    assert "storage: 2 cancelled jobs hold 0 B" in out
    assert hit.sweep_id in out and kept.sweep_id not in out
    assert main(["status", *root, "--state", "succeeded"]) == 0
    out = capsys.readouterr().out
    assert "no succeeded jobs" in out and "sweeps:" not in out and "storage:" not in out
    assert main(["status", *root]) == 0  # unfiltered: everything, as before
    out = capsys.readouterr().out
    assert kept.sweep_id in out and hit.sweep_id in out and "storage: 5 jobs hold" in out, out

"""rekd's progress table on real Tune Trial objects (no Ray needed to build them), with a clock the test sets."""
import pytest
from ray import tune
from ray.tune.experiment import Trial

from rekd.search.progress import RekdProgress
from rekd.search.study import load_study

STUDY = load_study("sparse_kd").smoke()  # val_acc, max, 2 epochs, 6 trials; prune_ratio, temperature, alpha
PARAMS = {"prune_ratio": 0.4939321535345923, "temperature": 8.52084800119005, "alpha": 0.6027633760716439}


def no_training(config):  # Trial checks that its trainable is registered; it never runs here
    pass


tune.register_trainable("rekd_progress_test", no_training)


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def trial(trial_id: str, status: str, epoch=None, val_acc=None, params=None, **result) -> Trial:
    t = Trial("rekd_progress_test", config={**PARAMS, **(params or {})}, trial_id=trial_id)
    if epoch is not None:
        metrics = {"epoch": epoch, "train_loss": 0.5, "epoch_time_s": 1.25, **result}
        t.update_last_result(metrics if val_acc is None else {**metrics, "val_acc": val_acc})
    t.set_status(status)
    return t


def reporter(study=STUDY, **kwargs) -> tuple[RekdProgress, Clock]:
    clock = Clock()
    progress = RekdProgress(study, clock=clock, **kwargs)
    progress.setup(start_time=clock.now, total_samples=study.num_samples)
    return progress, clock


MIXED = STUDY.with_overrides(num_samples=8)  # room for one trial of each kind and one not yet created


def mixed_trials() -> list[Trial]:
    return [
        trial("pending1", Trial.PENDING),
        trial("stopped1", Trial.TERMINATED, epoch=1, val_acc=0.95),
        trial("running1", Trial.RUNNING, epoch=1, val_acc=0.90),
        trial("complet1", Trial.TERMINATED, epoch=2, val_acc=0.930555),
        trial("complet2", Trial.TERMINATED, epoch=2, val_acc=0.91),
        trial("diverge1", Trial.TERMINATED, epoch=1, val_acc=0.99, stop_reason="non_finite_loss"),
        trial("errored1", Trial.ERROR),
    ]


def ids_in_order(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines()[2:] if not line.startswith("...")]


def test_the_header_counts_outcomes_as_the_search_summary_does_and_names_the_best_completed_trial():
    progress, clock = reporter(MIXED)
    clock.now += 13
    header = progress.table(mixed_trials()).splitlines()[0]
    assert header == ("[00:00:13] 6/8 trials started: 1 running, 2 completed, 1 stopped early, 1 non_finite_loss, "
                      "1 errored; best val_acc 0.9306 (trial complet1)")


def test_rows_put_running_trials_first_then_full_budget_trials_best_first_then_the_rest_by_metric():
    progress, _ = reporter(MIXED)
    assert ids_in_order(progress.table(mixed_trials())) == \
        ["running1", "complet1", "complet2", "diverge1", "stopped1", "errored1", "pending1"]


def test_each_row_says_status_in_rekds_words_and_formats_metric_loss_time_and_searched_values():
    progress, _ = reporter(MIXED)
    lines = progress.table(mixed_trials()).splitlines()
    assert lines[1].split() == ["trial", "status", "epoch", "val_acc", "train_loss", "s/epoch",
                                "prune_ratio", "temperature", "alpha"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert rows["complet1"].split() == ["complet1", "completed", "2/2", "0.9306", "0.5", "1.2",
                                        "0.4939", "8.521", "0.6028"]
    assert rows["stopped1"].split()[1:3] == ["stopped", "early"]
    assert rows["diverge1"].split()[1] == "non_finite_loss"
    assert rows["errored1"].split()[1:6] == ["errored", "0/2", "-", "-", "-"]
    assert rows["pending1"].split()[1] == "pending"


def test_the_best_before_any_trial_completed_says_at_which_epoch_its_metric_was_taken():
    progress, _ = reporter()
    trials = [trial("running1", Trial.RUNNING, epoch=1, val_acc=0.88),
              trial("stopped1", Trial.TERMINATED, epoch=1, val_acc=0.86)]
    assert progress.table(trials).splitlines()[0].endswith("; best val_acc 0.8800 (trial running1, at epoch 1/2)")


def test_the_best_follows_the_studys_mode():
    study = STUDY.with_overrides(metric="train_loss", mode="min")
    progress, _ = reporter(study)
    trials = [trial("higher01", Trial.TERMINATED, epoch=2, train_loss=0.9),
              trial("lower001", Trial.TERMINATED, epoch=2, train_loss=0.1)]
    text = progress.table(trials)
    assert text.splitlines()[0].endswith("; best train_loss 0.1000 (trial lower001)")
    assert ids_in_order(text) == ["lower001", "higher01"]


def test_more_trials_than_max_rows_hides_the_worst_and_says_how_many_and_what_they_are():
    study = STUDY.with_overrides(num_samples=25)
    progress, _ = reporter(study, max_rows=20)
    trials = [trial(f"compl{i:03d}", Trial.TERMINATED, epoch=2, val_acc=0.5 + i / 100) for i in range(22)]
    trials += [trial(f"stopp{i:03d}", Trial.TERMINATED, epoch=1, val_acc=0.99) for i in range(3)]
    lines = progress.table(trials).splitlines()
    assert len(lines) == 1 + 1 + 20 + 1
    assert ids_in_order("\n".join(lines))[:2] == ["compl021", "compl020"]
    assert lines[-1] == "... 5 more trials not shown (2 completed, 3 stopped early)"


def test_should_report_waits_the_report_frequency_between_tables():
    progress, clock = reporter(max_report_frequency=10)
    trials = [trial("running1", Trial.RUNNING, epoch=1, val_acc=0.9)]
    clock.now += 9.9
    assert not progress.should_report(trials)
    clock.now += 0.1
    assert progress.should_report(trials)
    progress.report(trials, False)
    clock.now += 5
    assert not progress.should_report(trials)
    clock.now += 5
    assert progress.should_report(trials)


def test_a_trial_that_completes_or_errors_is_reported_at_once_and_only_once():
    progress, clock = reporter(max_report_frequency=10)
    trials = [trial("running1", Trial.RUNNING, epoch=1, val_acc=0.9), trial("running2", Trial.RUNNING)]
    clock.now += 1
    assert not progress.should_report(trials)
    trials[0].set_status(Trial.TERMINATED)
    assert progress.should_report(trials)
    progress.report(trials, False)
    clock.now += 1
    assert not progress.should_report(trials)
    trials[1].set_status(Trial.ERROR)
    assert progress.should_report(trials)


def test_the_end_is_reported_once_by_the_done_call_not_also_by_the_last_trials_ending():
    progress, clock = reporter()
    trials = [trial(f"trial{i:03d}", Trial.TERMINATED, epoch=2, val_acc=0.9) for i in range(STUDY.num_samples)]
    clock.now += 1
    assert not progress.should_report(trials)  # Tune's loop ends here and reports with done=True
    assert progress.should_report(trials, done=True)


def test_the_report_prints_nothing_of_rays_temp_folders_resources_or_brackets(capsys):
    progress, _ = reporter(MIXED)
    progress.report(mixed_trials(), True, "Using AsyncHyperBand: num_stopped=3\nBracket: Iter 2.000: 0.91",
                    "Logical resource usage: 2.0/2 CPUs, 0/0 GPUs")
    out = capsys.readouterr().out
    assert out.startswith("[00:00:00] 6/8 trials started")
    for noise in ("Bracket", "AsyncHyperBand", "resource", "CPUs", "logdir", "/tmp"):
        assert noise not in out


@pytest.mark.parametrize("value, shown", [(0.4939321535345923, "0.4939"), (16.004016494233674, "16"),
                                          (1.0624e-05, "1.062e-05"), (3, "3"), ("resnet18", "resnet18")])
def test_searched_values_are_shown_to_4_significant_digits_and_choices_as_they_are(value, shown):
    progress, _ = reporter()
    row = progress.table([trial("trial001", Trial.RUNNING, epoch=1, val_acc=0.9, params={"alpha": value})])
    assert row.splitlines()[2].split()[-1] == shown

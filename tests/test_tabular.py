"""The tabular benchmark: its file, the replay of its curves to rekd's real search machinery, the comparison,
and a build that resumes where it was killed."""
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from rekd.bench.replay import Replay, Strategy, budget_to_reach, regret_at
from rekd.bench.search_quality import STRATEGIES, compare, markdown, ranks, summary_rows
from rekd.bench.table import (COLUMNS, MODES, SPACES, Design, build, read_runs, read_table, shipped,
                              write_table)
from rekd.bench.tabular import main
from rekd.errors import UsageError
from tests.usage import assert_usage_error, run_command

DESIGN = Design(dataset="digits", configs=6, seeds=2, epochs=4)
DIVERGES = 5  # this configuration's seed 0 diverges in epoch 2


def fake_curve(mode: str, config: int, seed: int) -> list[dict]:
    """Distinct, known curves: config c ends at 0.80 + 0.02 c; seed 1 a little lower on validation."""
    epochs = []
    for e in range(1, DESIGN.epochs + 1):
        val = round(0.5 + 0.02 * config + (0.3 - 0.01 * seed) * e / DESIGN.epochs, 4)
        epochs.append({"epoch": e, "val_acc": val, "test_acc": round(val - 0.01 * (config % 2), 4), "energy_uj": 0.7,
                       "wall_s": 1.0 + 0.1 * config + 0.01 * e, "diverged": 0})
        if config == DIVERGES and seed == 0 and e == 2:
            epochs[-1]["diverged"] = 1
            break
    return epochs


def fake_runs(design: Design = DESIGN) -> tuple[dict, dict]:
    points = {mode: design.points(mode) for mode in MODES}
    runs = {(mode, c, s): {"code_version": "test", "epochs": fake_curve(mode, c, s)} for mode, c, s in design.keys()}
    return points, runs


@pytest.fixture(scope="module")
def table_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tabular") / "fake.csv.gz"
    write_table(path, DESIGN, *fake_runs())
    return path


def test_a_table_is_its_latin_hypercube_and_its_curves_and_reads_back(table_file, tmp_path):
    points = DESIGN.points("sparse_kd")
    assert points == DESIGN.points("sparse_kd") != DESIGN.points("default_kd")[: len(points)]
    for mode in MODES:  # one configuration per stratum of each setting: a Latin hypercube
        for name, d in SPACES[mode].items():
            from rekd.bench.table import to_unit
            strata = sorted(int(to_unit(d, p[name]) * DESIGN.configs) for p in DESIGN.points(mode))
            assert strata == list(range(DESIGN.configs)), (mode, name)
    table = read_table(table_file)
    assert table.design == DESIGN and table.header["code_version"] == "test"
    assert table.curves[("sparse_kd", 3, 1)] == fake_curve("sparse_kd", 3, 1)
    assert len(table.curves[("default_kd", DIVERGES, 0)]) == 2
    assert table.params["default_kd"][2] == pytest.approx(DESIGN.points("default_kd")[2], rel=1e-5)
    assert table.final_test("sparse_kd", 4) == pytest.approx(0.5 + 0.08 + (0.3 + 0.29) / 2)
    # The same runs make the same bytes (no timestamp in the gzip), so a rebuilt table diffs cleanly.
    again = tmp_path / "again.csv.gz"
    write_table(again, DESIGN, *fake_runs())
    assert again.read_bytes() == table_file.read_bytes()
    with gzip.open(table_file, "rt") as f:
        assert [line for line in f if not line.startswith("#")][0].strip() == ",".join(COLUMNS)


class Recording(Strategy):
    """A strategy whose searcher keeps every result it is given, to compare with the table."""

    def searcher(self, space, max_t, seed):
        inner = super().searcher(space, max_t, seed)
        inner.seen = {}
        proposals = inner.proposals = {}
        suggest, on_result, on_complete = inner.suggest, inner.on_trial_result, inner.on_trial_complete

        def record(trial_id, result=None, **kwargs):
            inner.seen.setdefault(trial_id, []).append(result["val_acc"])

        def suggest_and_keep(trial_id):
            proposals[trial_id] = suggest(trial_id)
            return proposals[trial_id]

        inner.suggest = suggest_and_keep
        inner.on_trial_result = lambda t, r: (record(t, r), on_result(t, r))
        inner.on_trial_complete = lambda t, r=None, error=False: (record(t, r), on_complete(t, r, error))
        self.last = inner
        return inner


def test_the_replay_serves_each_trial_its_nearest_configurations_recorded_curve_exactly(table_file):
    replay = Replay(read_table(table_file), "sparse_kd")
    strategy = Recording("random", "random", "none")
    result = replay.search(strategy, seed=3, budget=160)
    searcher = strategy.last
    assert sum(t.epochs for t in result.trials) == result.budget == 160
    for number, trial in enumerate(result.trials, 1):
        proposal = searcher.proposals[f"t{number}"]
        distances = [sum((replay.units[c] - replay.units[replay.nearest(proposal)]) ** 2) for c in range(6)]
        assert trial.config == replay.nearest(proposal) and min(distances) == 0.0
        served = searcher.seen[f"t{number}"]
        curves = [[e["val_acc"] for e in replay.table.curves[("sparse_kd", trial.config, s)]] for s in range(2)]
        assert served in curves  # one recorded seed's curve, every epoch, in order
    # A diverged run ends its trial as FAIL in Optuna; the others ran the full budget: COMPLETE.
    states = {t.number: t.state for t in searcher.connected().get_trials()}
    for number, trial in enumerate(result.trials, 1):
        expected = optuna.trial.TrialState.FAIL if trial.epochs == 2 else optuna.trial.TrialState.COMPLETE
        assert states[number - 1] == expected
    assert any(t.epochs == 2 for t in result.trials)


def test_the_incumbent_is_the_best_full_budget_trial_by_validation_and_regret_is_its_test_shortfall(table_file):
    replay = Replay(read_table(table_file), "default_kd")
    result = replay.search(Strategy("random", "random", "none"), seed=0, budget=48)
    # config 4: 0.5 + 0.08 + the mean of 0.3 and 0.29 (config 5 loses 0.01 on test, and a seed to divergence)
    assert replay.best == pytest.approx(0.5 + 0.08 + 0.295)
    regrets = [r for _, r in result.curve]  # they may rise: validation, not test, picks the incumbent
    full = [t for t in result.trials if t.epochs == DESIGN.epochs]
    best = max(full, key=lambda t: t.val_acc)  # distinct values: no ties here
    assert regrets[-1] == pytest.approx(replay.best - replay.quality[best.config])
    assert regret_at(result.curve, 0, 1.0) == 1.0 and budget_to_reach(result.curve, 10.0) == result.curve[0][0]


def test_asha_stops_trials_which_optuna_records_as_pruned(table_file):
    replay = Replay(read_table(table_file), "sparse_kd")
    strategy = Recording("tpe + asha", "tpe", "asha", grace_period=1, reduction_factor=2)
    result = replay.search(strategy, seed=0, budget=60)
    states = [t.state for t in strategy.last.connected().get_trials()]
    assert optuna.trial.TrialState.PRUNED in states and optuna.trial.TrialState.COMPLETE in states
    assert any(t.epochs < DESIGN.epochs for t in result.trials)
    assert sum(t.epochs for t in result.trials) <= 60


@pytest.mark.parametrize("strategy", STRATEGIES, ids=lambda s: s.name)
def test_every_strategy_is_deterministic_for_a_seed_and_spends_exactly_its_budget(table_file, strategy):
    if strategy.stopping != "none" and strategy.grace_period > DESIGN.epochs:
        pytest.skip("grace period beyond this small table's epochs")
    replay = Replay(read_table(table_file), "sparse_kd")
    first = replay.search(strategy, seed=5, budget=64)
    again = replay.search(strategy, seed=5, budget=64)
    assert first.curve == again.curve and first.trials == again.trials
    running_at_the_end = 64 - sum(t.epochs for t in first.trials)
    assert 0 <= running_at_the_end < strategy.concurrency * DESIGN.epochs


def test_concurrent_trials_report_in_simulated_time(table_file):
    """Four at a time: the searcher proposes the fifth trial before the first four have ended."""
    replay = Replay(read_table(table_file), "sparse_kd")
    result = replay.search(Strategy("random, 4", "random", "none", concurrency=4), seed=1, budget=32)
    ends = [t.spent for t in result.trials]
    assert len(result.trials) >= 4 and ends[0] > DESIGN.epochs  # others' epochs ran while the first did


def test_the_comparison_ranks_strategies_over_seeds_and_writes_its_table(table_file):
    chosen = [s for s in STRATEGIES if s.name in ("random", "TPE + ASHA grace 1", "TPE")]
    outcomes = compare(table_file, ["sparse_kd"], chosen, seeds=3, budget=32, workers=1, progress=lambda _: None)
    rank = ranks(outcomes)
    assert {len(v) for v in rank.values()} == {3}
    for seed in range(3):  # the ranks of one seed are a permutation of 1..3 (ties share their mean)
        assert sum(v[seed] for v in rank.values()) == pytest.approx(6)
    rows = summary_rows(outcomes)
    text = markdown(rows, 32, 3, ["sparse_kd"], "fake")
    assert text.count("\n| ") == 1 + len(chosen) and "random" in text
    # paired with another strategy than random: the same seeds, the differences of their regrets
    rows = {r["strategy"]: r for r in summary_rows(outcomes, against="TPE")}
    by = {o.strategy: o.regrets() for o in outcomes}
    difference = [a - b for a, b in zip(by["random"], by["TPE"])]
    assert rows["random"]["vs_against"][0] == pytest.approx(sum(difference) / len(difference))
    assert "vs_against" not in rows["TPE"]
    text = markdown(list(rows.values()), 32, 3, ["sparse_kd"], "fake", against="TPE")
    assert "| vs TPE at 32, paired 95 % CI |" in text and text.count("\n| random |") == 1


def test_the_command_compares_on_a_table_file_and_refuses_what_it_cannot(table_file, tmp_path, capsys):
    plot = tmp_path / "regret.png"
    code, out, err = run_command(main, ["compare", "--table", str(table_file), "--seeds", "2", "--budget", "24",
                                        "--strategy", "random", "--strategy", "TPE", "--workers", "2",
                                        "--plot", str(plot)], capsys)
    assert code == 0, err
    assert "| random |" in out and "| TPE |" in out and plot.stat().st_size > 0
    code, out, err = run_command(main, ["compare", "--table", str(table_file), "--strategy", "random",
                                        "--against", "TPE"], capsys)
    assert_usage_error(code, out, err, "--against 'TPE' is not among the strategies compared; allowed: random")
    code, out, err = run_command(main, ["compare", "--table", str(table_file), "--strategy", "best"], capsys)
    assert_usage_error(code, out, err, "--strategy 'best' is not one; allowed: random | ")
    code, out, err = run_command(main, ["compare", "--table", str(tmp_path / "none.csv.gz")], capsys)
    assert_usage_error(code, out, err, "no tabular benchmark at")
    code, out, err = run_command(main, ["compare", "--table", "cifar"], capsys)
    assert_usage_error(code, out, err, "--table 'cifar' is not a shipped table; allowed: digits | digits-val30 | ")
    code, out, err = run_command(main, ["build", "--dataset", "cifar100", "--work-dir", str(tmp_path / "w")], capsys)
    assert_usage_error(code, out, err, "dataset='cifar100' is not allowed; allowed: an embedded dataset")
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("name", ["digits", "ndigits", "digits-val30"])
def test_the_shipped_tables_hold_every_run_of_their_design(name):
    table = read_table(shipped(name))
    design = table.design
    assert design.seeds >= 2 and design.configs * len(MODES) >= {"digits": 200, "ndigits": 48}.get(name, 2)
    assert design.dataset == name.split("-")[0] and (design.val_fraction == 0.3) == name.endswith("val30")
    assert shipped(name).stat().st_size < 3 * 2**20
    for key in design.keys():
        curve = table.curves[key]
        assert [e["epoch"] for e in curve] == list(range(1, len(curve) + 1))
        assert len(curve) == design.epochs or curve[-1]["diverged"]
        assert all(0 <= e["val_acc"] <= 1 and 0 <= e["test_acc"] <= 1 and e["wall_s"] > 0 for e in curve)
    assert "-dirty" not in table.header["code_version"]


def test_a_build_refuses_a_work_folder_of_another_design(tmp_path):
    small = Design(configs=2, seeds=1, epochs=1)
    (tmp_path / "design.json").write_text(json.dumps({**small.__dict__, "epochs": 3}))
    with pytest.raises(UsageError, match="holds a build of another design .*epochs=3 there, 1 now"):
        build(small, tmp_path, tmp_path / "t.csv.gz", progress=lambda _: None)


@pytest.mark.slow
def test_a_killed_build_continues_where_it_stopped(tmp_path):
    """Ended by SIGTERM (what `kill` and schedulers send; Ctrl-C's SIGINT takes the same path) after its first
    runs, the build keeps them, says how to continue, and the same command trains only the rest."""
    work, out = tmp_path / "work", tmp_path / "digits.csv.gz"
    command = [sys.executable, "-m", "rekd.bench.tabular", "build", "--configs", "3", "--seeds", "2", "--epochs", "2",
               "--work-dir", str(work), "--out", str(out)]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True, cwd=tmp_path)
    deadline = time.monotonic() + 120
    while len(read_runs(work / "runs.jsonl")) < 2 and time.monotonic() < deadline and first.poll() is None:
        time.sleep(0.2)
    os.kill(first.pid, signal.SIGTERM)
    _, err = first.communicate(timeout=60)
    recorded = read_runs(work / "runs.jsonl")
    assert first.returncode == 143 and 2 <= len(recorded) < 12, err
    assert "the same command continues the build" in err and not out.exists()
    # A line cut short by a kill is not a run: it is trained again.
    with open(work / "runs.jsonl", "a") as f:
        f.write('{"mode": "sparse_kd", "con')
    second = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert f"{len(recorded)} recorded in {work}, {12 - len(recorded)} to train" in second.stdout
    table = read_table(out)
    assert len(table.curves) == 12 and table.header["code_version"]
    for key, run in recorded.items():  # the first build's runs are in the table as they were recorded
        assert [e["val_acc"] for e in table.curves[key]] == pytest.approx([e["val_acc"] for e in run["epochs"]], abs=1e-6)


def test_the_exhaustive_reference_picks_by_validation_among_every_configuration(table_file):
    """Config 5's seed 1 has the best validation accuracy but not the best test accuracy; its seed 0 diverged."""
    replay = Replay(read_table(table_file), "default_kd")
    regrets = {round(replay.exhaustive_regret(seed), 6) for seed in range(20)}
    assert regrets == {0.0, round(replay.best - replay.quality[5], 6)}


def test_the_shipped_studies_run_the_strategy_the_comparison_calls_rekds_default():
    from rekd.bench.search_quality import BY_NAME, DEFAULT
    from rekd.search.study import load_study

    default = BY_NAME[DEFAULT]
    for name in ("sparse_kd", "default_kd"):
        study = load_study(name)
        sampler = "tpe-multivariate" if study.multivariate else "tpe-liar" if study.constant_liar else study.sampler
        assert (sampler, study.early_stopping, study.grace_period, study.reduction_factor) == (
            default.sampler, default.stopping != "none", default.grace_period, default.reduction_factor), name


def test_the_bench_row_pairs_rekds_default_with_random_search_on_the_shipped_table():
    from rekd.bench.search_quality import tabular_rows

    (row,) = tabular_rows(quick=True)
    assert row.unit == "points" and row.target == 0.0 and row.value == row.value  # a number, not NaN
    assert "paired over 20 searches, 95 % CI [" in row.detail


def test_a_second_build_of_one_work_folder_is_refused_while_the_first_runs(tmp_path):
    from rekd.locks import FileLock

    small = Design(configs=2, seeds=1, epochs=1)
    tmp_path.mkdir(exist_ok=True)
    with FileLock(tmp_path / "build.lock").acquire():
        with pytest.raises(UsageError, match=f"{tmp_path} is being built by PID {os.getpid()}"):
            build(small, tmp_path, tmp_path / "t.csv.gz", progress=lambda _: None)
    assert not (tmp_path / "t.csv.gz").exists()

"""A second Ctrl-C never cuts a write to the Optuna study in half: a SQLite statement interrupted by
KeyboardInterrupt keeps its lock for as long as the exception's traceback lives, and the driver, which
holds that exception while it closes the search, then could not close the Optuna trials ("database is
locked"): they stayed RUNNING. Here the signal arrives in the middle of the searcher's own statement."""
import signal

import optuna
import pytest
from sqlalchemy import event

from rekd.search.interrupt import Interruption, deferred
from rekd.search.optuna_searcher import close_unfinished, make_searcher
from rekd.search.study import load_study


def signal_during_the_next_statement(engine) -> None:
    """SIGINT from inside the searcher's next SQL statement, once it ran and before its rows are read."""
    sent = []

    def once(*_):
        if not sent:
            sent.append(signal.SIGINT)
            signal.raise_signal(signal.SIGINT)
    event.listen(engine, "after_cursor_execute", once)


def test_a_signal_inside_an_optuna_write_waits_for_it_and_the_trials_can_still_be_closed(tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = make_searcher(load_study("sparse_kd"), url, "s")
    searcher.suggest("first")
    with Interruption("rekd.search") as interruption:
        interruption.signum = signal.SIGINT  # the first signal came: the next one raises KeyboardInterrupt
        signal_during_the_next_statement(searcher.storage.engine)
        with pytest.raises(KeyboardInterrupt) as caught:
            searcher.suggest("second")
        assert "second" in searcher.trial_numbers  # the write was whole: the interrupt came after it
        interruption.closing = True
        # the driver closes the search while it holds the exception, traceback and all
        assert caught.value.__traceback__ is not None
        assert close_unfinished(url, "s") == 2
    states = [t.state for t in optuna.load_study(study_name="s", storage=url).trials]
    assert states == [optuna.trial.TrialState.FAIL] * 2


def test_a_signal_in_a_deferred_block_is_raised_when_it_ends_and_while_closing_never():
    with Interruption("rekd.search") as interruption:
        interruption.signum = signal.SIGINT
        reached = []
        with pytest.raises(KeyboardInterrupt):
            with deferred():
                with deferred():
                    signal.raise_signal(signal.SIGINT)
                    reached.append("inner")
                reached.append("outer")  # not yet: the outermost block ends first
        assert reached == ["inner", "outer"] and interruption.aborted
        interruption.closing = True
        signal.raise_signal(signal.SIGINT)  # remembered, not raised
        with deferred():
            signal.raise_signal(signal.SIGINT)
    with deferred():  # no driver: nothing is deferred, nothing changes
        pass
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler

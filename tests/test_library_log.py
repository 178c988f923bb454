"""The libraries' log records go to driver.log in the results folder, not the console; errors still show;
--verbose keeps them on the console too; closing gives the console back.

The console is a handler of the test's own on each library logger, beside the libraries' handlers: those
write to whatever sys.stderr was when they were made, which in a test session may be another test's capture.
"""
import io
import logging
import warnings

import pytest

from rekd.library_log import LIBRARIES, LOG_FILE, LibraryLog


def say_things():
    logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    logging.getLogger("ray._private.authentication.authentication_token_setup").warning(
        "Token authentication is enabled for this Ray cluster.")
    logging.getLogger("optuna.storages._rdb.storage").info("A new study created in RDB with name: s")
    warnings.warn("a library's deprecation notice", FutureWarning)
    logging.getLogger("ray.tune.tune").error("Trial errored: the one line that must still be seen")


@pytest.fixture
def console():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    levels = {name: logging.getLogger(name).level for name in LIBRARIES}
    for name in LIBRARIES:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)  # rekd.search.report quiets optuna's logger for a session
    yield stream
    for name in LIBRARIES:
        logging.getLogger(name).removeHandler(handler)
        logging.getLogger(name).setLevel(levels[name])


def test_library_chatter_goes_to_the_log_file_and_only_errors_reach_the_console(tmp_path, console):
    library_log = LibraryLog(verbose=False).apply()
    try:
        say_things()  # before the results folder exists: held, then written
        path = library_log.write_to(tmp_path)
        logging.getLogger("optuna").warning("after the folder exists")
    finally:
        library_log.close()
    console = console.getvalue()
    assert "Creating initial" not in console and "Token authentication" not in console
    assert "new study" not in console and "deprecation notice" not in console
    assert "the one line that must still be seen" in console
    logged = path.read_text()
    assert path.name == LOG_FILE
    for line in ("Creating initial MLflow database tables", "Token authentication is enabled",
                 "A new study created", "a library's deprecation notice", "the one line", "after the folder exists"):
        assert line in logged


def test_verbose_keeps_the_libraries_on_the_console_and_close_restores_them(tmp_path, console):
    library_log = LibraryLog(verbose=True).apply()
    try:
        library_log.write_to(tmp_path)
        logging.getLogger("mlflow.store.db.utils").info("Creating initial MLflow database tables...")
    finally:
        library_log.close()
    assert "Creating initial MLflow database tables" in console.getvalue()
    assert "Creating initial" in (tmp_path / LOG_FILE).read_text()
    assert all(library_log not in logging.getLogger(name).handlers for name in LIBRARIES)
    quiet = LibraryLog(verbose=False).apply()
    quiet.close()
    logging.getLogger("optuna.storages._rdb.storage").info("A new study created in RDB with name: again")
    assert "again" in console.getvalue()  # the console handlers are as they were


@pytest.fixture(autouse=True)
def warnings_shown():
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        yield

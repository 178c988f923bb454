"""The contract of a user's error at the command line: exit status 2 and one line that says what was wrong."""


def assert_usage_error(code, out: str, err: str, message: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in out + err

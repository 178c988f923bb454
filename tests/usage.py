"""The contract of a user's error at the command line: exit status 2 and one line that says what was wrong."""


def assert_usage_error(code, out: str, err: str, message: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], err
    assert "Traceback" not in out + err


def run_command(main, argv, capsys) -> tuple[int, str, str]:
    """A command's main() as a shell sees it: its exit status (argparse's own refusals included), stdout, stderr."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err

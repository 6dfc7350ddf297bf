"""``blip-fast`` run in the test process, and the one line a user error must be."""

from blip_fast.cli import main


def run(argv, capsys) -> tuple[int, str]:
    """``blip-fast ARGV`` in this process: (exit status, stderr)."""
    try:
        code = main([str(arg) for arg in argv])
    except SystemExit as exit_:
        code = exit_.code
    return code, capsys.readouterr().err


def assert_user_error(code: int, stderr: str, *fragments: str) -> str:
    """Exit 2 and one stderr line ``blip-fast[ COMMAND]: error: ...`` holding every fragment, with no traceback;
    returns the line."""
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("blip-fast") and ": error: " in lines[0], stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]

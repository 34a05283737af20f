"""`jaxembed.cli`: one parser and `main` per command, one runner, one error form and one set of exit statuses."""

import argparse
import importlib
import subprocess
import sys

import pytest

from jaxembed import cli, fileio
from jaxembed.cli import runner

NAMES = ["train", "embed", "evaluate", "report", "export", "index", "search", "cluster", "whitening",
         "convert_weights"]


def test_every_command_has_a_parser_and_a_main_and_a_python_m_entry():
    assert list(cli.COMMANDS) == NAMES
    for name, path in cli.COMMANDS.items():
        module = importlib.import_module(path)
        parser = module.build_parser()
        assert isinstance(parser, argparse.ArgumentParser)
        assert parser.prog == f"python -m jaxembed.{name}"
        assert callable(module.main)
    assert "--angular_margin" in cli.train.build_parser("resnet_angular_margin").format_help()
    assert "--angular_margin" not in cli.train.build_parser().format_help()  # inception_bn's by default


@pytest.mark.parametrize("error, status", [(fileio.DirectoryBusy("runs/x", "pid 1"), 2), (runner.UsageError("both"), 2),
                                           (ValueError("bad"), 1), (FileNotFoundError("gone"), 1),
                                           (KeyboardInterrupt(), 130)])
def test_the_runner_turns_known_failures_into_one_line_and_a_status(capsys, error, status):
    def work():
        raise error

    assert runner.run_tool("prog", work) == status
    err = capsys.readouterr().err.strip()
    assert err == ("prog: interrupted" if status == 130 else f"prog: error: {error}")


def test_the_runner_returns_the_status_work_returns_and_added_bad_input(capsys):
    assert runner.run_tool("prog", lambda: 143) == 143
    assert runner.run_tool("prog", lambda: None) == 0

    def work():
        raise KeyError("k")

    assert runner.run_tool("prog", work, bad_input=(KeyError,)) == 1
    with pytest.raises(RuntimeError):  # a bug keeps its traceback
        runner.run_tool("prog", lambda: (_ for _ in ()).throw(RuntimeError("bug")))


def test_the_console_script_names_the_command_in_its_errors(capsys, tmp_path):
    assert cli.main(["search", "--index", str(tmp_path / "none"), "--query", str(tmp_path)]) == 1
    assert capsys.readouterr().err.startswith("jaxembed search: error: ")
    assert cli.main(["nonsense"]) == 2 and "unknown command 'nonsense'" in capsys.readouterr().err
    assert cli.main([]) == 2
    assert cli.main(["--help"]) == 0 and "convert_weights" in capsys.readouterr().out
    with pytest.raises(SystemExit) as usage:  # argparse's own usage error: status 2, prog named
        cli.main(["cluster", "--index", "x"])
    assert usage.value.code == 2 and "jaxembed cluster: error:" in capsys.readouterr().err


def test_python_m_and_the_library_path_agree(tmp_path):
    """`python -m jaxembed.search` (a package's __main__) and `python -m jaxembed.cluster` (a shim) run the
    same commands with the same error form."""
    for name in ("search", "cluster"):
        done = subprocess.run([sys.executable, "-m", f"jaxembed.{name}", "--index", str(tmp_path / "none"),
                               "-k", "2", *(["--query", str(tmp_path)] if name == "search" else [])],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith(f"python -m jaxembed.{name}: error: "), done.stderr

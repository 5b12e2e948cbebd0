"""Command-line conventions: --version, a usage error shows the subcommand's usage and a
did-you-mean, mlx-lm's spellings (-m/--model, -p/--prompt, --max-tokens) work, and study
writes where the user says (./study unless told)."""

from __future__ import annotations

import pytest

from plt_port.app import cli


def usage_error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith(f"plt-port {cli.version()}")


def test_an_unknown_option_gets_the_subcommand_usage_and_a_suggestion(capsys):
    err = usage_error(capsys, ["generate", "--max-tokenz", "10", "hi"])
    assert err.startswith("usage: plt-port generate ")
    assert "unrecognized arguments: --max-tokenz" in err and "did you mean --max-tokens" in err
    err = usage_error(capsys, ["serve", "--max-batchs", "4"])
    assert err.startswith("usage: plt-port serve ") and "did you mean --max-batch" in err


def test_an_unknown_command_gets_a_suggestion(capsys):
    err = usage_error(capsys, ["genrate", "hi"])
    assert "invalid choice: 'genrate'" in err and "did you mean generate?" in err


def test_mlx_lm_spellings(make_model, capsys):
    model_dir = make_model("plt", eos_token_id=None)
    args = cli.parse(["generate", "-m", model_dir, "-p", "x = 1", "--max-tokens", "7"])
    assert (args.model, args.prompt_option, args.max_new_tokens) == (model_dir, "x = 1", 7)
    assert cli.main(["generate", "-m", model_dir, "-p", "x = 1", "--max-tokens", "3"]) == 0
    assert "generation: 3 tokens" in capsys.readouterr().err
    assert cli.main(["generate", "-m", model_dir, "-p", "x", "y"]) == 1
    assert "give the prompt once" in capsys.readouterr().err


def test_study_writes_to_the_folder_the_user_names():
    assert cli.parse(["study"]).out == "study"
    assert cli.parse(["study", "--out", "docs/study"]).out == "docs/study"

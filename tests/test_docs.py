"""README.md stays in step with the command line."""
import pathlib

from experiments import cli
from rsst_jax import config

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_flag_table_matches_the_parser():
    assert cli.flags_markdown() in README.read_text(), (
        "README.md's flag table is stale: regenerate it from experiments.cli.flags_markdown()")


def test_every_flag_is_in_the_help_with_one_default():
    text = " ".join(cli.run_parser().format_help().split())
    for name in config.flag_names():
        assert f"--{name}" in text
    assert text.count("(default:") + text.count("when not given") >= len(config.flag_names()) - 5
    for chunk in text.split("--")[1:]:  # no flag says its default twice
        assert chunk.count("(default") <= 1, chunk[:120]

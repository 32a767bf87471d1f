"""README.md stays in step with the command line."""
import pathlib

from rsst_jax import config

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def test_readme_flag_table_matches_the_parser():
    assert config.flags_markdown() in README.read_text(), (
        "README.md's flag table is stale: regenerate it from rsst_jax.config.flags_markdown()")


def test_every_parser_flag_is_in_the_help():
    text = config.build_parser().format_help()
    for field in config.dataclasses.fields(config.Config):
        assert f"--{field.name}" in text

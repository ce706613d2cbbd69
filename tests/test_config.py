"""Settings: defaults, site config, environment, and clear errors for bad values."""
import os
import stat

import pytest

from portal.config import ConfigError, ensure_token, load_config, prepare_home


def test_defaults(tmp_path):
    config = load_config(environ={"PILOTFISH_HOME": str(tmp_path)})
    assert config.home == tmp_path
    assert config.database_url == f"sqlite:///{tmp_path / 'pilotfish.db'}"
    assert config.scheduler == "slurm"


def test_environment_beats_site_config(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("scheduler: slurm\npoll_interval: 7\n")
    config = load_config(environ={"PILOTFISH_HOME": str(tmp_path), "PILOTFISH_SITE_CONFIG": str(site),
                                  "PILOTFISH_SCHEDULER": "local"})
    assert config.scheduler == "local"
    assert config.poll_interval == 7


@pytest.mark.parametrize("text, message", [
    ("scheduler: pbs\n", "scheduler: expected one of slurm, local, got 'pbs'"),
    ("poll_interval: soon\n", "poll_interval: expected a number, got 'soon'"),
    ("- a\n- b\n", "expected a mapping at the top level"),
    ("runtimes: [1]\n", "runtimes: expected a mapping"),
    ("a: [\n", "not valid YAML"),
])
def test_bad_site_config_names_the_problem(tmp_path, text, message):
    site = tmp_path / "site.yaml"
    site.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(environ={"PILOTFISH_HOME": str(tmp_path), "PILOTFISH_SITE_CONFIG": str(site)})
    assert message in str(err.value)


def test_missing_site_config(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(environ={"PILOTFISH_SITE_CONFIG": str(tmp_path / "nope.yaml")})


def test_unknown_override_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown setting"):
        load_config({"home": tmp_path, "colour": "blue"}, environ={})


def test_token_generated_once_private(tmp_path):
    config = load_config(environ={"PILOTFISH_HOME": str(tmp_path / "home")})
    prepare_home(config)
    token = ensure_token(config)
    assert len(token) >= 32
    assert stat.S_IMODE(os.stat(config.token_file).st_mode) == 0o600
    assert ensure_token(config) == token
    assert stat.S_IMODE(os.stat(config.home).st_mode) == 0o700


def test_token_from_environment_is_used(tmp_path):
    config = load_config(environ={"PILOTFISH_HOME": str(tmp_path), "PILOTFISH_TOKEN": "s3cret-token"})
    assert ensure_token(config) == "s3cret-token"
    assert not config.token_file.exists()

import subprocess
import sys

import pytest

from chatserve.settings import GatewaySettings, WorkerSettings


def test_flags_override_env_override_defaults():
    env = {"CHATSERVE_PORT": "9000", "CHATSERVE_CONTEXT_LENGTH": "4096", "CHATSERVE_ENABLE_PREFIX_CACHING": "false"}
    s = WorkerSettings.from_args(["--port", "9100"], env)
    assert (s.port, s.context_length, s.enable_prefix_caching, s.block_size) == (9100, 4096, False, 16)


def test_list_settings_split_on_commas():
    s = GatewaySettings.from_args([], {"CHATSERVE_API_KEYS": "a, b,,c"})
    assert s.api_keys == ["a", "b", "c"]


def test_bad_setting_value_exits_with_a_clear_message():
    with pytest.raises(SystemExit, match="invalid value for port"):
        WorkerSettings.from_args(["--port", "many"], {})


def test_cli_lists_templates_and_renders_one(tmp_path):
    out = subprocess.run([sys.executable, "-m", "chatserve.cli.main", "template", "list"], capture_output=True,
                         text=True, check=True).stdout
    assert "vicuna_v1.1" in out and "chatml" in out
    msgs = tmp_path / "m.json"
    msgs.write_text('[{"role": "system", "content": "SYS"}, {"role": "user", "content": "Hi"}]')
    rendered = subprocess.run([sys.executable, "-m", "chatserve.cli.main", "template", "render", "vicuna_v1.1",
                               "--messages", str(msgs)], capture_output=True, text=True, check=True).stdout
    assert rendered == "SYS USER: Hi ASSISTANT:\n"


def test_cli_unknown_command_exits_2():
    r = subprocess.run([sys.executable, "-m", "chatserve.cli.main", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown command" in r.stderr

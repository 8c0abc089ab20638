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


def test_up_passes_keys_and_the_secret_by_environment_never_in_argv(monkeypatch):
    from chatserve.cli.up import _args, child_specs

    monkeypatch.delenv("CHATSERVE_INTERNAL_SECRET", raising=False)
    specs = child_specs(_args(["--api-key", "sk-team-a,sk-team-b", "--host", "127.0.0.1"]))
    secrets_seen = set()
    for name, argv, env, _ in specs:
        joined = " ".join(argv)
        assert "sk-team" not in joined, (name, argv)
        secrets_seen |= {env.get("CHATSERVE_INTERNAL_SECRET")} - {None}
        for value in env.values():
            assert not value or value not in joined
    assert len(secrets_seen) == 1 and len(next(iter(secrets_seen))) >= 24  # one generated secret, shared
    env = {name: env for name, _, env, _ in specs}
    assert env["gateway"]["CHATSERVE_API_KEYS"] == "sk-team-a,sk-team-b" and env["webui"]["CHATSERVE_API_KEY"] == "sk-team-a"
    assert "CHATSERVE_INTERNAL_SECRET" not in env["webui"]


def test_a_non_loopback_bind_needs_a_secret(tmp_path):
    import pytest

    from chatserve.http import guard_internal_plane
    from chatserve.settings import ControllerSettings

    with pytest.raises(SystemExit, match="--internal-secret-file"):
        guard_internal_plane(ControllerSettings(host="0.0.0.0"), "controller")
    guard_internal_plane(ControllerSettings(host="127.0.0.1"), "controller")  # loopback: fine
    f = tmp_path / "s"
    f.write_text("from-a-file\n")
    s = ControllerSettings(host="0.0.0.0", internal_secret_file=str(f))
    guard_internal_plane(s, "controller")
    assert s.internal_secret == "from-a-file"
    f.write_text("")
    with pytest.raises(SystemExit, match="is empty"):
        guard_internal_plane(ControllerSettings(host="0.0.0.0", internal_secret_file=str(f)), "controller")

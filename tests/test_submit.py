"""A real submit / status / logs round trip against a second local Ray head (with token auth), and
the checks made before anything is sent (token over plain http, local paths), tested without a network."""

import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import _free_port, tiny_spec
from dreambooth_ray import cli as cli_main
from dreambooth_ray import submit
from dreambooth_ray.submit import SubmitError

BIN = Path(sys.executable).parent
# The test head's own token: `ray start` with token auth needs one, and ~/.ray/auth_token exists
# only where some earlier local Ray made it.
TOKEN = secrets.token_hex(16)
REMOTE = ["http://10.255.255.1:8265", "http://ray-head.example.com:8265", "10.0.0.5:8265",
          "http://127.0.0.1.example.com:8265", "http://localhost.example.com:8265"]


def cli(*args, env=None, timeout=300):
    env = env or {**os.environ, "RAY_AUTH_TOKEN": TOKEN}
    return subprocess.run([str(BIN / "dreambooth-ray"), *args], capture_output=True, text=True, env=env, timeout=timeout)


def one_line(text: str) -> str:
    return " ".join(text.split())  # the console wraps long messages


@pytest.fixture
def no_network(monkeypatch):
    """A JobSubmissionClient that records what it was given and never connects."""
    made = []

    class Fake:
        def __init__(self, address, headers=None, **kwargs):
            made.append((address, headers))
            raise ConnectionError("fake client: no network in this test")

    monkeypatch.setattr("ray.job_submission.JobSubmissionClient", Fake)
    return made


@pytest.fixture(scope="module")
def ray_head():
    port, dash = _free_port(), _free_port()
    # Every port of its own: the session's Ray already holds the agent's default (52365), and a
    # second head whose dashboard agent cannot bind never accepts a job ("No available agent").
    agent, agent_grpc, metrics, runtime_env = (_free_port() for _ in range(4))
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN}
    head = subprocess.Popen(
        [str(BIN / "ray"), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
         "--dashboard-host=127.0.0.1", "--num-cpus=2",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}", "--disable-usage-stats", "--include-dashboard=true"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while cli("status", "nope", "--address", address).stderr.find("no job with submission id") < 0:
        assert head.poll() is None and time.time() < deadline, "ray head did not come up"
        time.sleep(2)
    yield address
    # SIGKILL at once: `ray start --block` outlived SIGTERM by more than 10 s every time here. The
    # head's own children (gcs, raylet, workers) share its group.
    os.killpg(head.pid, signal.SIGKILL)
    head.wait()


def test_submit_status_logs_round_trip(ray_head, tmp_path, toy_images):
    spec = tiny_spec(str(tmp_path / "store"), str(toy_images), name="sub", prior={"enabled": False},
                     train={"steps": 2, "checkpoint_every": 2})
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))

    p = cli("submit", str(job), "--address", ray_head)
    assert p.returncode == 0, p.stderr
    sid = p.stdout.strip()
    assert sid.startswith("sub-")

    again = cli("submit", str(job), "--address", ray_head)
    assert again.returncode == 2 and "already exists" in again.stderr

    # One follower instead of a polling loop: it streams the logs until the job ends.
    followed = cli("logs", sid, "--address", ray_head, "--follow", timeout=480).stdout
    status = cli("status", sid, "--address", ray_head).stdout.strip()
    logs = cli("logs", sid, "--address", ray_head).stdout
    assert status == "SUCCEEDED", logs[-3000:]
    assert "step 2/2" in logs and "samples" in logs
    assert "step 2/2" in followed and "samples" in followed
    assert (tmp_path / "store" / "outputs" / "sub" / "toy" / "job.json").exists()
    assert "already ended" in cli("stop", sid, "--address", ray_head).stderr

    assert TOKEN not in logs + followed  # the auth token is sent, never printed


def test_wrong_token_is_a_clear_error(ray_head, tmp_path):
    bad = tmp_path / "token"
    bad.write_text("not-the-token")
    # A HOME of its own: no ~/.ray/auth_token to fall back on.
    env = {**os.environ, "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": "", "HOME": str(tmp_path)}
    p = cli("status", "x", "--address", ray_head, "--token-file", str(bad), env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"the Ray cluster at {ray_head} refused the auth token" in one_line(p.stderr), p.stderr
    assert "no job with submission id" not in p.stderr
    assert "not-the-token" not in p.stderr + p.stdout
    # (No "missing token" case here: Ray's own client also looks for a token, and in a session with
    # other token-auth Ray clusters it finds one of theirs, so "none" cannot be staged reliably.)


@pytest.mark.parametrize("address", REMOTE)
def test_token_is_never_sent_over_plain_http_to_another_machine(address, monkeypatch, no_network, capsys):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "secret-token")
    for cmd in (["status", "x"], ["logs", "x"], ["stop", "x"]):
        assert cli_main.main([*cmd, "--address", address]) == 2
        err = one_line(capsys.readouterr().err)
        assert f"refusing to send the Ray auth token unencrypted to {address}" in err
        assert "https://" in err and "port-forward" in err and "--insecure" in err and "secret-token" not in err
    assert no_network == []  # refused before a client was made

    # --insecure gets past the check: the (fake) client is made, with the token.
    assert cli_main.main(["status", "x", "--address", address, "--insecure"]) == 2
    assert "cannot reach the Ray cluster" in one_line(capsys.readouterr().err)
    assert no_network == [(address, {"Authorization": "Bearer secret-token"})]
    submit.check_transport(address, "secret-token", insecure=True)


@pytest.mark.parametrize("address", ["https://ray-head.example.com", "http://127.0.0.1:8265", "http://127.0.0.2:8265",
                                     "http://[::1]:8265", "localhost:8265", "http://LOCALHOST:8265"])
def test_token_may_go_over_https_or_loopback(address):
    submit.check_transport(address, "secret-token")


def test_no_token_means_nothing_to_protect():
    submit.check_transport(REMOTE[0], None)
    with pytest.raises(SubmitError):
        submit.check_transport(REMOTE[0], "secret-token")


def test_submit_refuses_local_paths_for_a_remote_cluster(tmp_path, toy_images, monkeypatch, no_network, capsys):
    model = tmp_path / "my-model"
    model.mkdir()
    spec = tiny_spec(str(tmp_path / "store"), str(toy_images), model=str(model))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(spec))
    monkeypatch.setenv("RAY_AUTH_TOKEN", "")  # the transport check must not be what stops it
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    address = REMOTE[1]
    with pytest.raises(SubmitError) as e:
        submit.submit(str(job), address)
    msg = str(e.value)
    for field in ("storage", "subjects.toy.images", "model"):
        assert f"{field} (" in msg
    assert address in msg and "s3://" in msg
    assert cli_main.main(["submit", str(job), "--address", address, "--insecure"]) == 2
    assert "subjects.toy.images" in one_line(capsys.readouterr().err)
    assert no_network == []  # refused before connecting

    # Cloud locations and a hub id pass; so do local paths for a head on this machine.
    spec.update(storage="s3://bucket/runs", model="org/some-model")
    spec["subjects"][0]["images"] = "s3://bucket/photos/toy"
    job.write_text(yaml.safe_dump(spec))
    with pytest.raises(SubmitError, match="cannot reach"):
        submit.submit(str(job), address)
    from dreambooth_ray.spec import load_spec

    submit.check_paths_visible(load_spec(tmp_path / "job.yaml"), address)
    job.write_text(yaml.safe_dump(tiny_spec(str(tmp_path / "store"), str(toy_images))))
    submit.check_paths_visible(load_spec(job), "http://127.0.0.1:8265")

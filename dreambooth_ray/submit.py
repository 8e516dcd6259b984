"""`dreambooth-ray submit/status/logs/stop`: a job spec as a Ray Job on a remote cluster.

The spec is validated here, before anything is sent. The cluster gets the validated spec and this
package's code (`py_modules`), so it runs the same version as the submitter. A Ray cluster with
token auth takes the token from RAY_AUTH_TOKEN, from the file RAY_AUTH_TOKEN_PATH names, from
--token-file, or from ~/.ray/auth_token. It is sent as a header and never printed, and never over
plain http to another machine (see check_transport).
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import yaml

from .errors import UserError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


class SubmitError(UserError, RuntimeError):
    """The cluster refused or cannot find a job (address, token, submission id)."""


def _token(token_file: str | None) -> str | None:
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for p in (token_file, os.environ.get("RAY_AUTH_TOKEN_PATH"), Path.home() / ".ray" / "auth_token"):
        if p and Path(p).is_file():
            return Path(p).read_text().strip()
    return None


def _url(address: str):
    # Ray reads an address without a scheme as http://.
    return urlsplit(address if "://" in address else f"http://{address}")


def is_loopback(address: str) -> bool:
    """Whether `address` is this machine (127.0.0.0/8, ::1, localhost): a tunnel or port-forward end,
    or a head that shares this machine's disk."""
    host = (_url(address).hostname or "").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def check_transport(address: str, token: str | None, insecure: bool = False) -> None:
    """Refuse to send `token` in clear text across a network: anyone on the path could replay it
    and run code on the cluster. Loopback never leaves this machine; https:// is encrypted."""
    if token and not insecure and _url(address).scheme != "https" and not is_loopback(address):
        raise SubmitError(
            f"refusing to send the Ray auth token unencrypted to {address}: use an https:// address, "
            "an SSH tunnel or `kubectl port-forward` to 127.0.0.1, or pass --insecure"
        )


def _auth_refused(address: str, e: Exception) -> SubmitError:
    # Ray raises AuthenticationError on 401 (no token sent) and 403 (a token that is not the
    # cluster's), with several lines of advice meant for the cluster's own nodes.
    if str(e).startswith("Authentication required"):
        what = "needs an auth token and none was found"
    else:
        what = "refused the auth token (it is not this cluster's token)"
    return SubmitError(f"the Ray cluster at {address} {what}: set RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH "
                       "or --token-file, or put the token in ~/.ray/auth_token")


def _translate_auth_errors(cmd):
    """A command whose token the cluster refuses says so in one line, at whatever call it happens."""

    @functools.wraps(cmd)
    def wrapper(args, console):
        from ray.exceptions import AuthenticationError

        try:
            return cmd(args, console)
        except AuthenticationError as e:
            raise _auth_refused(args.address, e) from None

    return wrapper


def client(address: str, token_file: str | None = None, insecure: bool = False):
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = _token(token_file)
    check_transport(address, token, insecure)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        return JobSubmissionClient(address, headers=headers)
    except AuthenticationError as e:  # the version check already needs the token
        raise _auth_refused(address, e) from None
    except Exception as e:  # connection refused, not a Ray dashboard
        raise SubmitError(f"cannot reach the Ray cluster at {address}: {e}") from None


def check_paths_visible(spec, address: str) -> None:
    """A cluster elsewhere cannot read this machine's disk: refuse local paths before sending the
    job, rather than have it fail on the cluster. A loopback head shares this disk."""
    from .k8s import local_paths

    local = [] if is_loopback(address) else local_paths(spec)
    if local:
        fields = ", ".join(f"{f} ({p})" for f, p in local)
        raise SubmitError(f"{fields}: the cluster at {address} cannot read this machine's disk; "
                          "use s3:// URLs (or a hub id for a model)")


def _missing(e: RuntimeError) -> bool:
    # The job API answers an unknown submission id with 404; anything else is a real failure.
    return "status code 404" in str(e)


def default_submission_id(spec) -> str:
    # Deterministic: the same spec submitted twice is refused instead of running twice.
    return f"{spec.name}-{spec.fingerprint(spec.model_dump(by_alias=True))}"


def submit(job_file: str, address: str, submission_id: str | None = None, token_file: str | None = None,
           insecure: bool = False) -> str:
    import dreambooth_ray

    from .spec import load_spec

    spec = load_spec(job_file)
    check_paths_visible(spec, address)  # before connecting: nothing is sent for a job that cannot run
    sid = submission_id or default_submission_id(spec)
    c = client(address, token_file, insecure)
    try:
        info = c.get_job_info(sid)
    except RuntimeError as e:
        if not _missing(e):
            raise SubmitError(f"request to {address} failed: {e}") from None
        info = None  # no such job: the normal case
    if info is not None:
        raise SubmitError(
            f"submission id {sid!r} already exists on {address} (status {info.status}); "
            "see `dreambooth-ray status/logs`, or pass --submission-id to submit again"
        )
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "job.yaml").write_text(yaml.safe_dump(json.loads(spec.model_dump_json(by_alias=True)), sort_keys=False))
        deadline = time.monotonic() + 120
        while True:
            try:
                return c.submit_job(
                    entrypoint="python -m dreambooth_ray.cli run job.yaml --address auto",
                    submission_id=sid,
                    runtime_env={"working_dir": tmp, "py_modules": [str(Path(dreambooth_ray.__file__).parent)]},
                    metadata={"dreambooth_ray_job": spec.name},
                )
            except RuntimeError as e:
                if "already exists" in str(e):
                    raise SubmitError(f"submission id {sid!r} already exists on {address}") from None
                # A cluster that is still starting answers 500 "No available agent ... try again later".
                if "No available agent" in str(e) and time.monotonic() < deadline:
                    time.sleep(3)
                    continue
                raise SubmitError(f"submission to {address} failed: {e}") from None


def _existing(c, sid: str, address: str):
    try:
        return c.get_job_info(sid)
    except RuntimeError as e:
        if _missing(e):
            raise SubmitError(f"no job with submission id {sid!r}") from None
        raise SubmitError(f"request to {address} failed: {e}") from None


@_translate_auth_errors
def cmd_submit(args, console) -> int:
    sid = submit(args.job, args.address, args.submission_id, args.token_file, args.insecure)
    print(sid)
    console.print(f"submitted; follow with: dreambooth-ray logs {sid} --address {args.address} --follow", highlight=False)
    return 0


@_translate_auth_errors
def cmd_status(args, console) -> int:
    info = _existing(client(args.address, args.token_file, args.insecure), args.id, args.address)
    print(info.status)
    if info.message:
        console.print(info.message, highlight=False)
    return 0


@_translate_auth_errors
def cmd_logs(args, console) -> int:
    c = client(args.address, args.token_file, args.insecure)
    _existing(c, args.id, args.address)
    if not args.follow:
        print(c.get_job_logs(args.id), end="")
        return 0

    async def follow():
        async for lines in c.tail_job_logs(args.id):
            print(lines, end="", flush=True)

    asyncio.run(follow())
    return 0


@_translate_auth_errors
def cmd_stop(args, console) -> int:
    c = client(args.address, args.token_file, args.insecure)
    info = _existing(c, args.id, args.address)
    if info.status in TERMINAL:
        console.print(f"{args.id} already ended ({info.status})", highlight=False)
        return 0
    c.stop_job(args.id)
    console.print(f"stop requested for {args.id}", highlight=False)
    return 0


def add_commands(sub) -> None:
    def common(p):
        p.add_argument("--address", default=os.environ.get("RAY_ADDRESS", "http://127.0.0.1:8265"),
                       help="Ray dashboard address (default: $RAY_ADDRESS or http://127.0.0.1:8265)")
        p.add_argument("--token-file", default=None, help="Ray auth token file (default: ~/.ray/auth_token)")
        p.add_argument("--insecure", action="store_true",
                       help="send the auth token over plain http:// to a non-loopback address")

    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster as a Ray Job")
    p.add_argument("job")
    p.add_argument("--submission-id", default=None, help="default: derived from the spec (same spec, same id)")
    common(p)
    p.set_defaults(fn=cmd_submit)
    for name, fn, text in (("status", cmd_status, "a submitted job's status"),
                           ("logs", cmd_logs, "a submitted job's logs"),
                           ("stop", cmd_stop, "stop a submitted job")):
        p = sub.add_parser(name, help=text)
        p.add_argument("id", help="submission id")
        common(p)
        if name == "logs":
            p.add_argument("--follow", action="store_true")
        p.set_defaults(fn=fn)

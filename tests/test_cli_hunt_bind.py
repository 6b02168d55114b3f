"""`staticmoe serve` on an address it cannot listen on (a busy port, a host name that does not resolve, an address
not on this machine): one line naming --host/--port and a non-zero exit before the model loads. Was: uvicorn's
`[Errno 98] error while attempting to bind ...` or a bare `[Errno -2] Name or service not known` (which flag?),
printed after the model had started loading, and exit 3 only once the load had finished."""

from __future__ import annotations

import socket

import pytest

from service import cli
from tests.service_fixtures import free_port
from tests.test_cli_refusals import assert_clean_refusal, run_serve


def test_a_busy_port_is_refused_before_the_model_loads():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        code, output, healthy = run_serve([], port=port)
    assert_clean_refusal(code, output, healthy, "--port")
    assert "model tiny loaded" not in output and "in use" in output, output


@pytest.mark.parametrize("host", ["not-a-host.invalid", "203.0.113.7"])  # no such name; TEST-NET-3, not ours
def test_a_host_this_machine_cannot_listen_on_is_refused(host):
    code, output, healthy = run_serve(["--host", host, "--api-key", "k"], port=free_port())
    assert_clean_refusal(code, output, healthy, "--host")
    assert "model tiny loaded" not in output, output


def test_the_check_lets_free_addresses_and_port_0_through():
    cli.check_listen_address("127.0.0.1", free_port())
    cli.check_listen_address("localhost", 0)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        with pytest.raises(SystemExit, match="--port"):
            cli.check_listen_address("127.0.0.1", holder.getsockname()[1])


def test_a_bracketed_ipv6_host_is_refused_with_the_form_that_works():
    """uvicorn hands the host to getaddrinfo, which does not take URL brackets."""
    with pytest.raises(SystemExit, match="without brackets"):
        cli.check_listen_address("[::1]", 0)

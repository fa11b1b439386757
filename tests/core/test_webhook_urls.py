"""The webhook URL policy (core/webhook_urls.py), case by case: link-local always refused, loopback and private
ranges only where QLORA_WEBHOOK_ALLOWED_NETWORKS names them (closed by default, loopback in the embedded mode),
public addresses allowed, only http(s). The name resolution is played by a stub where a case needs a name."""

from __future__ import annotations

import pytest

from core.settings import Settings
from core.webhook_urls import UrlRefused, checked_addresses
from launch.embedded import child_env


def refused(url: str, allowed: str = "", answers: list[str] | None = None) -> str:
    with pytest.raises(UrlRefused) as caught:
        checked_addresses(url, allowed, resolver=(lambda host, port: answers) if answers is not None else None)
    return str(caught.value)


@pytest.mark.parametrize("url", ["http://169.254.169.254/latest/meta-data/", "http://169.254.0.1:8080/", "http://[fe80::1]/",
                                 "http://[fe80::abcd%25eth0]/", "http://[::ffff:169.254.169.254]/"])
def test_link_local_is_refused_whatever_the_setting(url):
    assert "link-local" in refused(url, "0.0.0.0/0,::/0,169.254.0.0/16,fe80::/10")


def test_a_name_that_resolves_to_link_local_is_refused():
    assert "link-local" in refused("http://metadata.internal/", "metadata.internal", answers=["169.254.169.254"])


@pytest.mark.parametrize("url", ["http://127.0.0.1:8080/", "http://[::1]/", "http://10.0.0.5/", "http://172.16.3.4/",
                                 "http://192.168.1.1/", "http://100.64.0.1/", "http://[fd00::1]/"])
def test_loopback_and_private_are_refused_by_default(url):
    assert "QLORA_WEBHOOK_ALLOWED_NETWORKS" in refused(url)


def test_allowed_networks_and_hosts_admit_them():
    assert checked_addresses("http://127.0.0.1:8080/x", "127.0.0.0/8")[1] == ["127.0.0.1"]
    assert checked_addresses("http://[::1]/", "::1")[1] == ["::1"]
    assert checked_addresses("http://10.2.3.4/", "10.0.0.0/8")[1] == ["10.2.3.4"]
    assert checked_addresses("http://hooks.corp/", "hooks.corp", resolver=lambda h, p: ["10.9.9.9"])[1] == ["10.9.9.9"]
    refused("http://10.2.3.4/", "10.1.0.0/16")  # another network
    refused("http://other.corp/", "hooks.corp", answers=["10.9.9.9"])  # another host


def test_public_addresses_are_allowed():
    assert checked_addresses("https://93.184.216.34/hook", "")[1] == ["93.184.216.34"]
    assert checked_addresses("https://hooks.example.com/", "", resolver=lambda h, p: ["93.184.216.34", "2606:2800:220:1::1"])[1]


def test_one_internal_address_among_public_ones_refuses_the_name():
    assert "10.0.0.1" in refused("https://hooks.example.com/", "", answers=["93.184.216.34", "10.0.0.1"])


@pytest.mark.parametrize("url", ["ftp://93.184.216.34/", "file:///etc/passwd", "gopher://93.184.216.34/", "http:///nohost",
                                 "http://user:pw@93.184.216.34/", "http://93.184.216.34:0/", "http://93.184.216.34:99999/",
                                 "http://0.0.0.0/", "http://224.0.0.1/"])
def test_other_forms_are_refused(url):
    refused(url, "0.0.0.0/0")


def test_an_unresolvable_or_unencodable_name_is_refused():
    assert "Could not resolve" in refused("http://no-such-host.invalid/")
    assert "Invalid host name" in refused("http://a..b/")  # IDNA refuses an empty label (a UnicodeError, not an OSError)
    assert "Invalid host name" in refused(f"http://{'a' * 70}.example/")


def test_the_deployed_default_is_closed_and_the_embedded_one_admits_loopback(monkeypatch, tmp_path):
    for name in [n for n in __import__("os").environ if n.startswith("QLORA_")]:
        monkeypatch.delenv(name)
    deployed = Settings(home=tmp_path)
    assert deployed.webhook_allowed_networks == ""
    refused("http://127.0.0.1:8000/hook", deployed.webhook_allowed_networks)
    env = child_env({}, deployed, 8001)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    embedded = Settings()
    assert checked_addresses("http://127.0.0.1:8000/hook", embedded.webhook_allowed_networks)[1] == ["127.0.0.1"]
    assert checked_addresses("http://[::1]:8000/hook", embedded.webhook_allowed_networks)[1] == ["::1"]
    refused("http://10.0.0.1/", embedded.webhook_allowed_networks)
    assert "link-local" in refused("http://169.254.169.254/", embedded.webhook_allowed_networks)
    assert child_env({"QLORA_WEBHOOK_ALLOWED_NETWORKS": ""}, deployed, 8001)["QLORA_WEBHOOK_ALLOWED_NETWORKS"] == ""  # chosen closed

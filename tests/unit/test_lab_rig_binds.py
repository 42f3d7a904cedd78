"""Host folders bound into rigs: checked paths, created host folders, the ccache binding."""

from __future__ import annotations

import pytest

from lab.rigs.fleet import RIG_CCACHE_ENV, _bind_pairs, ccache_binds
from lab.rigs.host import RigError


def test_bind_pairs_create_the_host_folder(tmp_path):
    host = tmp_path / "cache" / "a"
    assert _bind_pairs({host: "/opt/x"}) == ((str(host), "/opt/x"),)
    assert host.is_dir()


@pytest.mark.parametrize("host,inside", [("relative", "/opt/x"), ("/tmp/a", "opt/x"),
                                         ("/tmp/a:b", "/opt/x"), ("/tmp/a", "/opt/x,ro")])
def test_bind_pairs_refuse_what_nspawn_would_misread(host, inside):
    with pytest.raises(RigError, match="bind paths must be absolute"):
        _bind_pairs({host: inside})


def test_ccache_binds_put_the_hosts_cache_at_the_deploys_ccache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(RIG_CCACHE_ENV, str(tmp_path))
    assert ccache_binds("real") == {tmp_path / "real": "/opt/llm-garage/ccache"}
    assert ccache_binds("x", garage_root="/srv/g") == {tmp_path / "x": "/srv/g/ccache"}
    with pytest.raises(RigError):
        ccache_binds("../escape")

"""docs/plugins.md, "auth: admit": for a `Caller` with `admits` set, admit() takes what the request holds (a slot),
and "release(): Called exactly once for every request the plugin authenticated (and, for a caller with `admits`,
admitted) ... give back what the request held".

A third-party auth plugin written from those lines keeps a count of its requests in flight: admit() adds one,
release() takes one away.  A request the gateway refuses itself before admitting it (a body without max_tokens: 400)
held nothing, so its plugin must not be asked to give anything back; one that was admitted and served is released
once."""
from __future__ import annotations

import sys

import pytest

from tests.support.gateway_requests import HAIKU, message, post
from tests.support.plugin_dist import plugin_site

COUNTING_MODULE = '''
from apertis_proxy.plugin_api import Caller

admitted = []
released = []


class Counting:
    def __init__(self, ctx):
        self.name = ctx.name

    async def authenticate(self, request):
        if request.headers.get("x-api-key") != "sk-counted":
            return None
        return Caller(key_id=None, key_name="counted", admits=True)

    async def admit(self, request, caller):
        admitted.append(request.request_id)
        return caller

    async def release(self, caller, record):
        released.append(record.request_id)
'''


@pytest.fixture(scope="module")
def counting_site(tmp_path_factory):
    return plugin_site(tmp_path_factory.mktemp("counting-auth"), "counting_auth_admits", COUNTING_MODULE,
                       {"apertis_proxy.auth": {"counting": "counting_auth_admits:Counting"}})


async def test_release_follows_only_requests_the_plugin_admitted(gateway_env, mock_upstream, counting_site,
                                                                  monkeypatch):
    monkeypatch.syspath_prepend(str(counting_site))
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(auth_plugins=["counting"])
    counting = sys.modules["counting_auth_admits"]
    counting.admitted.clear()
    counting.released.clear()

    refused = await post(gateway_env, "sk-counted",
                         {"model": HAIKU, "messages": [{"role": "user", "content": "no max_tokens"}]})
    assert refused.status == 400, refused.body
    served = await post(gateway_env, "sk-counted", message())
    assert served.status == 200, served.body

    assert counting.admitted == [served.header("request-id")]
    # Given back: what was taken, once; nothing for the request that never took anything.
    assert counting.released == counting.admitted, (
        f"released {counting.released}, admitted {counting.admitted}; the 400 was {refused.header('request-id')}")

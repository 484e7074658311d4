"""Shared fixtures for the e2e tests.

Upstream   `mock_upstream` (a started MockUpstream, key MOCK_API_KEY), `make_mock_upstream(**kw)` for more of
           them (e.g. one per channel in failover tests). See mock_upstream.py.
SDK        `sdk`: an SdkRunner, parametrized over the SDK generations and their client kinds (2.x in process and
           1.x in a child process, sync and async each; the JavaScript SDK, async, in a Node child process), so a
           test using it runs five times; `make_sdk(generation, mode)` for one particular runner. The JS runs skip
           where Node.js is missing. See sdk_harness.py, sdk_scenarios.py and sdk_js.py.
Store      `tmp_db`: a SQLite path inside tmp_path (not created); gateway_env makes it a copy of
           `store_template`, a store migrated once per session.
Gateway    `gateway_env` (an unstarted GatewayEnv), `gateway` (started: key `alice` in `.key`, channel `main` to
           `mock_upstream` in `.mock`, `.base_url`). See gateway_env.py.
           `scripted`: unstarted (`await scripted.start(...)`), key `alice` in `.key`, channel `main` to a
           ScriptedChannel in `.channel` (holding CHANNEL_KEY). See scripted_channel.py and scripted_gateway.py.
Raw HTTP   not a fixture: ``from rawhttp import RawConnection``.
"""
from __future__ import annotations

import os

import pytest

from tests.support.mock_upstream import MOCK_API_KEY, MockUpstream
from tests.support.pg_server import memory_folder
from tests.support.sdk_harness import GENERATION_MODES, GENERATIONS, SdkRunner
from tests.support.sdk_js import JsSdkProcess, unavailable_reason
from tests.support.sdk_legacy import LegacySdkProcess
from tests.support.gateway_env import GatewayEnv, migrated_store
from tests.support.scripted_channel import ScriptedChannel
from tests.support.scripted_gateway import CHANNEL_KEY

# tmp_path and the other temporary folders pytest makes, in /dev/shm (a tmpfs) where the machine has one: the
# root disk here discards the blocks of each file removed, which made the tests' files slow to write and remove.
# The same numbered folders and retention as in the system's temporary folder; PYTEST_DEBUG_TEMPROOT set by
# the caller wins.
if _memory := memory_folder():
    os.environ.setdefault("PYTEST_DEBUG_TEMPROOT", _memory)

# The SDKs read ANTHROPIC_* variables (base URL, custom headers, credentials); a developer's own must not leak
# into what the tests send.
for _name in [n for n in os.environ if n.startswith("ANTHROPIC_")]:
    del os.environ[_name]


# -- upstream ----------------------------------------------------------------------------------------------------

@pytest.fixture
async def mock_upstream():
    async with MockUpstream(api_key=MOCK_API_KEY) as mock:
        yield mock


@pytest.fixture
async def make_mock_upstream():
    started: list[MockUpstream] = []

    async def make(**kw) -> MockUpstream:
        mock = await MockUpstream(**kw).start()
        started.append(mock)
        return mock

    yield make
    for mock in started:
        await mock.stop()


# -- SDK -----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def legacy_sdk():
    process = LegacySdkProcess()  # spawned on first use only: 2.x-only runs never pay for it
    yield process
    process.close()


@pytest.fixture(scope="session")
def js_sdk():
    process = JsSdkProcess()  # installed and spawned on first use only
    yield process
    process.close()


@pytest.fixture
def make_sdk(legacy_sdk, js_sdk):
    def make(generation: str, mode: str) -> SdkRunner:
        if generation == "js" and (reason := unavailable_reason()):
            pytest.skip(reason)
        return SdkRunner(generation, mode, legacy_sdk, js_sdk)
    return make


@pytest.fixture(params=[(g, m) for g in GENERATIONS for m in GENERATION_MODES[g]],
                ids=lambda p: f"sdk{p[0]}-{p[1]}")
def sdk(request, make_sdk) -> SdkRunner:
    return make_sdk(*request.param)


# -- store and gateway ---------------------------------------------------------------------------------------------

@pytest.fixture
def tmp_db(tmp_path) -> str:
    return str(tmp_path / "apertis.db")


@pytest.fixture(scope="session")
def store_template(tmp_path_factory) -> str:
    """A migrated SQLite store that gateway_env copies instead of migrating a new file for every test."""
    path = str(tmp_path_factory.mktemp("template") / "apertis.db")
    migrated_store(path)
    return path


@pytest.fixture
async def gateway_env(tmp_db, store_template):
    """An unstarted GatewayEnv: add keys and channels, then `await env.start()`."""
    env = GatewayEnv(tmp_db, store_template)
    yield env
    await env.stop()
    env.close()


@pytest.fixture
async def gateway(request, gateway_env, mock_upstream):
    """A started gateway with key `alice` (gateway.key) and channel `main` to `mock_upstream`; settings
    overrides as an indirect parameter (`@pytest.mark.parametrize("gateway", [{...}], indirect=True)`)."""
    gateway_env.key = gateway_env.add_key("alice")
    gateway_env.add_channel("main", mock_upstream)
    await gateway_env.start(**getattr(request, "param", {}))
    gateway_env.mock = mock_upstream
    return gateway_env


@pytest.fixture
async def scripted(gateway_env):
    """A gateway with key alice and channel `main` to a ScriptedChannel (env.channel), not started yet: the test
    queues its scripts and calls `await scripted.start(...)` with its settings."""
    async with ScriptedChannel() as channel:
        gateway_env.key = gateway_env.add_key("alice")
        gateway_env.add_channel("main", channel.base_url, api_key=CHANNEL_KEY)
        gateway_env.channel = channel
        yield gateway_env


# -- PostgreSQL ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def pg_server():
    """A throwaway PostgreSQL server for the session (pg_server.py), its files in memory where the machine has
    /dev/shm: a database per test is made and removed several times faster there.  Without initdb the tests
    that need it skip, except in CI (CI=true, set by .ci/run), where they fail."""
    from tests.support.pg_server import PgServer, PgUnavailable
    try:
        server = PgServer.start(parent=memory_folder())
    except PgUnavailable as exc:
        if os.environ.get("CI") == "true":
            pytest.fail(f"PostgreSQL is required in CI: {exc}")
        pytest.skip(f"PostgreSQL tests need a local PostgreSQL: {exc}")
    yield server
    server.close()


_pg_databases = iter(range(1, 1_000_000))


@pytest.fixture
def pg_url(pg_server):
    """A new, empty database on the session's server: postgresql://USER@/NAME?host=SOCKETDIR."""
    return pg_server.create_database(f"t{next(_pg_databases)}_{os.getpid()}")

"""`client.beta.files.list()` of the current SDK (2.17) pages with an opaque cursor: the answer's `next_page`, sent
back as `page`, as `types/beta/file_list_params.py` and `AsyncPageCursor` read it. Iterating the list must reach
every file the key uploaded, not stop after the first page.  SDK 1.x's `after_id`/`before_id` still page it; the
batches list keeps paging by `last_id` only, as the SDK's batches list reads it."""
from __future__ import annotations

import anthropic
import pytest


async def test_iterating_the_file_list_reaches_every_file_of_the_key(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        uploaded = [(await client.beta.files.upload(file=(f"f{i}.txt", b"hello %d" % i, "text/plain"))).id
                    for i in range(3)]
        first = await client.beta.files.list(limit=2)
        assert len(first.data) == 2
        assert first.next_page, "a first page of 2 out of 3 files names no next page"
        listed = [f.id async for f in client.beta.files.list(limit=2)]
    assert sorted(listed) == sorted(uploaded)


async def test_listing_files_by_id_gives_only_those_files(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        uploaded = [(await client.beta.files.upload(file=(f"f{i}.txt", b"hello %d" % i, "text/plain"))).id
                    for i in range(3)]
        page = await client.beta.files.list(ids=[uploaded[1]])
    assert [f.id for f in page.data] == [uploaded[1]]
    assert page.next_page is None


async def upload(client, count: int) -> list[str]:
    """The ids of `count` new files, newest first (the list's order)."""
    ids = [(await client.beta.files.upload(file=(f"f{i}.txt", b"hello %d" % i, "text/plain"))).id
           for i in range(count)]
    return ids[::-1]


async def test_a_page_of_a_scope_is_filled_with_that_scope_s_files(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        newest_first = await upload(client, 4)
        in_scope = newest_first[1::2]
        for file_id in in_scope:
            gateway.mock.account.files[file_id]["scope"] = {"type": "session", "id": "sesn_1"}
        first = await client.beta.files.list(scope_id="sesn_1", limit=1)
        assert [f.id for f in first.data] == in_scope[:1] and first.next_page
        listed = [f.id async for f in client.beta.files.list(scope_id="sesn_1", limit=1)]
    assert listed == in_scope


async def test_files_deleted_while_paging_do_not_break_the_walk(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        newest_first = await upload(client, 5)
        deleted = []
        async for f in client.beta.files.list(limit=2):
            await client.beta.files.delete(f.id)
            deleted.append(f.id)
        assert deleted == newest_first
        assert (await client.beta.files.list()).data == []


async def test_sdk_1_paging_by_after_id_still_pages(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        newest_first = await upload(client, 3)
        page = await client.beta.files.list(limit=2, extra_query={"after_id": newest_first[0]})
        assert [f.id for f in page.data] == newest_first[1:] and page.next_page is None
        page = await client.beta.files.list(extra_query={"before_id": newest_first[2], "limit": 1})
        assert [f.id for f in page.data] == newest_first[1:2]


async def test_ids_keep_the_list_order_and_leave_out_unknown_ids(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        newest_first = await upload(client, 3)
        page = await client.beta.files.list(ids=[newest_first[2], "file_unknown", newest_first[0], newest_first[2]])
    assert [f.id for f in page.data] == [newest_first[0], newest_first[2]] and not page.has_more


@pytest.mark.parametrize("params", [
    {"ids": ["file_a"], "limit": 2},
    {"ids": ["file_a"], "page": "page_ZmlsZV9h"},
    {"ids": [f"file_{i}" for i in range(101)]},
    {"page": "file_a"},                         # not a cursor
    {"page": "page_ZmlsZV9h!"},                 # one the gateway did not make
    {"page": "page_\u00e9"},
    {"page": "page_ZmlsZV9h"},                  # a well-made cursor of a file the key does not list
])
async def test_a_list_query_it_cannot_serve_is_a_400(gateway, params):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        await upload(client, 1)
        with pytest.raises(anthropic.BadRequestError) as refused:
            await client.beta.files.list(**params)
    assert refused.value.body["error"]["type"] == "invalid_request_error"


async def test_the_batches_list_keeps_paging_by_last_id(gateway):
    """The SDK's batches list (AsyncPage) pages by `after_id` = `last_id`: its answers carry no `next_page`."""
    request = {"custom_id": "one", "params": {"model": "claude-haiku-4-5-20251001", "max_tokens": 64,
                                              "messages": [{"role": "user", "content": "hi"}]}}
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        created = [(await client.messages.batches.create(requests=[request])).id for _ in range(3)]
        first = await client.messages.batches.list(limit=2)
        listed = [b.id async for b in client.messages.batches.list(limit=2)]
    assert first.has_more and "next_page" not in first.model_dump()
    assert listed == created[::-1]

"""`client.beta.files.list()` of the current SDK (2.17) pages with an opaque cursor: the answer's `next_page`, sent
back as `page`, as `types/beta/file_list_params.py` and `AsyncPageCursor` read it. Iterating the list must reach
every file the key uploaded, not stop after the first page."""
from __future__ import annotations

import anthropic


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

"""The files list's cursor (`next_page`) names the file its next page starts at. A file of the same key deleted by
another client between two pages (two workers cleaning up, an operator's script) is no reason for the walk to
stop with a 400: the next page starts where that file was. `ids` of another key's files are left out."""
from __future__ import annotations

import anthropic

from tests.support.rawhttp import RawConnection


async def upload(client, count: int) -> list[str]:
    ids = [(await client.beta.files.upload(file=(f"f{i}.txt", b"hello %d" % i, "text/plain"))).id
           for i in range(count)]
    return ids[::-1]        # newest first, the list's order


async def test_the_next_page_goes_on_when_its_first_file_was_deleted_meanwhile(gateway):
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as client:
        newest_first = await upload(client, 4)
        first = await client.beta.files.list(limit=2)
        assert [f.id for f in first.data] == newest_first[:2] and first.next_page
        await client.beta.files.delete(newest_first[2])        # by another worker of the same key
        following = await client.beta.files.list(limit=2, page=first.next_page)
    assert [f.id for f in following.data] == newest_first[3:]


async def test_ids_of_another_keys_files_are_left_out_in_either_encoding(gateway_env, mock_upstream):
    gateway = gateway_env
    gateway.key, other = gateway.add_key("alice"), gateway.add_key("bob")
    gateway.add_channel("main", mock_upstream)
    await gateway.start()
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=other, max_retries=0) as bob:
        bobs = await upload(bob, 1)
    async with anthropic.AsyncAnthropic(base_url=gateway.base_url, api_key=gateway.key, max_retries=0) as alice:
        alices = await upload(alice, 2)
    query = f"ids[]={alices[1]}&ids={bobs[0]}&ids={alices[0]}"
    async with await RawConnection.open(gateway.gateway.host, gateway.gateway.port) as conn:
        listed = await conn.request("GET", f"/v1/files?{query}", {"x-api-key": gateway.key})
    assert listed.status == 200, listed.body
    assert [f["id"] for f in listed.json()["data"]] == alices
    assert listed.json()["has_more"] is False

"""An HTTP client for tests: real requests to the server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp

TIMEOUT = aiohttp.ClientTimeout(total=30)


class Reply:
    def __init__(self, status: int, body: dict, headers):
        self.status, self.body, self.headers = status, body, headers

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body})"


async def post(session: aiohttp.ClientSession, url: str, data: bytes, content_type: str = "image/jpeg",
               params: dict | None = None, headers: dict | None = None) -> Reply:
    async with session.post(url, data=data, headers={"Content-Type": content_type, **(headers or {})},
                            params=params) as r:
        text = await r.read()
        return Reply(r.status, json.loads(text), r.headers)


def json_body(image: bytes) -> bytes:
    return json.dumps({"image": base64.b64encode(image).decode()}).encode()


async def predict_many(url: str, bodies: list[bytes], content_type: str = "image/jpeg", concurrency: int = 32) -> list[Reply]:
    """Send every body at once (up to `concurrency` in flight); replies in the order of bodies."""
    limit = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        async def one(body: bytes) -> Reply:
            async with limit:
                return await post(session, url, body, content_type)
        return await asyncio.gather(*(one(b) for b in bodies))


class GoodStream:
    """Good requests sent back to back while a test does something else; bounded in count."""

    def __init__(self, url: str, body: bytes, max_requests: int = 400):
        self.url, self.body, self.max_requests = url, body, max_requests
        self.statuses: list[int] = []
        self._stop = asyncio.Event()

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            while not self._stop.is_set() and len(self.statuses) < self.max_requests:
                self.statuses.append((await post(session, self.url, self.body)).status)

    def stop(self) -> None:
        self._stop.set()

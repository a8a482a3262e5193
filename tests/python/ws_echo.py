"""Opens a WebSocket to URL (ws:// or wss://, trusting --ca), sends three
messages and prints each echo on a line: the WORKER_COMMAND tests check that
upgrades pass through tandem on both ports."""

import argparse
import asyncio
import ssl

import websockets


async def main(url: str, ca: str | None) -> None:
    context = ssl.create_default_context(cafile=ca) if url.startswith("wss://") else None
    async with websockets.connect(url, ssl=context, open_timeout=10) as ws:
        for word in ("one", "two", "three"):
            await ws.send(word)
            print(await asyncio.wait_for(ws.recv(), 10))


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--ca")
    a = p.parse_args()
    asyncio.run(main(a.url, a.ca))

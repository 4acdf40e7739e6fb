"""Serving under hostile clients: the load check of issue #12.

``--clients`` streaming clients (the official ``openai`` AsyncOpenAI, as
``serve_load.py``'s) run twice against one ``galerne serve``: first alone (the
baseline), then with ``--hostile`` hostile clients at the same time, in three kinds:

* **big** bodies, in turn: 16 MiB with ``Content-Length`` (413 before a byte is
  read), 16 MiB chunked (413 once 2 MiB came), and 1.9 MiB of text just under
  the body limit (400: more text than the context holds, before tokenizing);
  the client sends its whole body, then reads the answer, then again;
* **slow** clients, in turn: a body that comes a byte a second (408 after
  ``--body-timeout``) and headers that come a byte a second (closed after
  ``--header-timeout``);
* **silent** sockets: ``--silent-sockets`` connections each that send nothing
  (closed after ``--header-timeout``), opened again as soon as they are closed.

A first run alone warms the server up and is not counted. Both runs print their figures; the check is 0 errors for the streaming clients
and their p99 inter-token latency with the hostile clients within 2x of the run
without (exit status 1 otherwise). The server's own count of what it refused
and closed (/metrics) comes last, then the JSON line.

    python benchmarks/serve_hostile.py                          # cpu-125m, 200 clients + 20 hostile
    python benchmarks/serve_hostile.py --clients 20 --requests 40 --hostile 6   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import math
import signal
import sys
import time
from urllib.parse import urlsplit

from common import SHAPES, report
from serve_load import client, make_prompts, percentile, start_server

CHUNK = b"x" * 65536


# ------------------------------------------------------------------ hostile clients


async def connect(host: str, port: int, outcomes: collections.Counter, what: str):
    """(reader, writer), or None when the connection fails (counted: "WHAT: connect failed")."""
    try:
        return await asyncio.open_connection(host, port)
    except OSError:
        outcomes[f"{what}: connect failed"] += 1
        return None


async def status_of(reader: asyncio.StreamReader, timeout: float) -> str:
    """The status of the answer, or how the connection ended."""
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        return "no answer"
    except ConnectionError:
        return "reset"
    return line.split()[1].decode() if line.startswith(b"HTTP/") else "closed"


async def big(host: str, port: int, args, outcomes: collections.Counter, stop: asyncio.Event) -> None:
    n, size = 0, int(args.big_mb * 2**20)
    near = json.dumps({"model": args.model, "messages": [{"role": "user", "content": "x" * (19 * 2**20 // 10)}]})
    while not stop.is_set():
        kind = ("16MiB content-length", "16MiB chunked", "1.9MiB text")[n % 3]
        n += 1
        conn = await connect(host, port, outcomes, f"big {kind}")
        if conn is None:
            continue
        reader, writer = conn
        try:
            head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            if kind.endswith("content-length"):
                writer.write(f"{head}Content-Length: {size}\r\n\r\n".encode())
                for _ in range(size // len(CHUNK)):
                    writer.write(CHUNK)
                    await writer.drain()
            elif kind.endswith("chunked"):
                writer.write(f"{head}Transfer-Encoding: chunked\r\n\r\n".encode())
                for _ in range(size // len(CHUNK)):
                    writer.write(b"%x\r\n%s\r\n" % (len(CHUNK), CHUNK))
                    await writer.drain()
                writer.write(b"0\r\n\r\n")
            else:
                writer.write(f"{head}Content-Length: {len(near)}\r\n\r\n{near}".encode())
            await writer.drain()
            outcomes[f"big {kind}: {await status_of(reader, 30)}"] += 1
        except ConnectionError:
            outcomes[f"big {kind}: reset while sending"] += 1
        finally:
            writer.close()
        await asyncio.sleep(args.hostile_pause)


async def slow(host: str, port: int, args, outcomes: collections.Counter, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        kind = ("body", "headers")[n % 2]
        n += 1
        conn = await connect(host, port, outcomes, f"slow {kind}")
        if conn is None:
            continue
        reader, writer = conn
        if kind == "body":
            writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                         "Content-Length: 100000\r\n\r\n{".encode())
            trickle = b" " * 100000
        else:
            trickle = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n".encode() + b"X-Pad: a\r\n" * 10000

        async def drip(writer=writer, trickle=trickle):  # this connection's, bound now
            for i in range(len(trickle)):
                writer.write(trickle[i:i + 1])
                await writer.drain()
                await asyncio.sleep(1.0)

        dripping = asyncio.create_task(drip())
        t0 = time.monotonic()
        try:
            outcome = await status_of(reader, 120)
        except asyncio.CancelledError:  # the run ended first
            outcomes[f"slow {kind}: still open at the end"] += 1
            raise
        finally:
            dripping.cancel()
            writer.close()
        outcomes[f"slow {kind}: {outcome} after {round(time.monotonic() - t0)} s"] += 1


async def silent(host: str, port: int, args, outcomes: collections.Counter, stop: asyncio.Event) -> None:
    async def one():
        while not stop.is_set():
            conn = await connect(host, port, outcomes, "silent")
            if conn is None:
                await asyncio.sleep(0.1)
                continue
            reader, writer = conn
            t0 = time.monotonic()
            try:
                data = await reader.read(65536)
                outcomes[f"silent: closed after {round(time.monotonic() - t0)} s" + (" (with data)" if data else "")] += 1
            except ConnectionError:
                outcomes["silent: reset"] += 1
            except asyncio.CancelledError:  # the run ended first
                outcomes["silent: still open at the end"] += 1
                raise
            finally:
                writer.close()

    await asyncio.gather(*[one() for _ in range(args.silent_sockets)])


# ------------------------------------------------------------------ one run


async def run(args, base_url: str, hostile: int) -> tuple[dict, collections.Counter]:
    from openai import AsyncOpenAI

    api = AsyncOpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=600)
    await api.chat.completions.create(model=args.model, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    url = urlsplit(base_url)
    stop, outcomes = asyncio.Event(), collections.Counter()
    kinds = [big, slow, silent]
    tasks = [asyncio.create_task(kinds[i % 3](url.hostname, url.port, args, outcomes, stop)) for i in range(hostile)]
    if hostile:
        await asyncio.sleep(args.hostile_head_start)  # the hostile clients are at it before the streams start
    results: list[dict] = []
    todo = make_prompts(args.requests, args.prompt_words)[::-1]
    t0 = time.perf_counter()
    await asyncio.gather(*[client(api, args, todo, math.inf, results) for _ in range(args.clients)])
    wall = time.perf_counter() - t0
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await api.close()
    ok = [r for r in results if r["ok"]]
    errors = [r["error"] for r in results if not r["ok"]]
    for e in errors[:5]:
        print("error:", e, file=sys.stderr)
    itl = [x for r in ok for x in r["itl"]]
    ttft = [r["ttft"] for r in ok]
    return {
        "hostile": hostile, "requests": len(results), "errors": len(errors), "wall_s": round(wall, 1),
        "output_tokens_per_s": round(len(ok) * args.max_tokens / wall, 1),
        "ttft_p50_ms": round(percentile(ttft, 50) * 1e3), "ttft_p99_ms": round(percentile(ttft, 99) * 1e3),
        "itl_p50_ms": round(percentile(itl, 50) * 1e3, 1), "itl_p99_ms": round(percentile(itl, 99) * 1e3, 1),
    }, outcomes


def server_counts(base_url: str) -> dict:
    """What the server says it refused and closed (/metrics)."""
    import httpx

    text = httpx.get(base_url.removesuffix("/v1") + "/metrics", timeout=60).text
    out = {}
    for line in text.splitlines():
        if line.startswith(("galerne_requests_total{", "galerne_http_connections_closed_total{")):
            name, value = line.rsplit(" ", 1)
            out[name.replace('model="bench",', "").replace(',model="bench"', "")] = int(float(value))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench", help="model id to request")
    ap.add_argument("--model-shape", default="cpu-125m", choices=sorted(SHAPES), help="benchmark model to serve")
    ap.add_argument("--device", default=None)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0)
    ap.add_argument("--clients", type=int, default=200)
    ap.add_argument("--requests", type=int, default=400, help="requests of each run")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompt-words", type=int, default=50)
    ap.add_argument("--hostile", type=int, default=20, help="hostile clients of the second run")
    ap.add_argument("--big-mb", type=float, default=16.0, help="size of the big bodies (MiB)")
    ap.add_argument("--silent-sockets", type=int, default=25, help="silent connections each silent client keeps")
    ap.add_argument("--hostile-pause", type=float, default=0.2, help="seconds a big-body client waits between bodies")
    ap.add_argument("--hostile-head-start", type=float, default=3.0)
    args = ap.parse_args()
    args.duration, args.baseline = 600.0, "none"

    proc, base_url = start_server(args)
    try:
        asyncio.run(run(args, base_url, 0))  # warm-up (the first batches of a size pay one-off costs): not counted
        alone, _ = asyncio.run(run(args, base_url, 0))
        attacked, outcomes = asyncio.run(run(args, base_url, args.hostile))
        counts = server_counts(base_url)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    ratio = attacked["itl_p99_ms"] / alone["itl_p99_ms"]
    print(f"{args.clients} streaming clients x {args.requests // args.clients} requests of {args.max_tokens} tokens, "
          f"{args.model_shape}")
    print(f"{'':>22}  {'alone':>10}  {f'+{args.hostile} hostile':>12}")
    for key in alone:
        print(f"{key:>22}  {alone[key]:>10}  {attacked[key]:>12}")
    print(f"{'p99 ITL ratio':>22}  {ratio:.2f} (must be <= 2)")
    print("hostile clients saw:")
    for k, v in sorted(outcomes.items()):
        print(f"  {v:5d}  {k}")
    print("the server counted:")
    for k, v in sorted(counts.items()):
        print(f"  {v:5d}  {k}")
    report("serve_hostile", {"model": args.model_shape, "clients": args.clients, "alone": alone, "hostile": attacked,
                             "itl_p99_ratio": round(ratio, 2), "hostile_outcomes": dict(outcomes), "server": counts})
    if alone["errors"] or attacked["errors"] or ratio > 2:
        sys.exit(1)


if __name__ == "__main__":
    main()

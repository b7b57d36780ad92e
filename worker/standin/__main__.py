"""`python -m worker.standin`: serve the rerank stand-in until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from worker.event_loop import new_event_loop
from worker.standin.config import StandinConfig, key_limits, parse_keys, parse_limits
from worker.standin.server import StandinServer

KEYS_ENV = "RERANK_STANDIN_KEYS"


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        config = _config(args)
    except ValueError as exc:
        parser.error(str(exc))
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(_serve(config, args.host, args.port, args.port_file))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m worker.standin",
        description="Stand-in of POST https://api.302.ai/jina/v1/rerank on loopback.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8302, help="0 picks a free port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here")
    parser.add_argument(
        "--keys",
        help=f"NAME=SECRET[@N],... or a JSON array of key objects, whose rpm and tpm "
        f"fields set those limits (default: ${KEYS_ENV})",
    )
    parser.add_argument("--rpm", default="", help="NAME=N,...: calls per window per key")
    parser.add_argument("--tpm", default="", help="NAME=N,...: tokens per window per key")
    parser.add_argument("--window-s", type=float, default=60, help="the rate window (60)")
    parser.add_argument(
        "--rate-limit-retry-after",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send Retry-After with a rate-limit 429 (--no-rate-limit-retry-after: none)",
    )
    parser.add_argument(
        "--token-factor", type=float, default=1, help="bill this times the stand-in's count"
    )
    parser.add_argument("--latency-ms", type=float, default=0)
    parser.add_argument("--latency-jitter-ms", type=float, default=0)
    parser.add_argument("--fault-429", type=float, default=0)
    parser.add_argument("--fault-5xx", type=float, default=0)
    parser.add_argument("--fault-drop", type=float, default=0)
    parser.add_argument("--fault-slow", type=float, default=0)
    parser.add_argument("--slow-ms", type=float, default=30000)
    parser.add_argument("--retry-after-s", type=float, default=1)
    parser.add_argument("--max-documents", type=int, default=2048)
    parser.add_argument("--image-tokens", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def _config(args: argparse.Namespace) -> StandinConfig:
    spec = args.keys or os.environ.get(KEYS_ENV, "")
    keys = parse_keys(spec)
    if not keys:
        raise ValueError(f"no keys: pass --keys or set {KEYS_ENV}")
    return StandinConfig(
        keys=keys,
        rpm={**key_limits(spec, "rpm"), **parse_limits(args.rpm, "rpm")},
        tpm={**key_limits(spec, "tpm"), **parse_limits(args.tpm, "tpm")},
        window_s=args.window_s,
        rate_limit_retry_after=args.rate_limit_retry_after,
        token_factor=args.token_factor,
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        fault_429=args.fault_429,
        fault_5xx=args.fault_5xx,
        fault_drop=args.fault_drop,
        fault_slow=args.fault_slow,
        slow_ms=args.slow_ms,
        retry_after_s=args.retry_after_s,
        max_documents=args.max_documents,
        image_tokens=args.image_tokens,
        seed=args.seed,
    )


async def _serve(config: StandinConfig, host: str, port: int, port_file: Path | None) -> None:
    server = StandinServer(config)
    await server.start(host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if port_file is not None:
            _write_atomically(port_file, f"{server.port}\n")
        print(f"standin listening on {server.base_url}", flush=True)
        await stop.wait()
    finally:
        await server.stop()


def _write_atomically(path: Path, text: str) -> None:
    """Rename into place so a reader polling for the file never sees it half written."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


if __name__ == "__main__":
    raise SystemExit(main())

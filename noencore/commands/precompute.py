"""``noencore precompute MANIFEST OUT_DIR``: encode a corpus into token shards."""
from __future__ import annotations

import argparse
import sys

from noencore.errors import NoencoreError, UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "precompute", help="encode a manifest's audio into EnCodec token shards",
        description="Decode, downmix, resample and segment the audio of MANIFEST (JSONL or CSV: "
                    "id, path, caption, optional split and metadata) and encode it with EnCodec "
                    "into memory-mapped token shards in OUT_DIR. Resumes an interrupted run; "
                    "re-running encodes only items not yet in OUT_DIR. Broken files are listed "
                    "in OUT_DIR/failures.jsonl.")
    p.add_argument("manifest", help="JSONL or CSV manifest")
    p.add_argument("out_dir", help="output directory of the token shards")
    p.add_argument("--codec", default="facebook/encodec_32khz",
                   help="hub id or local checkpoint of a MusicGen/EnCodec codec, or "
                        "'musicgen-32khz' / 'tiny' (random weights) (default %(default)s)")
    p.add_argument("--segment-seconds", type=float, default=30.0,
                   help="cut audio into windows of this length (default 30, as MusicGen trains)")
    p.add_argument("--batch-size", type=int, default=8, help="segments per encoder call (default 8)")
    p.add_argument("--workers", type=int, default=None,
                   help="decoding processes (default: up to 4, one core left to the encoder; 0 = "
                        "decode in the main process)")
    p.add_argument("--decode-timeout", type=float, default=120.0, metavar="SECONDS",
                   help="a file whose decoding makes no progress for this long (a named pipe, "
                        "stalled storage) is listed as failed and the run goes on (default "
                        "120; no limit with --workers 0)")
    p.add_argument("--device", default="cpu", help="device of the encoder (cpu, cuda, cuda:1)")
    p.add_argument("--encode-dtype", choices=("fp32", "bf16"), default="fp32",
                   help="encoder precision (default fp32: bf16 changes codes of some frames)")
    p.add_argument("--strict", action="store_true", help="stop with exit code 1 on any failure")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noencore.data.precompute import precompute

    if args.workers is not None and args.workers < 0:
        raise UsageError("--workers must be >= 0")
    if args.segment_seconds <= 0 or args.batch_size <= 0 or args.decode_timeout <= 0:
        raise UsageError("--segment-seconds, --batch-size and --decode-timeout must be positive")
    report = precompute(args.manifest, args.out_dir, codec=args.codec,
                        segment_seconds=args.segment_seconds, batch_size=args.batch_size,
                        workers=args.workers, strict=args.strict, device=args.device,
                        encode_dtype=args.encode_dtype, progress=not args.quiet,
                        decode_timeout=args.decode_timeout)
    if not report.changed:
        print(f"{args.out_dir}: up to date ({report.skipped} items, {report.segments} segments, "
              f"{report.hours:.3f} h); nothing to do")
    else:
        print(f"{args.out_dir}: encoded {report.encoded} items "
              f"({report.encoded_hours:.3f} h) in {report.seconds:.1f} s; kept {report.skipped}; "
              f"shards hold {report.segments} segments, {report.hours:.3f} h")
    if report.failures:
        print(f"{len(report.failures)} failure(s), listed in {args.out_dir}/failures.jsonl:",
              file=sys.stderr)
        for f in report.failures[:20]:
            print(f"  {f['id'] or '-'}: {f['reason']}", file=sys.stderr)
        if len(report.failures) > 20:
            print(f"  ... and {len(report.failures) - 20} more", file=sys.stderr)
    if args.strict and report.failures:  # precompute raises first; kept as a guard
        raise NoencoreError(f"{len(report.failures)} failure(s) (--strict)")
    return 0

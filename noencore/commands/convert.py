"""``noencore convert SRC DST``: a MusicGen from audiocraft's format to transformers', or back.

The LM's weights are copied exactly (``noencore.models.hf``); the T5 and the EnCodec go
with them. transformers' MusicGen needs a transformers EnCodec: an audiocraft model whose
codec is audiocraft's own (not ``facebook/encodec_32khz``) takes one with ``--codec``.
"""
from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "convert", help="convert a MusicGen between the audiocraft and transformers formats",
        description="Load a MusicGen in either format and write it in the other one (or the "
                    "one given with --to): audiocraft (state_dict.bin + "
                    "compression_state_dict.bin) or transformers (a folder "
                    "MusicgenForConditionalGeneration.from_pretrained loads).")
    p.add_argument("src", help="MusicGen: hub id, local folder (either format), hf:SPEC or "
                               "audiocraft:SPEC")
    p.add_argument("dst", help="output folder")
    p.add_argument("--to", choices=("hf", "audiocraft"), default=None,
                   help="output format (default: the other one)")
    p.add_argument("--codec", default=None,
                   help="EnCodec to write with the model instead of its own (a transformers "
                        "EnCodec for --to hf: hub id or local folder)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from noencore.data.codec import load_codec
    from noencore.models.musicgen import load_musicgen, save_musicgen

    model = load_musicgen(args.src, with_codec=args.codec is None)
    if args.codec is not None:
        model.use_codec(load_codec(args.codec))
    to = args.to or ("audiocraft" if model.format == "hf" else "hf")
    folder = save_musicgen(model, args.dst, format=to)
    print(f"{args.src} ({model.format}) -> {folder} ({to})")
    return 0

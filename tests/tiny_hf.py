"""A tiny random-weight transformers MusicGen saved to disk as transformers saves it.

T5: noencore's tiny test encoder recipe (d_model 32) with another seed than the "tiny"
named model's, so the two are different encoders, and its tokenizer; EnCodec: 32 kHz, hop
640 (50 frames/s), 4 codebooks of 2048 at 2.2 kbps, few channels; decoder: width 64,
4 heads, 2 layers. ``decoder`` overrides any decoder config field.
"""
from __future__ import annotations

from pathlib import Path

import torch

ENCODEC = dict(sampling_rate=32000, audio_channels=1, num_filters=4, hidden_size=32,
               codebook_size=2048, codebook_dim=32, upsampling_ratios=[8, 5, 4, 4],
               target_bandwidths=[2.2], num_lstm_layers=1, num_residual_layers=1,
               normalize=False, chunk_length_s=None, overlap=None, use_causal_conv=False)
DECODER = dict(vocab_size=2048, num_codebooks=4, hidden_size=64, num_hidden_layers=2,
               num_attention_heads=4, ffn_dim=256, max_position_embeddings=512,
               decoder_start_token_id=2048, pad_token_id=2048, bos_token_id=2048)


def build_tiny_hf(folder: Path, *, seed: int = 0, tokenizer: bool = True,
                  **decoder) -> Path:
    """Write a ``MusicgenForConditionalGeneration`` (+ the T5 tokenizer) to ``folder``."""
    from transformers import (
        AutoTokenizer,
        EncodecConfig,
        EncodecModel,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenForConditionalGeneration,
        T5EncoderModel,
    )

    from noencore.hfhub import quiet_transformers
    from noencore.models.text import build_random_t5

    t5_dir = build_random_t5(Path(folder).parent / f"{Path(folder).name}-t5", seed=seed + 1)
    with quiet_transformers(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        t5 = T5EncoderModel.from_pretrained(t5_dir)
        enc_cfg = EncodecConfig(**ENCODEC)
        config = MusicgenConfig(text_encoder=t5.config, audio_encoder=enc_cfg,
                                decoder=MusicgenDecoderConfig(**{**DECODER, **decoder}))
        model = MusicgenForConditionalGeneration(config=config, text_encoder=t5,
                                                 audio_encoder=EncodecModel(enc_cfg))
        model.save_pretrained(folder)
        if tokenizer:
            AutoTokenizer.from_pretrained(t5_dir).save_pretrained(folder)
    return Path(folder)

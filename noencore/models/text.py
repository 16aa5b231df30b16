"""The frozen text encoder (T5) and the text-condition cache.

MusicGen conditions on captions through a frozen T5 encoder followed by a trainable
linear projection (``output_proj``) whose output the transformer cross-attends to.
The frozen half runs once per caption, here, and its outputs are stored beside the
shards (``SHARDS/conditions/``); training only applies the projection, so T5 is never
resident during unlearning.

Cache layout (one folder)::

    conditions/index.json             {"format": 1, "encoder": NAME, "dim": D,
                                       "fingerprint": hub name or hash of the local folder}
    conditions/<sha256(caption)[:32]>.safetensors
        tensors: "embeds" float32 [L, D]  (T5 last hidden state, L = token count)
                 "mask"   bool    [L]     (T5 attention mask; all False for "")
        metadata: caption, encoder, sha256 of the tensor bytes (checked on read)

Files are written under a temporary name and renamed, so a crash never leaves a
cache entry that reads as valid.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from noencore.errors import NoencoreError
from noencore.fileio import atomic_write
from noencore.thirdparty import quiet_audiocraft

CACHE_FORMAT = 1
RANDOM_T5_VERSION = 1  # bump when a random encoder's recipe changes: its cache folder is keyed by it

# Captions the tiny encoder's tokenizer is trained on (any text still tokenizes).
_TINY_T5_CORPUS = [
    "a calm piano piece with soft strings", "energetic rock song with electric guitar and drums",
    "jazz saxophone solo over a walking bass", "ambient synth pad, slow and dreamy",
    "upbeat pop track with catchy vocals", "orchestral film score with brass and timpani",
    "lofi hip hop beat with vinyl crackle", "folk acoustic guitar and harmonica",
    "electronic dance music with heavy bass drops", "classical string quartet in a minor key",
]


def caption_key(caption: str) -> str:
    """The cache key of a caption: hex sha256 of its UTF-8 bytes, first 32 characters."""
    return hashlib.sha256(caption.encode("utf-8")).hexdigest()[:32]


def encoder_fingerprint(name: str) -> str:
    """Identity of a text encoder: its hub name, or for a local folder a hash of its config
    and of the size, head and tail of each weight file (cheap even for T5-large), so the
    same encoder copied to another path is recognised."""
    folder = Path(name)
    if not (folder / "config.json").is_file():
        return name
    h = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read(1 << 20))
    return "local:" + h.hexdigest()[:32]


def register_t5(name: str, dim: int) -> None:
    """Let audiocraft's ``T5Conditioner`` load the encoder ``name`` (a local folder).

    audiocraft accepts only a fixed list of hub T5 names; a local encoder (the tiny test
    encoder, or a user's own copy of t5-base on disk) must be added to that list before
    ``builders.get_lm_model`` or ``MusicGen.get_pretrained`` builds a model naming it.
    Idempotent.
    """
    with quiet_audiocraft():
        from audiocraft.modules.conditioners import T5Conditioner

    if name not in T5Conditioner.MODELS:
        T5Conditioner.MODELS.append(name)
    T5Conditioner.MODELS_DIMS[name] = int(dim)


# The random T5 encoders of the named model configs: their shapes (transformers'
# ``T5Config`` fields; every one has fixed-seed weights and the tokenizer of
# ``build_random_t5``).
RANDOM_T5: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
             "relative_attention_num_buckets": 8},
    # T5-base's width (d_model 768, 12 heads of 64, d_ff 3072) with 2 of its 12 layers: the
    # LM sees only the encoder's [L, 768] outputs, which are cached once before training,
    # so the depth changes nothing downstream of the cache, and the copy audiocraft's T5
    # conditioner keeps in every process stays small (60 MB instead of 440 MB).
    "base-width": {"d_model": 768, "d_kv": 64, "d_ff": 3072, "num_layers": 2, "num_heads": 12,
                   "relative_attention_num_buckets": 32},
}


def random_t5_folder(size: str = "tiny", root: str | os.PathLike | None = None) -> Path:
    """Where the random T5 ``size`` (a key of :data:`RANDOM_T5`: encoder + tokenizer)
    lives; built on first use.

    ``root`` defaults to ``$NOENCORE_CACHE`` or ``~/.cache/noencore``. The encoder has
    fixed-seed random weights, so every machine builds the same one.
    """
    if size not in RANDOM_T5:
        raise ValueError(f"no random T5 {size!r}: choose one of {sorted(RANDOM_T5)}")
    base = Path(root or os.environ.get("NOENCORE_CACHE") or Path.home() / ".cache" / "noencore")
    folder = base / (f"tiny-t5-v{RANDOM_T5_VERSION}" if size == "tiny"
                     else f"t5-{size}-v{RANDOM_T5_VERSION}")
    if not (folder / "config.json").exists():
        build_random_t5(folder, size=size)
    return folder


def tiny_t5_folder(root: str | os.PathLike | None = None) -> Path:
    """The tiny random T5 (d_model 32, 2 layers): :func:`random_t5_folder` ``("tiny")``."""
    return random_t5_folder("tiny", root)


def build_random_t5(folder: str | os.PathLike, seed: int = 0, size: str = "tiny") -> Path:
    """Write a random ``T5EncoderModel`` of shape ``RANDOM_T5[size]`` and an offline
    tokenizer to ``folder``.

    The tokenizer is a unigram model trained on the fly on a few captions (no download);
    it loads with ``transformers.T5Tokenizer.from_pretrained(folder)`` as audiocraft does.
    Built in a temporary sibling folder and renamed, so a half-built encoder is never used.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=256, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(_TINY_T5_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                   unk_token="<unk>")
    fast.save_pretrained(tmp)
    cfg = T5Config(vocab_size=tok.get_vocab_size(), **RANDOM_T5[size], dropout_rate=0.0,
                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        T5EncoderModel(cfg).save_pretrained(tmp)
    try:
        os.replace(tmp, folder)
    except OSError:
        # another process built it first: keep theirs (same seed, same weights)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").exists():
            raise
    return folder


class TextEncoder:
    """The frozen T5 half of MusicGen's text conditioner, run without the projection.

    ``name`` is a hub id (``t5-base``, read from the local HF cache when offline) or a local
    folder holding ``config.json`` + weights + tokenizer files.
    """

    def __init__(self, name: str, device: str | torch.device = "cpu"):
        from transformers import T5EncoderModel, T5Tokenizer

        self.name = name
        self.device = torch.device(device)
        try:
            self.tokenizer = T5Tokenizer.from_pretrained(name)
            self.model = T5EncoderModel.from_pretrained(name).to(self.device).eval()
        except OSError as exc:
            raise NoencoreError(
                f"text encoder {name!r} could not be loaded ({exc}); give a local T5 folder "
                "or make the hub id available in the Hugging Face cache") from exc
        self.dim = int(self.model.config.d_model)

    @torch.no_grad()
    def encode(self, captions: Sequence[str]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Encode captions one padded batch at a time.

        Returns one ``(embeds float32 [L_i, D], mask bool [L_i])`` per caption, unpadded
        (``L_i`` = that caption's token count). An empty caption keeps its tokens with an
        all-False mask, as audiocraft's ``T5Conditioner.tokenize`` does.
        """
        entries = list(captions)
        inputs = self.tokenizer(entries, return_tensors="pt", padding=True).to(self.device)
        hidden = self.model(**inputs).last_hidden_state.float()
        out = []
        for i, cap in enumerate(entries):
            n = int(inputs["attention_mask"][i].sum())
            mask = inputs["attention_mask"][i, :n].bool()
            if cap == "":
                mask = torch.zeros_like(mask)
            out.append((hidden[i, :n].cpu().contiguous(), mask.cpu()))
        return out


def _tensor_digest(embeds: torch.Tensor, mask: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(embeds.contiguous().numpy().tobytes())
    h.update(mask.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@contextlib.contextmanager
def _entry(path: Path) -> Iterator[Any]:
    """An open cache entry; a damaged one (header, tensors) is one line naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            yield fh
    except (SafetensorError, KeyError) as exc:
        raise NoencoreError(f"{path}: damaged condition-cache entry ({exc}); delete it and "
                            "rerun `noencore condition`") from None


class ConditionCache:
    """Cached T5 outputs per caption, in a folder (usually ``SHARDS/conditions``).

    ``get(caption)`` returns ``(embeds float32 [L, D], mask bool [L])`` after checking the
    stored checksum; ``batch(captions)`` pads them into ``embeds [B, Lmax, D]`` and
    ``mask bool [B, Lmax]``.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "index.json"
        if not index.exists():
            raise NoencoreError(
                f"{self.folder}: no text-condition cache (index.json missing); run "
                "`noencore condition SHARDS --model MODEL` first")
        meta = json.loads(index.read_text())
        if meta.get("format") != CACHE_FORMAT:
            raise NoencoreError(f"{index}: cache format {meta.get('format')} is not "
                                f"{CACHE_FORMAT}; rebuild it with `noencore condition`")
        self.encoder: str = meta["encoder"]
        self.fingerprint: str = meta.get("fingerprint", self.encoder)
        self.dim: int = int(meta["dim"])
        self._memo: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._length: int | None = None

    @property
    def length(self) -> int:
        """The longest condition in the cache (T5 tokens), read once from the entries'
        headers. Every batch is padded to it: audiocraft's cross-attention attends to
        padded positions as well, so padding to the longest caption *of the batch* would
        make a row's output depend on which captions share its batch, and splitting a
        step over ranks or micro-batches would change the result."""
        if self._length is None:
            longest = 1
            for f in self.folder.glob("*.safetensors"):
                with _entry(f) as fh:
                    longest = max(longest, fh.get_slice("mask").get_shape()[0])
            self._length = longest
        return self._length

    def path(self, caption: str) -> Path:
        return self.folder / f"{caption_key(caption)}.safetensors"

    def __contains__(self, caption: str) -> bool:
        return self.path(caption).exists()

    def get(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        if caption in self._memo:
            return self._memo[caption]
        path = self.path(caption)
        if not path.exists():
            raise NoencoreError(f"{self.folder}: no cached condition for caption {caption!r}; "
                                "rerun `noencore condition` on these shards")
        with _entry(path) as fh:
            meta = fh.metadata() or {}
            embeds, mask = fh.get_tensor("embeds"), fh.get_tensor("mask")
        if meta.get("caption") != caption or meta.get("sha256") != _tensor_digest(embeds, mask):
            raise NoencoreError(f"{path}: checksum or caption mismatch (corrupt cache entry); "
                                "delete it and rerun `noencore condition`")
        self._memo[caption] = (embeds, mask)
        return embeds, mask

    def batch(self, captions: Sequence[str], present: Sequence[bool] | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(embeds float32 [B, L, D], mask bool [B, L])`` for ``captions``, padded to
        ``L = self.length`` (the cache's longest condition, whatever the batch).

        ``present`` (bool per row, default all True): rows marked False (the empty rows
        that even out ranks) get a zero, fully masked condition and need no cache entry.
        """
        present = [True] * len(captions) if present is None else [bool(x) for x in present]
        items = [self.get(c) if keep else None for c, keep in zip(captions, present)]
        lmax = max([self.length] + [e.shape[0] for e, _ in filter(None, items)])
        embeds = torch.zeros(len(items), lmax, self.dim)
        mask = torch.zeros(len(items), lmax, dtype=torch.bool)
        for i, item in enumerate(items):
            if item is not None:
                e, m = item
                embeds[i, : e.shape[0]] = e
                mask[i, : m.shape[0]] = m
        return embeds, mask


def build_condition_cache(folder: str | os.PathLike, captions: Iterable[str], encoder: str,
                          *, batch_size: int = 32, device: str = "cpu",
                          progress: bool = True) -> ConditionCache:
    """Run the frozen T5 ``encoder`` once per distinct caption and store its outputs.

    Captions already cached are skipped (the job resumes after a crash). A cache built by
    another encoder is refused: mixing encoders would silently feed wrong conditions. The
    folder is locked while the job writes (``noencore.outputs.lock``).
    """
    from noencore.outputs import lock

    folder = Path(folder)
    with lock(folder, "condition"):  # one writer at a time; it only adds files
        return _fill_cache(folder, captions, encoder, batch_size, device, progress)


def _fill_cache(folder: Path, captions: Iterable[str], encoder: str, batch_size: int,
                device: str, progress: bool) -> ConditionCache:
    from safetensors.torch import save

    index = folder / "index.json"
    enc = TextEncoder(encoder, device=device)
    if index.exists():
        try:
            meta = json.loads(index.read_text())
        except (OSError, ValueError) as exc:
            raise NoencoreError(f"{index}: unreadable ({exc}); not a text-condition cache: "
                                "give another folder") from None
        if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
            raise NoencoreError(f"{index}: not a noencore text-condition cache index; give "
                                "another folder (nothing in it is changed)")
        if meta.get("fingerprint") != encoder_fingerprint(encoder) or \
                int(meta.get("dim", -1)) != enc.dim:
            raise NoencoreError(f"{index}: cache was built with encoder {meta.get('encoder')!r} "
                                f"(dim {meta.get('dim')}), not {encoder!r}; use another folder "
                                "or delete this one")
    else:
        atomic_write(index, json.dumps(
            {"format": CACHE_FORMAT, "encoder": encoder, "dim": enc.dim,
             "fingerprint": encoder_fingerprint(encoder)}).encode())
    todo = sorted({c for c in captions if not (folder / f"{caption_key(c)}.safetensors").exists()})
    from noencore.progress import progress as progress_bar

    bar = progress_bar(total=len(todo), desc="text conditions", unit="caption",
                       disable=not progress or not todo)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start: start + batch_size]
        for cap, (embeds, mask) in zip(chunk, enc.encode(chunk)):
            blob = save({"embeds": embeds, "mask": mask},
                        metadata={"caption": cap, "encoder": encoder,
                                  "sha256": _tensor_digest(embeds, mask)})
            atomic_write(folder / f"{caption_key(cap)}.safetensors", blob)
        bar.update(len(chunk))
    bar.close()
    return ConditionCache(folder)

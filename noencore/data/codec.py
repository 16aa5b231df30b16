"""EnCodec, the compression model MusicGen tokenizes audio with (audiocraft's implementation).

``load_codec(spec)`` accepts:

- ``"tiny"``: a small random-weight EnCodec with a fixed seed (32 kHz, 50 frames/s,
  n_q=4, card=2048), for tests and the demo;
- ``"musicgen-32khz"``: the full-size architecture of the codec MusicGen uses
  (audiocraft's ``encodec_large_nq4_s640``: SEANet dimension 128, 64 filters, ratios
  [8, 5, 4, 4], 2 LSTM layers, RVQ n_q=4 x 2048) with random weights, for benchmarks;
- a local file or folder holding an audiocraft ``compression_state_dict.bin``, a
  local Hugging Face ``EncodecModel`` folder (``config.json`` + weights), or a local
  transformers MusicGen folder (its ``audio_encoder``);
- a hub id (``facebook/musicgen-small``, ``facebook/encodec_32khz``, a transformers
  MusicGen repo, ...), fetched with ``huggingface_hub`` the way audiocraft's loaders do.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from noencore.errors import NoencoreError
from noencore.fileio import load_torch
from noencore.thirdparty import quiet_audiocraft

STATE_FILE = "compression_state_dict.bin"
PROBE_SECONDS = 1.0
# fewest share of equal probe codes for two codecs to count as one: a codec on another CPU
# may flip a near-tie code or two, a different codec agrees on about 1 / card of them
SAME_CODEC_AGREEMENT = 0.9
BUILTIN_SPECS = ("tiny", "musicgen-32khz")


def _encodec_config(spec: str) -> dict[str, Any]:
    """The audiocraft config (as a plain dict) of a built-in codec spec."""
    # Random codebooks: kmeans_init=False makes the RVQ start from kaiming-uniform
    # embeddings; with kmeans_init=True they stay zero until trained and every code is 0.
    rvq = {"n_q": 4, "bins": 2048, "q_dropout": False, "decay": 0.99, "kmeans_init": False,
           "kmeans_iters": 50, "threshold_ema_dead_code": 2, "orthogonal_reg_weight": 0.0,
           "orthogonal_reg_active_codes_only": False}
    seanet = {"dimension": 128, "channels": 1, "causal": False, "n_filters": 64,
              "n_residual_layers": 1, "ratios": [8, 5, 4, 4], "activation": "ELU",
              "activation_params": {"alpha": 1.0}, "norm": "weight_norm", "norm_params": {},
              "kernel_size": 7, "residual_kernel_size": 3, "last_kernel_size": 7,
              "dilation_base": 2, "pad_mode": "constant", "true_skip": True, "compress": 2,
              "lstm": 2, "disable_norm_outer_blocks": 0,
              "decoder": {"trim_right_ratio": 1.0, "final_activation": None,
                          "final_activation_params": None},
              "encoder": {}}
    if spec == "tiny":
        # Same hop (640 samples = 50 frames/s at 32 kHz) and RVQ, far fewer channels.
        seanet.update(dimension=32, n_filters=4, lstm=0)
    elif spec != "musicgen-32khz":
        raise ValueError(f"not a built-in codec spec: {spec!r} (choose from {BUILTIN_SPECS})")
    return {"compression_model": "encodec", "sample_rate": 32000, "channels": 1,
            "device": "cpu",
            "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": 32000,
                        "channels": 1, "causal": False, "renormalize": False},
            "seanet": seanet, "rvq": rvq}


class Codec:
    """An audiocraft compression model plus the facts the shards record.

    Attributes: ``spec`` (the string it was loaded from), ``sample_rate`` (Hz),
    ``frame_rate`` (frames/s), ``hop`` (samples per frame), ``n_q`` (codebooks),
    ``card`` (codes per codebook), ``model`` (``audiocraft CompressionModel``, eval mode).
    """

    def __init__(self, model: torch.nn.Module, spec: str, cfg: dict[str, Any] | None = None):
        self.model = model.eval()
        self.spec = spec
        self._cfg = cfg
        self.sample_rate = int(model.sample_rate)
        self.frame_rate = int(round(model.frame_rate))
        self.n_q = int(model.num_codebooks)
        self.card = int(model.cardinality)
        if self.sample_rate % self.frame_rate:
            raise NoencoreError(f"codec {spec}: sample rate {self.sample_rate} is not a "
                                f"multiple of its frame rate {self.frame_rate}")
        self.hop = self.sample_rate // self.frame_rate
        self._identity: dict[str, Any] | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def identity(self) -> dict[str, Any]:
        """What token shards record of the codec that made them (``layout.HEADER``'s
        ``codec_identity``): ``name`` (the spec), ``weights_sha256`` (of every parameter
        and buffer, in name order) and ``probe_codes`` (the codes of ``PROBE_SECONDS`` of
        a fixed signal). Two codecs tokenise alike when their probe codes agree
        (``same_codec``): the same weights saved in audiocraft's and transformers' format
        have different names but give the same codes. Computed once per codec."""
        if self._identity is None:
            h = hashlib.sha256()
            for name, t in sorted(self.model.state_dict().items()):
                t = t.detach().to("cpu").contiguous()
                h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
                h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            with one_thread():  # one summation order: the same codes in every process
                probe = self.encode(probe_signal(self.sample_rate)[None, None])[0]
            self._identity = {"name": self.spec, "weights_sha256": h.hexdigest(),
                              "probe_codes": probe.tolist()}
        return self._identity

    @property
    def transformers_model(self) -> torch.nn.Module | None:
        """The transformers ``EncodecModel`` inside, for a codec loaded from the
        transformers format (which transformers' MusicGen needs); else None."""
        return None if self._cfg is not None else getattr(self.model, "model", None)

    def frames_for(self, samples: int) -> int:
        """Frames the codec emits for ``samples`` samples: ceil(samples / hop)."""
        return -(-int(samples) // self.hop)

    @torch.inference_mode()
    def encode(self, wav: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Encode audio to codes.

        wav: float [B, 1, S] at ``sample_rate``. dtype: compute dtype of the encoder
        (None = fp32; bf16 runs the encoder under autocast, the RVQ stays fp32).
        Returns long [B, n_q, ceil(S / hop)].
        """
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise ValueError(f"Codec.encode expects wav [B, 1, S], got {tuple(wav.shape)}")
        wav = wav.to(self.device, torch.float32)
        if dtype is None or dtype == torch.float32:
            codes, _ = self.model.encode(wav)
        else:
            # The RVQ's nearest-code search is kept in fp32: bf16 distances flip codes.
            with torch.autocast(self.device.type, dtype=dtype):
                emb = self.model.encoder(wav)
            codes = self.model.quantizer.encode(emb.float())
        return codes.long()

    @torch.inference_mode()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Decode codes long [B, n_q, F] to audio float32 [B, 1, F * hop]."""
        if codes.dim() != 3 or codes.shape[1] != self.n_q:
            raise ValueError(f"Codec.decode expects codes [B, {self.n_q}, F], "
                             f"got {tuple(codes.shape)}")
        return self.model.decode(codes.to(self.device).long()).float()

    def save_audiocraft(self, path: str | os.PathLike) -> Path:
        """Write the codec as audiocraft's ``compression_state_dict.bin`` (atomically).

        ``path``: a ``.bin`` file, or a folder that receives ``compression_state_dict.bin``.
        Only codecs built from an audiocraft config (built-in specs or loaded from such a
        file) can be saved. Returns the file written.
        """
        from omegaconf import OmegaConf

        if self._cfg is None:
            raise NoencoreError(f"codec {self.spec}: no audiocraft config to save it with "
                                "(Hugging Face EnCodec models are saved by transformers)")
        path = Path(path)
        file = path if path.suffix == ".bin" else path / STATE_FILE
        file.parent.mkdir(parents=True, exist_ok=True)
        pkg = {"best_state": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
               "xp.cfg": OmegaConf.to_yaml(OmegaConf.create(self._cfg)),
               "exported": True, "version": "noencore"}
        fd, tmp = tempfile.mkstemp(prefix=f".{file.name}.", dir=file.parent)
        os.close(fd)
        try:
            torch.save(pkg, tmp)
            os.replace(tmp, file)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return file


@torch.no_grad()
def _spread_codebooks(model: torch.nn.Module) -> None:
    """Give a random-weight RVQ codebooks that tile its encoder's actual outputs.

    Kaiming-uniform codebooks sit far from what a random encoder emits, so nearly every
    frame maps to the same one or two codes; tests then could not tell codes apart.
    Each layer instead takes its codes from the residuals of a fixed synthetic signal
    (what k-means initialisation would start from). Uses the caller's RNG state.
    """
    t = torch.arange(8000, dtype=torch.float32) / 32000  # 4 x 0.25 s: 200 frames
    freqs = torch.tensor([110.0, 220.0, 330.0, 523.0]).view(4, 1)
    wav = (0.3 * torch.sin(2 * torch.pi * freqs * t) * torch.rand(4, 1)
           + 0.05 * torch.randn(4, t.numel())).view(4, 1, -1)
    emb = model.encoder(wav)  # [B, D, F]
    residual = emb.transpose(1, 2).reshape(-1, emb.shape[1])  # [N, D]
    for layer in model.quantizer.vq.layers:
        book = layer._codebook
        pick = torch.randint(residual.shape[0], (book.embed.shape[0],))
        jitter = 0.05 * residual.std() * torch.randn_like(book.embed)
        book.embed.copy_(residual[pick] + jitter)
        book.embed_avg.copy_(book.embed)
        residual = residual - book.embed[torch.cdist(residual, book.embed).argmin(dim=1)]


def _build(cfg: dict[str, Any], device: str) -> torch.nn.Module:
    from omegaconf import OmegaConf

    conf = OmegaConf.create(cfg)
    conf.device = str(device)
    with quiet_audiocraft():
        from audiocraft.models import builders

        return builders.get_compression_model(conf)


def _load_pkg(file: Path, trust_pickle: bool = False) -> dict[str, Any]:
    """An audiocraft checkpoint, read without running code from it (``load_torch``);
    older exports pickle omegaconf objects and are refused unless ``trust_pickle``."""
    return load_torch(file, what="codec checkpoint", trust_pickle=trust_pickle)


def _from_pkg(pkg: dict[str, Any], spec: str, device: str, folder: Path | None = None,
              trust_pickle: bool = False) -> Codec:
    from omegaconf import OmegaConf

    if "pretrained" in pkg:  # MusicGen checkpoints only name the codec they were trained with
        name = str(pkg["pretrained"])
        # a relative name is a folder beside the checkpoint (a converted transformers
        # MusicGen keeps its EnCodec there), so the pair can be moved together
        if folder is not None and not Path(name).is_absolute() and (folder / name).is_dir():
            name = str(folder / name)
        return load_codec(name, device, trust_pickle=trust_pickle)
    if "xp.cfg" not in pkg or "best_state" not in pkg:
        raise NoencoreError(f"codec checkpoint {spec} has neither 'pretrained' nor "
                            "'xp.cfg' + 'best_state': not an audiocraft compression model")
    conf = OmegaConf.create(pkg["xp.cfg"])  # a YAML string (exports) or a dict
    cfg_dict = OmegaConf.to_container(conf, resolve=True)
    model = _build(cfg_dict, device)
    model.load_state_dict(pkg["best_state"])
    return Codec(model, spec, cfg_dict)


def hf_codec(model: torch.nn.Module, spec: str, device: str | torch.device = "cpu") -> Codec:
    """A transformers ``EncodecModel`` as a ``Codec`` (through audiocraft's own wrapper)."""
    with quiet_audiocraft():
        from audiocraft.models.encodec import HFEncodecCompressionModel

    return Codec(HFEncodecCompressionModel(model).to(device), spec)


def _from_hf(name_or_dir: str, spec: str, device: str) -> Codec:
    """A transformers EnCodec folder, or the EnCodec inside a transformers MusicGen."""
    from transformers import EncodecModel

    from noencore.hfhub import is_musicgen, load_part

    if is_musicgen(name_or_dir):
        return hf_codec(load_part(EncodecModel, name_or_dir, "audio_encoder"), spec, device)
    return hf_codec(EncodecModel.from_pretrained(name_or_dir), spec, device)


def load_codec(spec: str, device: str | torch.device = "cpu", *,
               trust_pickle: bool = False) -> Codec:
    """Load the EnCodec compression model named by ``spec`` (see the module doc), in eval
    mode. A checkpoint that only the full unpickler reads is refused unless
    ``trust_pickle`` (``noencore.fileio.load_torch``)."""
    device = str(device)
    if spec in BUILTIN_SPECS:
        cfg = _encodec_config(spec)
        # A fixed seed, without disturbing the caller's random state.
        # one thread: weight norm's g is a reduction, the same bits in every process
        with torch.random.fork_rng(devices=[]), one_thread():
            torch.manual_seed(1234)
            model = _build(cfg, "cpu")
            _spread_codebooks(model)
        return Codec(model.to(device), spec, cfg)
    path = Path(spec)
    if path.is_file():
        return _from_pkg(_load_pkg(path, trust_pickle), spec, device, path.parent,
                         trust_pickle)
    if path.is_dir():
        if (path / STATE_FILE).is_file():
            return _from_pkg(_load_pkg(path / STATE_FILE, trust_pickle), spec, device, path,
                             trust_pickle)
        if (path / "config.json").is_file():
            return _from_hf(str(path), spec, device)
        raise NoencoreError(f"codec folder {path} holds neither {STATE_FILE} nor a Hugging "
                            "Face config.json: pass a MusicGen/EnCodec checkpoint folder")
    if spec.startswith((".", "/", "~")) or spec.count("/") != 1:  # hub ids are "org/name"
        raise NoencoreError(f"codec {spec}: no such file or folder, and not a hub id "
                            f"(org/name) or a built-in spec {BUILTIN_SPECS}")
    return _from_hub(spec, device, trust_pickle)


def _from_hub(repo_id: str, device: str, trust_pickle: bool = False) -> Codec:
    """A hub id: an audiocraft repo (MusicGen) ships compression_state_dict.bin; an
    EnCodec repo (facebook/encodec_32khz) is a transformers model."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    def unreachable(exc: Exception) -> NoencoreError:
        return NoencoreError(
            f"codec {repo_id}: cannot fetch it from the Hugging Face hub "
            f"({type(exc).__name__}); download the checkpoint where the hub is reachable "
            "and pass its local folder, or use --codec tiny / musicgen-32khz")

    try:
        file = hf_hub_download(repo_id=repo_id, filename=STATE_FILE,
                               cache_dir=os.environ.get("AUDIOCRAFT_CACHE_DIR"))
    except LocalEntryNotFoundError as exc:  # offline or unreachable (a subclass of the next)
        raise unreachable(exc) from exc
    except EntryNotFoundError:  # a transformers repo: an EnCodec, or a MusicGen holding one
        from noencore.hfhub import MUSICGEN_TYPE, read_config, snapshot

        try:
            config = Path(hf_hub_download(repo_id=repo_id, filename="config.json")).parent
            if read_config(config).get("model_type") == MUSICGEN_TYPE:
                return _from_hf(str(snapshot(repo_id)), repo_id, device)
            return _from_hf(repo_id, repo_id, device)
        except OSError as exc:
            raise unreachable(exc) from exc
    except Exception as exc:  # unknown repo, no access, network: one clear line
        raise unreachable(exc) from exc
    return _from_pkg(_load_pkg(Path(file), trust_pickle), repo_id, device, None, trust_pickle)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch's CPU ops on one thread inside (a reduction then sums in one order)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def probe_signal(sample_rate: int) -> torch.Tensor:
    """``PROBE_SECONDS`` of a fixed signal (float32 [S]): three tones, a chirp and seeded
    noise at moderate level, the same on every machine."""
    t = torch.arange(int(PROBE_SECONDS * sample_rate), dtype=torch.float64) / sample_rate
    tones = sum(torch.sin(2 * math.pi * f * t) for f in (110.0, 440.0, 1760.0)) / 3
    chirp = torch.sin(2 * math.pi * (200.0 * t + 2000.0 * t * t))
    noise = torch.rand(t.numel(), generator=torch.Generator().manual_seed(0),
                       dtype=torch.float64) - 0.5
    return (0.2 * tones + 0.1 * chirp + 0.05 * noise).float()


def same_codec(a: dict[str, Any], b: dict[str, Any]) -> tuple[bool, float]:
    """Whether two ``Codec.identity()`` records name codecs that tokenise alike, and the
    share of their probe codes that agree (1.0 for equal weights)."""
    if a.get("weights_sha256") and a.get("weights_sha256") == b.get("weights_sha256"):
        return True, 1.0
    pa, pb = a.get("probe_codes"), b.get("probe_codes")
    try:
        ta, tb = torch.tensor(pa), torch.tensor(pb)
    except (TypeError, ValueError):
        return False, 0.0
    if ta.shape != tb.shape or ta.numel() == 0:
        return False, 0.0
    agree = float((ta == tb).double().mean())
    return agree >= SAME_CODEC_AGREEMENT, agree


def check_shards_codec(codec: Codec | None, header: Any, shards_path: Any, owner: str,
                       allow_mismatch: bool = False) -> str | None:
    """Refuse shards (``header``: a ``ShardHeader``) encoded with another codec than
    ``codec`` (the codec of ``owner``, a model spec), unless ``allow_mismatch``. Returns a
    note when nothing could be compared (shards without a recorded identity, a model
    without its codec) or the mismatch was allowed; None when they match."""
    recorded = getattr(header, "identity", None)
    if codec is None or not recorded:
        missing = ("the model has no codec loaded" if codec is None else
                   f"{shards_path} records no codec identity (written before it was recorded)")
        return f"codec not compared: {missing}"
    same, agree = same_codec(recorded, codec.identity())
    if same:
        return None
    text = (f"{shards_path}: shards were encoded with codec {recorded.get('name')!r}, which "
            f"tokenises differently from {owner!r}'s codec {codec.spec!r} ({agree:.0%} of "
            f"the probe codes agree, {SAME_CODEC_AGREEMENT:.0%} needed)")
    if allow_mismatch:
        return text + "; allowed by --allow-codec-mismatch"
    raise NoencoreError(text + "; precompute the shards with the model's codec (--codec), or "
                        "give --allow-codec-mismatch (allow_codec_mismatch=True) if you are "
                        "sure")

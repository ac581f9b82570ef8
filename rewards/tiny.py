"""Tiny, randomly initialised checkpoints of the hub rewards, in their published file layouts.

For offline tests and benchmarks: each ``write_*`` function saves a checkpoint with the real
architecture at toy sizes, in the layout the real loader reads (HPSv2's ``{"state_dict": ...}``
torch file, ImageReward's ``blip.*``/``mlp.*`` keys, a ``save_pretrained`` PickScore directory, an
aesthetic head ``.pth``), so the loaders are exercised from files. The scores mean nothing.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch

__all__ = ["TINY_OPEN_CLIP", "WORDS", "register_tiny_open_clip", "tiny_reward_builders", "write_aesthetic_head",
           "write_clip_tokenizer", "write_hpsv2", "write_hpsv3", "write_imagereward", "write_pickscore", "write_qwen2_vl"]

TINY_OPEN_CLIP = "TinyCLIP768-steerkit"
# A 768-d embedding, like ViT-L/14, so the real-size aesthetic head fits it.
_OPEN_CLIP_CONFIG = {
    "embed_dim": 768,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
WORDS = ["a", "an", "the", "photo", "of", "cat", "dog", "red", "blue", "car", "house", "tree", "on", "in"]


def register_tiny_open_clip(directory: str | Path) -> str:
    """Register the tiny open_clip architecture :data:`TINY_OPEN_CLIP` (config written to ``directory``)."""
    import open_clip

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{TINY_OPEN_CLIP}.json").write_text(json.dumps(_OPEN_CLIP_CONFIG))
    open_clip.add_model_config(directory)
    return TINY_OPEN_CLIP


def write_aesthetic_head(directory: str | Path, seed: int = 0, suffix: str = ".pth") -> Path:
    """A real-size aesthetic head (768-d input) with random weights, as ``.pth`` (torch.save) or ``.safetensors``."""
    head = _random_head(768, seed)
    path = Path(directory) / f"aesthetic-head{suffix}"
    _save(head.state_dict(), path)
    return path


def write_hpsv2(directory: str | Path, seed: int = 0, suffix: str = ".pt") -> Path:
    """A tiny open_clip model saved like HPSv2's checkpoint (``{"state_dict": ...}``); needs :func:`register_tiny_open_clip`."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.create_model(TINY_OPEN_CLIP, pretrained=None)
    path = Path(directory) / f"HPS_v2.1_compressed{suffix}"
    if suffix == ".safetensors":
        _save(model.state_dict(), path)
    else:
        torch.save({"state_dict": {k: v.half() for k, v in model.state_dict().items()}}, path)
    return path


def _clip_tokenizer():
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for character in string.ascii_lowercase:
        vocab[character] = len(vocab)
        vocab[character + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[])


def write_pickscore(directory: str | Path, seed: int = 0, with_tokenizer: bool = True) -> Path:
    """A tiny transformers ``CLIPModel`` (and a character-level CLIP tokenizer) saved with ``save_pretrained``."""
    from transformers import CLIPConfig, CLIPModel

    tokenizer = _clip_tokenizer()
    config = CLIPConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 0, "eos_token_id": 1,
                     "pad_token_id": 1},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 8},
        projection_dim=16)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    if with_tokenizer:
        tokenizer.save_pretrained(directory)
    return directory


def write_clip_tokenizer(directory: str | Path) -> Path:
    """The tiny CLIP tokenizer alone (for a processor directory separate from the model)."""
    _clip_tokenizer().save_pretrained(directory)
    return Path(directory)


def write_imagereward(directory: str | Path, seed: int = 0, width: int = 64, layers: int = 2, text_width: int = 64,
                      patch: int = 8, image_size: int = 32) -> Path:
    """A tiny ImageReward checkpoint with BLIP's original key names, and a BERT ``vocab.txt``, in ``directory``."""
    from transformers import BlipTextConfig, BlipTextModel

    generator = torch.Generator().manual_seed(seed)

    def weight(*shape):
        return torch.randn(*shape, generator=generator) * shape[-1] ** -0.5

    def norm(n):
        return 1 + 0.1 * torch.randn(n, generator=generator), 0.1 * torch.randn(n, generator=generator)

    state = {}
    v = "blip.visual_encoder."
    state[v + "cls_token"] = 0.1 * torch.randn(1, 1, width, generator=generator)
    state[v + "pos_embed"] = 0.1 * torch.randn(1, (image_size // patch) ** 2 + 1, width, generator=generator)
    state[v + "patch_embed.proj.weight"] = weight(width, 3, patch, patch) / patch
    state[v + "patch_embed.proj.bias"] = 0.1 * torch.randn(width, generator=generator)
    for i in range(layers):
        b = f"{v}blocks.{i}."
        state[b + "norm1.weight"], state[b + "norm1.bias"] = norm(width)
        state[b + "attn.qkv.weight"], state[b + "attn.qkv.bias"] = weight(3 * width, width), 0.1 * torch.randn(
            3 * width, generator=generator)
        state[b + "attn.proj.weight"], state[b + "attn.proj.bias"] = weight(width, width), torch.zeros(width)
        state[b + "norm2.weight"], state[b + "norm2.bias"] = norm(width)
        state[b + "mlp.fc1.weight"], state[b + "mlp.fc1.bias"] = weight(4 * width, width), torch.zeros(4 * width)
        state[b + "mlp.fc2.weight"], state[b + "mlp.fc2.bias"] = weight(width, 4 * width), torch.zeros(width)
    state[v + "norm.weight"], state[v + "norm.bias"] = norm(width)
    # BLIP's med.py BERT and transformers' BlipTextModel share key names.
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    text_config = BlipTextConfig(vocab_size=len(words) + 2, hidden_size=text_width, encoder_hidden_size=width,
                                 intermediate_size=2 * text_width, num_hidden_layers=2, num_attention_heads=2,
                                 max_position_embeddings=64, is_decoder=True, pad_token_id=0, bos_token_id=None,
                                 eos_token_id=None, sep_token_id=None)
    torch.manual_seed(seed)
    text = BlipTextModel(text_config, add_pooling_layer=False)
    for key, value in text.state_dict().items():
        state["blip.text_encoder." + key] = value.clone()
    state["blip.text_encoder.embeddings.position_ids"] = torch.arange(64)[None]
    state["blip.vision_proj.weight"], state["blip.text_proj.weight"] = weight(16, width), weight(16, text_width)
    for key, value in _random_head(text_width, seed).state_dict().items():
        state["mlp." + key] = value.clone()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(state, directory / "ImageReward.pt")
    (directory / "vocab.txt").write_text("\n".join(words) + "\n")
    return directory


_QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
_QWEN_WORDS = ["system", "user", "assistant", "You", "are", "a", "helpful", "Does", "this", "figure", "show", '"', "?",
               "Please", "answer", "yes", "or", "no", ".", "Yes", "No", "Final", "Score", ":", "1", "2", "3", "4", "5",
               "Text", "Caption", "[", "]", "image", "prompt", "-", *WORDS, "[UNK]"]
# Qwen2-VL's chat template, reduced to what the rewards send: the default system turn, images and text.
_QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _qwen_processor(flavour: str, extra_special: tuple[str, ...] = ()):
    """A word-level tokenizer with Qwen's special tokens, and the Qwen2-VL / Qwen2.5-VL processor around it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(dict.fromkeys(_QWEN_SPECIAL + _QWEN_WORDS))}
    words = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="<|endoftext|>",
                                        eos_token="<|im_end|>",
                                        additional_special_tokens=[*_QWEN_SPECIAL[1:], *extra_special])
    if flavour == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor as Processor
    else:
        from transformers import Qwen2VLProcessor as Processor
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    images = Qwen2VLImageProcessor(min_pixels=4 * 28 * 28, max_pixels=16 * 28 * 28)
    return Processor(image_processor=images, tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(),
                     chat_template=_QWEN_TEMPLATE), vocab


def _qwen_config(flavour: str, vocab: dict, vocab_size: int):
    if flavour == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig as Config

        vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "out_hidden_size": 32, "num_heads": 2,
                  "fullatt_block_indexes": [0], "window_size": 56}
    else:
        from transformers import Qwen2VLConfig as Config

        vision = {"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2}
    text = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "pad_token_id": 0, "bos_token_id": None,
            "eos_token_id": vocab["<|im_end|>"],
            "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}}
    return Config(text_config=text, vision_config=vision, image_token_id=vocab["<|image_pad|>"],
                  video_token_id=vocab["<|video_pad|>"], vision_start_token_id=vocab["<|vision_start|>"],
                  vision_end_token_id=vocab["<|vision_end|>"])


def write_qwen2_vl(directory: str | Path, seed: int = 0, flavour: str = "qwen2_vl") -> Path:
    """A tiny Qwen2-VL (or ``flavour="qwen2_5_vl"``) ``...ForConditionalGeneration`` and its processor,
    saved with ``save_pretrained`` (safetensors): a model ``vlm:`` and ``unifiedreward`` can load."""
    from transformers import AutoModelForImageTextToText

    processor, vocab = _qwen_processor(flavour)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(_qwen_config(flavour, vocab, len(processor.tokenizer))).eval()
    directory = Path(directory)
    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    return directory


def write_hpsv3(directory: str | Path, seed: int = 0) -> tuple[Path, Path]:
    """``(HPSv3.safetensors, base directory)``: a tiny HPSv3 checkpoint in transformers 4.45's key layout
    (``model.*``, ``visual.*``, ``lm_head.*``, ``rm_head.*``) and the base model's config and processor."""
    from safetensors.torch import save_file

    from .hpsv3 import REWARD_TOKEN, HPSv3Model

    directory = Path(directory)
    processor, vocab = _qwen_processor("qwen2_vl")
    config = _qwen_config("qwen2_vl", vocab, len(processor.tokenizer) + 1)  # + <|Reward|>, as the reference resizes
    base = directory / "base"
    config.save_pretrained(base)
    processor.save_pretrained(base)
    torch.manual_seed(seed)
    model = HPSv3Model(config)
    for module in model.rm_head:
        if isinstance(module, torch.nn.Linear):  # unit-variance layers: the score varies visibly with the input
            torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("backbone.language_model."):
            key = "model." + key[len("backbone.language_model."):]
        elif key.startswith("backbone.visual."):
            key = key[len("backbone."):]
        state[key] = value.contiguous()
    state["lm_head.weight"] = torch.randn(config.text_config.vocab_size, config.text_config.hidden_size)
    assert REWARD_TOKEN not in processor.tokenizer.get_vocab()  # the loader adds it, as the reference does
    path = directory / "HPSv3.safetensors"
    save_file(state, str(path))
    return path, base


def _shortened(reward, tokens: int = 8):
    reward.max_new_tokens = tokens
    return reward


def _random_head(width: int, seed: int):
    """A :class:`RatingMLP` whose output varies visibly with its input (unit-variance layers)."""
    from .aesthetic import RatingMLP

    torch.manual_seed(seed)
    head = RatingMLP(width)
    for module in head.layers:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, std=module.in_features ** -0.5)
            torch.nn.init.normal_(module.bias, std=0.1)
    return head


def _save(state: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


def tiny_reward_builders(directory: str | Path, with_vlms: bool = True) -> dict[str, Any]:
    """``{registered name: build(device=None, dtype=None) -> Reward}`` for every built-in reward.

    Hub rewards are built by their real loaders from tiny checkpoints written to ``directory``
    (once, here); rewards without weights (and the bundled classifier) come from the registry.
    For tests and benchmarks that need every reward offline.
    """
    from .aesthetic import load_aesthetic
    from .clip import load_clip_score
    from .hpsv2 import load_hpsv2
    from .registry import available_rewards, get_reward

    directory = Path(directory)
    name = register_tiny_open_clip(directory / "open_clip")
    hps, head = write_hpsv2(directory), write_aesthetic_head(directory)
    pickscore, imagereward = write_pickscore(directory / "pickscore"), write_imagereward(directory / "imagereward")
    builders: dict[str, Any] = {
        "clip": lambda **o: load_clip_score(name + "/", **o),
        "hpsv2": lambda **o: load_hpsv2(str(hps), model_name=name, **o),
        "aesthetic": lambda **o: load_aesthetic(str(head), clip=name + "/", **o),
        "pickscore": lambda **o: get_reward(f"pickscore:{pickscore}", **o),
        "imagereward": lambda **o: get_reward(f"imagereward:{imagereward}", **o),
    }
    if with_vlms:
        from .hpsv3 import load_hpsv3

        qwen, qwen25 = write_qwen2_vl(directory / "qwen2-vl"), write_qwen2_vl(directory / "qwen2.5-vl", flavour="qwen2_5_vl")
        hpsv3, hpsv3_base = write_hpsv3(directory / "hpsv3")
        builders.update({
            "vlm": lambda **o: get_reward(f"vlm:{qwen}", **o),
            # A random model never writes "Final Score:": a few tokens show the cost of generating them.
            "unifiedreward": lambda **o: _shortened(get_reward(f"unifiedreward:{qwen25}", **o)),
            "hpsv3": lambda **o: load_hpsv3(str(hpsv3), base=str(hpsv3_base), **o),
        })
    for reward in available_rewards():
        builders.setdefault(reward, lambda n=reward, **o: get_reward(n, **o))
    return builders

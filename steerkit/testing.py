"""Tiny, randomly initialised pipelines of every supported family, built offline in milliseconds.

They have the real architectures (diffusers/transformers classes built from small configs) and
in-memory tokenizers, so the full stock code path runs with no hub and no files. Tests and the
overhead benchmarks use them; they produce noise, not pictures.

Every module is put in eval mode: modules built from a config start in training mode, and T5's
dropout would then make every call random.
"""

from __future__ import annotations

import string

import torch


def _byte_level_table() -> dict[int, str]:
    """The reversible byte → printable character table of byte-level BPE (CLIP, GPT-2, Qwen, Mistral)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return {byte: chr(c) for byte, c in zip(printable, chars)}


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte → printable character table (256 entries, in CLIP's vocabulary order)."""
    return list(_byte_level_table().values())


def tiny_clip_tokenizer(max_length: int = 77):
    """A byte-level CLIP tokenizer with no merges: 514 ids (bytes, word-final bytes, bos, eos)."""
    from transformers import CLIPTokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def tiny_t5_tokenizer():
    """A character-level unigram T5 tokenizer (no sentencepiece file needed)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    for c in string.ascii_letters + string.digits + string.punctuation:
        pieces += [(c, -5.0), ("▁" + c, -6.0)]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _clip_text(with_projection: bool = False, hidden: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=0, eos_token_id=2, hidden_size=hidden, intermediate_size=37, layer_norm_eps=1e-05,
        num_attention_heads=4, num_hidden_layers=2, pad_token_id=1, vocab_size=1000, projection_dim=32,
        hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)
    return model.eval()


def _t5_encoder():
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=256, d_model=32, d_ff=37, d_kv=8, num_heads=4, num_layers=2,
                      relative_attention_num_buckets=8, decoder_start_token_id=0)
    torch.manual_seed(0)
    return T5EncoderModel(config).eval()


def _sd_vae(latent_channels: int = 4, flow: bool = False):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    if flow:
        vae = AutoencoderKL(
            sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
            latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
            shift_factor=0.0609, scaling_factor=1.5035,
        )
    else:
        vae = AutoencoderKL(
            block_out_channels=[4, 8], in_channels=3, out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=latent_channels,
            norm_num_groups=2,
        )
    return vae.eval()


def tiny_stable_diffusion(scheduler=None):
    """A tiny ``StableDiffusionPipeline`` (16×16 latents, 32×32 images), DDIM by default."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=2,
    ).eval()
    scheduler = scheduler or DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
    )
    return StableDiffusionPipeline(
        vae=_sd_vae(), text_encoder=_clip_text(), tokenizer=tiny_clip_tokenizer(), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_stable_diffusion_xl(scheduler=None):
    """A tiny ``StableDiffusionXLPipeline`` (Euler by default)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(4, 8), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=1,
    ).eval()
    scheduler = scheduler or EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1,
    )
    return StableDiffusionXLPipeline(
        vae=_sd_vae(), text_encoder=_clip_text(), text_encoder_2=_clip_text(with_projection=True),
        tokenizer=tiny_clip_tokenizer(), tokenizer_2=tiny_clip_tokenizer(), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def tiny_stable_diffusion_3(scheduler=None):
    """A tiny ``StableDiffusion3Pipeline`` (FlowMatchEuler by default)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler or FlowMatchEulerDiscreteScheduler(),
        vae=_sd_vae(flow=True), text_encoder=_clip_text(with_projection=True), tokenizer=tiny_clip_tokenizer(),
        text_encoder_2=_clip_text(with_projection=True), tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=_t5_encoder(), tokenizer_3=tiny_t5_tokenizer(),
    )


def tiny_flux(scheduler=None, guidance_embeds: bool = False):
    """A tiny ``FluxPipeline`` (packed latents; ``guidance_embeds`` for a guidance-distilled model)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=guidance_embeds,
    ).eval()
    return FluxPipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(), vae=_sd_vae(latent_channels=1, flow=True),
        text_encoder=_clip_text(), tokenizer=tiny_clip_tokenizer(), text_encoder_2=_t5_encoder(),
        tokenizer_2=tiny_t5_tokenizer(), transformer=transformer, image_encoder=None, feature_extractor=None,
    )


def tiny_dit(scheduler=None):
    """A tiny ``DiTPipeline`` (learned σ, 8×8 latents; DDIM by default)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, attention_bias=True, activation_fn="gelu-approximate", num_embeds_ada_norm=1000,
        norm_type="ada_norm_zero", norm_elementwise_affine=False,
    ).eval()
    return DiTPipeline(transformer=transformer, vae=_sd_vae(), scheduler=scheduler or DDIMScheduler(),
                       id2label={"0": "tench, Tinca tinca", "1": "goldfish", "2": "great white shark"})


def tiny_class_conditional(scheduler=None, num_classes: int = 3):
    """A tiny ``ClassConditionalUNetPipeline`` (1×16×16 pixel space, DDIM by default)."""
    from diffusers import DDIMScheduler, UNet2DModel

    from steerkit.pipelines.class_conditional import ClassConditionalUNetPipeline

    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=16, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4, num_class_embeds=num_classes + 1,
    ).eval()
    id2label = {str(i): f"class{i}" for i in range(num_classes)}
    return ClassConditionalUNetPipeline(unet=unet, scheduler=scheduler or DDIMScheduler(), id2label=id2label)


# --- FLUX.2 (dev, klein) and Qwen-Image -----------------------------------------------------------
# Their text encoders are chat LLMs (Mistral-3, Qwen3, Qwen2.5-VL) whose prompts go through a chat
# template or a fixed prompt template. The tokenizers below are byte-level BPEs with each family's
# special tokens and template, whose merges spell the templates' words (and a few prompt words) as
# one token each, so the token counts the pipelines rely on match the real tokenizers' (Qwen-Image
# drops the first 34 tokens of its template, FLUX.2 pads after its system prompt).

#: FlowMatchEuler settings of the real checkpoints' ``scheduler/scheduler_config.json``. FLUX.2
#: computes its own ``mu`` (``compute_empirical_mu``), used because dynamic shifting is on.
FLUX2_SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=4096, max_shift=1.15,
                              shift=3.0, use_dynamic_shifting=True, time_shift_type="exponential")
QWENIMAGE_SCHEDULER_CONFIG = dict(base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
                                  shift=1.0, shift_terminal=0.02, use_dynamic_shifting=True,
                                  time_shift_type="exponential")

_PROMPT_WORDS = ("a an the of and with in on photo red blue green yellow black white cube ball cone cat dog "
                 "bird car tree house sky blurry dark ugly bad quality")
#: The words of Qwen-Image's prompt template (``QwenImagePipeline.prompt_template_encode``).
_QWENIMAGE_TEMPLATE_WORDS = ("system\nuser\nassistant\nDescribe the image by detailing the color, shape, size, texture, "
                             "quantity, text, spatial relationships of the objects and background")
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') "
    "| join('') %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]"
    "{% else %}{{ text }}{{ eos_token }}{% endif %}{% endfor %}"
)


def _byte_level_bpe(special_tokens: list[str], texts: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocabulary and merges of a byte-level BPE that spells every word of ``texts`` (with its leading
    space, if any) as one token: the special tokens, the 256 bytes, then one merge per word prefix."""
    import re

    table = _byte_level_table()
    vocab = {token: i for i, token in enumerate(special_tokens)}
    for char in table.values():
        vocab.setdefault(char, len(vocab))
    merges = []
    words = list(dict.fromkeys(word for text in texts for word in re.findall(r" ?[A-Za-z]+", text)))
    # Merges apply by rank inside each pre-tokenized word. A word with a leading space can only be
    # entered by its own chain (the space byte opens no other), so those go first; the first merge of
    # a word without one ("at" of "attribution") could fire inside another word, so those go last,
    # longest first.
    words.sort(key=lambda word: (not word.startswith(" "), 0 if word.startswith(" ") else -len(word)))
    for word in words:
        spelled = "".join(table[byte] for byte in word.encode())
        for end in range(2, len(spelled) + 1):
            if spelled[:end] not in vocab:
                vocab[spelled[:end]] = len(vocab)
                merges.append((spelled[: end - 1], spelled[end - 1]))
    return vocab, merges


def tiny_qwen_tokenizer(texts: tuple[str, ...] = ()):
    """A ``Qwen2Tokenizer`` (Qwen2.5 / Qwen3 byte-level BPE) with the Qwen chat tokens and template."""
    from transformers import Qwen2Tokenizer

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    vocab, merges = _byte_level_bpe(specials, [_QWENIMAGE_TEMPLATE_WORDS, _PROMPT_WORDS, *texts])
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, model_max_length=32768, chat_template=_QWEN_CHAT_TEMPLATE)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.add_tokens(["<think>", "</think>"])
    return tokenizer


def tiny_mistral3_processor():
    """A ``PixtralProcessor`` (FLUX.2's tokenizer) around a byte-level BPE with Mistral's control tokens."""
    from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PixtralImageProcessor, PixtralProcessor, PreTrainedTokenizerFast

    specials = ["<unk>", "[IMG]", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                "[IMG_BREAK]", "[IMG_END]"]
    vocab, merges = _byte_level_bpe(specials, [SYSTEM_MESSAGE, _PROMPT_WORDS])
    backend = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=[s for s in specials if s not in ("<unk>", "<s>", "</s>", "<pad>")],
        model_max_length=32768,
    )
    return PixtralProcessor(image_processor=PixtralImageProcessor(), tokenizer=tokenizer, patch_size=6,
                            chat_template=_MISTRAL_CHAT_TEMPLATE)


def _vocab_size(tokenizer) -> int:
    return len(tokenizer) + 8  # room for the unused vision token ids of the VL configs


def _flux2_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    vae = AutoencoderKLFlux2(
        sample_size=32, in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
    )
    # Non-trivial latent statistics, so that a missed (de-)normalisation shows in every test.
    vae.bn.running_mean.copy_(torch.linspace(-0.3, 0.3, vae.bn.num_features))
    vae.bn.running_var.copy_(torch.linspace(0.5, 2.0, vae.bn.num_features))
    return vae.eval()


def _flux2_transformer(guidance_embeds: bool, text_width: int):
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(0)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=text_width, timestep_guidance_channels=256, axes_dims_rope=[4, 4, 4, 4],
        guidance_embeds=guidance_embeds,
    ).eval()


def tiny_flux2(scheduler=None):
    """A tiny ``Flux2Pipeline`` (FLUX.2 dev: Mistral-3 text encoder, guidance embedding, 8×8 packed latents
    at 16×16 px). The text encoder has the 31 hidden states the default ``text_encoder_out_layers`` reads."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    processor = tiny_mistral3_processor()
    hidden = 16
    config = Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=_vocab_size(processor.tokenizer), hidden_size=hidden,
                         intermediate_size=37, max_position_embeddings=512, num_attention_heads=4, num_hidden_layers=30,
                         num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None, bos_token_id=2,
                         eos_token_id=3, pad_token_id=4),
        vision_config=dict(model_type="pixtral", hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=37, image_size=30, patch_size=6, num_channels=3),
        bos_token_id=2, eos_token_id=3, pad_token_id=4, image_seq_length=4, vision_feature_layer=-1, image_token_index=1,
    )
    torch.manual_seed(0)
    text_encoder = Mistral3ForConditionalGeneration(config).eval()
    return Flux2Pipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG), vae=_flux2_vae(),
        text_encoder=text_encoder, tokenizer=processor,
        transformer=_flux2_transformer(guidance_embeds=True, text_width=3 * hidden),
    )


def tiny_flux2_klein(scheduler=None, is_distilled: bool = False):
    """A tiny ``Flux2KleinPipeline`` (Qwen3 text encoder with the 28 hidden states the default layers read;
    ``is_distilled`` for the step-distilled checkpoints, which run no CFG)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    tokenizer = tiny_qwen_tokenizer()
    hidden = 16
    config = Qwen3Config(vocab_size=_vocab_size(tokenizer), hidden_size=hidden, intermediate_size=16,
                         num_hidden_layers=27, num_attention_heads=2, num_key_value_heads=2, head_dim=8,
                         max_position_embeddings=512)
    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(config).eval()
    return Flux2KleinPipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER_CONFIG), vae=_flux2_vae(),
        text_encoder=text_encoder, tokenizer=tokenizer,
        transformer=_flux2_transformer(guidance_embeds=False, text_width=3 * hidden), is_distilled=is_distilled,
    )


def tiny_qwenimage(scheduler=None):
    """A tiny ``QwenImagePipeline`` (Qwen2.5-VL text encoder, 3-D Wan-style VAE with ×4 compression:
    32×32 px → 8×8 latents → 16 packed tokens)."""
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=16, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
    ).eval()
    torch.manual_seed(0)
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=z_dim * 6, z_dim=z_dim, dim_mult=[1, 2, 4], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[-0.2, 0.1, 0.0, 0.3], latents_std=[0.5, 1.5, 1.0, 2.0],
    ).eval()
    tokenizer = tiny_qwen_tokenizer()
    vocab = _vocab_size(tokenizer)
    config = Qwen2_5_VLConfig(
        text_config=dict(hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=vocab, bos_token_id=0, eos_token_id=2,
                         rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
                         rope_theta=1e6),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16),
        hidden_size=16, vocab_size=vocab, vision_start_token_id=vocab - 3, vision_end_token_id=vocab - 2,
        vision_token_id=vocab - 1, image_token_id=vocab - 4, video_token_id=vocab - 5,
    )
    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(config).eval()
    return QwenImagePipeline(
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(**QWENIMAGE_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
    )

def _byte_level_vocab(specials: list[str], first: bool = False) -> dict[str, int]:
    """Byte-level BPE vocabulary with no merges (every byte is a token) plus ``specials``,
    placed before the bytes (``first``) or after them."""
    chars = _bytes_to_unicode()
    ordered = specials + chars if first else chars + specials
    return {token: i for i, token in enumerate(ordered)}


#: Qwen3's chat template, reduced to what ``ZImagePipeline`` uses: one user turn, the generation
#: prompt, and the empty thinking block only when thinking is switched off.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def tiny_qwen3_tokenizer(max_length: int = 512):
    """A byte-level Qwen2 tokenizer (259 ids) with Qwen3's special tokens and chat template."""
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer(vocab=_byte_level_vocab(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]), merges=[],
                               model_max_length=max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN3_CHAT_TEMPLATE
    return tokenizer


def tiny_gemma_tokenizer():
    """A character-level Gemma tokenizer (``<bos>`` added, ``▁`` for spaces; 105 ids)."""
    from transformers import GemmaTokenizer

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "▁": 4}
    for c in string.printable:
        vocab.setdefault(c, len(vocab))
    return GemmaTokenizer(vocab=vocab, merges=[], add_bos_token=True)


def tiny_z_image(scheduler=None, turbo: bool = False):
    """A tiny ``ZImagePipeline`` (Qwen3 text encoder, 16×16 latents at 32×32 pixels).

    The scheduler is the one the real checkpoints ship: FlowMatchEuler without dynamic shifting,
    shift 3 for ``turbo`` (Z-Image-Turbo's published scheduler config; it is run with
    ``guidance_scale=0``) and shift 6 for Z-Image (from a secondary source, not checked against the
    repository's config). The stock call passes ``mu`` too, which this config ignores.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        ZImagePipeline,
        ZImageTransformer2DModel,
    )
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2,
        n_kv_heads=2, norm_eps=1e-5, qk_norm=True, cap_feat_dim=16, rope_theta=256.0, t_scale=1000.0,
        axes_dims=[8, 4, 4], axes_lens=[256, 32, 32],
    )
    with torch.no_grad():  # created with torch.empty: give them values, as diffusers' own tests do
        transformer.x_pad_token.fill_(1.0)
        transformer.cap_pad_token.fill_(1.0)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 8], in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"], latent_channels=4, norm_num_groups=2,
        scaling_factor=0.3611, shift_factor=0.1159,
    )
    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(
        hidden_size=16, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
        head_dim=8, vocab_size=300, max_position_embeddings=512,
    ))
    scheduler = scheduler or FlowMatchEulerDiscreteScheduler(shift=3.0 if turbo else 6.0)
    return ZImagePipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder.eval(),
                          tokenizer=tiny_qwen3_tokenizer(), transformer=transformer.eval())


def tiny_sana(scheduler=None):
    """A tiny ``SanaPipeline`` (Gemma-2 text encoder, DC-AE with 32× compression).

    ``sample_size=16`` selects SANA's 512-pixel aspect-ratio bins, so resolution binning (on by
    default) gives 512×512 images from 16×16 latents. The scheduler is the one SANA checkpoints
    ship: DPM-Solver++ on flow sigmas, shift 3.
    """
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2, attention_head_dim=4,
        num_cross_attention_heads=2, cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
        sample_size=16,
    )
    torch.manual_seed(0)
    stages = 6
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types="ResBlock",
        decoder_block_types="ResBlock", encoder_block_out_channels=(8,) * stages, decoder_block_out_channels=(8,) * stages,
        encoder_qkv_multiscales=((),) * stages, decoder_qkv_multiscales=((),) * stages,
        encoder_layers_per_block=(1,) * stages, decoder_layers_per_block=(1,) * stages, downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    )
    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(
        head_dim=16, hidden_size=8, initializer_range=0.02, intermediate_size=64, max_position_embeddings=8192,
        num_attention_heads=2, num_hidden_layers=1, num_key_value_heads=2, vocab_size=128,
        attn_implementation="eager",
    ))
    scheduler = scheduler or DPMSolverMultistepScheduler(flow_shift=3.0, use_flow_sigmas=True,
                                                         prediction_type="flow_prediction")
    return SanaPipeline(tokenizer=tiny_gemma_tokenizer(), text_encoder=text_encoder.eval(),
                        transformer=transformer.eval(), vae=vae.eval(), scheduler=scheduler)


def tiny_pixart_sigma(scheduler=None):
    """A tiny ``PixArtSigmaPipeline`` (T5 text encoder, learned σ, VAE with 8× compression).

    ``sample_size=32`` selects PixArt's 256-pixel aspect-ratio bins, so resolution binning (on by
    default) gives 256×256 images from 32×32 latents. The scheduler is the one PixArt-Σ checkpoints
    ship: DPM-Solver++ (ε prediction).
    """
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
    )
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[4, 4, 4, 4], in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, norm_num_groups=2,
    )
    return PixArtSigmaPipeline(tokenizer=tiny_t5_tokenizer(), text_encoder=_t5_encoder(), vae=vae.eval(),
                               transformer=transformer.eval(), scheduler=scheduler or DPMSolverMultistepScheduler())


def load_random_ip_adapter(pipe, image_embed_dim: int = 32, seed: int = 0):
    """Load a randomly initialised IP-Adapter (an ``ImageProjection`` of 4 image tokens plus the
    key/value projections of every cross-attention) into ``pipe.unet``, in the state-dict layout of
    the published IP-Adapter checkpoints, through diffusers' own loader. Call with
    ``ip_adapter_image_embeds=[tensor of shape (2, 1, image_embed_dim)]`` (negative, positive)."""
    unet = pipe.unet
    config = unet.config
    generator = torch.Generator().manual_seed(seed)

    def random(*shape):
        return torch.randn(*shape, generator=generator) * 0.2

    def hidden_size(name: str) -> int:
        if name.startswith("mid_block"):
            return config.block_out_channels[-1]
        block = int(name.split(".")[1])
        channels = list(config.block_out_channels)
        return (channels[::-1] if name.startswith("up_blocks") else channels)[block]

    cross = config.cross_attention_dim
    attention, key = {}, 1
    for name in unet.attn_processors:
        if name.endswith("attn2.processor"):  # checkpoints number cross-attentions 1, 3, 5, ...
            attention[f"{key}.to_k_ip.weight"] = random(hidden_size(name), cross)
            attention[f"{key}.to_v_ip.weight"] = random(hidden_size(name), cross)
            key += 2
    projection = {"proj.weight": random(4 * cross, image_embed_dim), "proj.bias": random(4 * cross),
                  "norm.weight": torch.ones(cross), "norm.bias": torch.zeros(cross)}
    unet._load_ip_adapter_weights([{"image_proj": projection, "ip_adapter": attention}])
    return pipe

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


def _bytes_to_unicode() -> list[str]:
    """CLIP's reversible byte → printable character table (256 entries)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return [chr(c) for c in chars]


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


def tiny_qwen_tokenizer(max_length: int = 512):
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
                          tokenizer=tiny_qwen_tokenizer(), transformer=transformer.eval())


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

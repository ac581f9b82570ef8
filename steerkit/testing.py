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
